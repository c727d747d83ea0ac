/**
 * Local key backend: AES-256-GCM with a 32-byte key held in a file.
 *
 * It is the embedded default (`serve --dev`) and an offline break-glass / escrow
 * copy: a key file kept in a safe decrypts every envelope it wrapped without any
 * cloud. Older key files can be listed in `previousKeyFiles` so that envelopes
 * written before a key change still unwrap.
 *
 * Key file format (docs/configuration.md): one key per line, newest first, as
 * canonical base64 of exactly 32 bytes followed by its check value (the key's
 * version, a fingerprint); "#" starts a comment. Lines without a check value (files
 * written before it existed) still load, with a warning.
 *
 * What happens when a file changes under a running plugin: the new content is read
 * only if it passes every check (permissions, owner, not a link, strict decoding,
 * check values). A file that fails is refused: the keys loaded before stay in memory
 * for unwrapping, new wraps are refused and the health probe fails with the reason,
 * so `trousseau status`, the backend_up metric and an error log line all show it.
 * Only a key file that is gone makes the backend forget its keys.
 */
import { createCipheriv, createDecipheriv, createHash, createSecretKey, randomBytes, type KeyObject } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { link, open, rename, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { pino, type Logger } from 'pino';
import { z } from 'zod';
import { pooledRandomBytes } from '../envelope/random.ts';
import { TrousseauError } from '../errors.ts';
import { contextBytes, type KeyBackend, type WrapContext, type WrappedKey } from './backend.ts';
import { commonBackendFields, type BackendDefinition } from './definition.ts';


const KEY_BYTES = 32;
const NONCE_BYTES = 12;
const TAG_BYTES = 16;
/** A key file holds a few lines; anything larger is not one (and is not read into memory). */
const MAX_KEY_FILE_BYTES = 64 * 1024;
/** Open for reading without following a link, without blocking on a FIFO, without becoming a terminal. */
const READ_FLAGS = fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK | fsConstants.O_NOCTTY;
/** Create a new file: never an existing one, never through a link. */
const CREATE_FLAGS = fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW;

export const localConfigSchema = z
  .object({
    ...commonBackendFields,
    type: z.literal('local'),
    /** Key file (mode 0600): one base64 32-byte key and its check value per line, the current key first. */
    keyFile: z.string().min(1),
    /** Other key files whose keys are used only to unwrap older envelopes. */
    previousKeyFiles: z.array(z.string().min(1)).default([]),
  })
  .strict();

export type LocalBackendConfig = z.output<typeof localConfigSchema>;

export const localBackend: BackendDefinition<typeof localConfigSchema> = {
  type: 'local',
  configSchema: localConfigSchema,
  create: async (config, deps) =>
    new LocalKeyBackend(
      config.name,
      path.resolve(deps.baseDir, config.keyFile),
      config.previousKeyFiles.map((f) => path.resolve(deps.baseDir, f)),
      deps.logger,
    ),
};

interface LoadedKey {
  version: string;
  key: Buffer;
  /** The key as a KeyObject, made once: building one per call costs more than the cipher. */
  keyObject: KeyObject;
}

/** A key file's keys, newest first, and what identifies the file's content on disk. */
export interface KeyRing {
  keys: LoadedKey[];
  identity: string;
  /** 1-based numbers of the lines that carry no check value (an older file). */
  uncheckedLines: number[];
}

/**
 * One key file as the backend knows it: the keys last accepted from it, and, while
 * the file on disk fails a check, why. Read only at the first use and when the
 * backend is asked for its key version (the health probe), never per call.
 */
class KeyFile {
  readonly file: string;
  ring: KeyRing | undefined;
  /** Why the file on disk is not (or no longer) used; undefined while it is. */
  refusal: TrousseauError | undefined;
  /** Identity of the content last looked at, accepted or refused, so a refusal is logged once. */
  private seen: string | undefined;
  private loading: Promise<void> | undefined;
  private readonly logger: Logger;
  private readonly backendName: string;

  constructor(file: string, backendName: string, logger: Logger) {
    this.file = file;
    this.backendName = backendName;
    this.logger = logger;
  }

  /** Load once if never tried; concurrent first calls share one read. */
  ensureLoaded(): Promise<void> {
    if (this.ring || this.refusal) return Promise.resolve();
    return this.refresh();
  }

  /** Re-read the file if it changed; checks permissions, owner and type every time. */
  refresh(): Promise<void> {
    this.loading ??= this.reload().finally(() => (this.loading = undefined));
    return this.loading;
  }

  forget(): void {
    for (const loaded of this.ring?.keys ?? []) loaded.key.fill(0);
    this.ring = undefined;
  }

  private async reload(): Promise<void> {
    let next: KeyRing | undefined;
    try {
      next = await readKeyRing(this.file, this.ring);
    } catch (error) {
      const refusal = unreadable(this.file, error);
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') {
        // An operator who removes a key file means it: the keys go with it.
        this.forget();
      }
      const identity = `refused:${refusal.message}`;
      if (this.seen !== identity) {
        this.seen = identity;
        this.logger.error(
          { backend: this.backendName, file: this.file, keptKeys: this.ring?.keys.length ?? 0 },
          this.ring ? `key file refused, the keys loaded before are kept for unwrapping: ${refusal.message}` : `key file refused: ${refusal.message}`,
        );
      }
      this.refusal = refusal;
      return;
    }
    // undefined: same content as the ring we hold.
    if (next === undefined) {
      this.refusal = undefined;
      return;
    }
    if (this.refusal || this.ring) this.logger.info({ backend: this.backendName, file: this.file, keyVersion: next.keys[0]!.version }, 'key file loaded');
    if (next.uncheckedLines.length > 0) {
      this.logger.warn(
        { backend: this.backendName, file: this.file, lines: next.uncheckedLines },
        'key file lines have no check value, so a damaged key cannot be told from a new one; `trousseau keygen --add-checks FILE` writes them',
      );
    }
    this.forget();
    this.ring = next;
    this.refusal = undefined;
    this.seen = next.identity;
  }
}

export class LocalKeyBackend implements KeyBackend {
  readonly kind = 'local';
  readonly name: string;
  private readonly current: KeyFile;
  private readonly previous: readonly KeyFile[];

  constructor(name: string, keyFile: string, previousKeyFiles: readonly string[] = [], logger: Logger = pino({ enabled: false })) {
    this.name = name;
    this.current = new KeyFile(keyFile, name, logger);
    this.previous = previousKeyFiles.map((f) => new KeyFile(f, name, logger));
  }

  /**
   * Re-reads the key files when they changed (the health probe calls this, which is
   * how `keygen --rotate` reaches the key_id). The current file refused while its old
   * keys are kept is BACKEND_REJECTED (the key, not the backend's reachability, is the
   * problem, so the breaker stays closed and old copies keep unwrapping); with no key
   * at all it is BACKEND_UNAVAILABLE.
   */
  async currentKeyVersion(): Promise<string> {
    await Promise.all([this.current.refresh(), ...this.previous.map((p) => p.refresh())]);
    return this.currentKey().version;
  }

  async wrap(dataKey: Uint8Array, context: WrapContext): Promise<WrappedKey> {
    await this.current.ensureLoaded();
    const { keyObject, version } = this.currentKey();
    const nonce = pooledRandomBytes(NONCE_BYTES);
    const cipher = createCipheriv('aes-256-gcm', keyObject, nonce);
    cipher.setAAD(contextBytes(context));
    const sealed = Buffer.concat([nonce, cipher.update(dataKey), cipher.final(), cipher.getAuthTag()]);
    return { wrapped: sealed, keyVersion: version };
  }

  async unwrap(wrapped: Uint8Array, keyVersion: string, context: WrapContext): Promise<Uint8Array> {
    const key = await this.keyForVersion(keyVersion);
    if (wrapped.length !== NONCE_BYTES + KEY_BYTES + TAG_BYTES) {
      throw new TrousseauError('BACKEND_REJECTED', 'wrapped key has the wrong length for a local key');
    }
    const bytes = Buffer.from(wrapped.buffer, wrapped.byteOffset, wrapped.byteLength);
    const decipher = createDecipheriv('aes-256-gcm', key, bytes.subarray(0, NONCE_BYTES));
    decipher.setAAD(contextBytes(context));
    decipher.setAuthTag(bytes.subarray(NONCE_BYTES + KEY_BYTES));
    // GCM gives every byte from update(); final() only checks the tag.
    const dataKey = decipher.update(bytes.subarray(NONCE_BYTES, NONCE_BYTES + KEY_BYTES));
    try {
      decipher.final();
      return dataKey;
    } catch (error) {
      dataKey.fill(0);
      throw new TrousseauError('BACKEND_REJECTED', 'wrapped key does not authenticate under this local key', { cause: error });
    }
  }

  async close(): Promise<void> {
    this.current.forget();
    for (const p of this.previous) p.forget();
  }

  /** The key new wraps use; refused while the file on disk fails a check. */
  private currentKey(): LoadedKey {
    const { ring, refusal } = this.current;
    if (!ring) throw refusal ?? new TrousseauError('BACKEND_UNAVAILABLE', `key file ${this.current.file} is not loaded`);
    if (refusal) {
      throw new TrousseauError('BACKEND_REJECTED', `new wraps refused until the key file is fixed (${refusal.message})`, { cause: refusal });
    }
    return ring.keys[0]!;
  }

  /**
   * The key that made a copy. Every file is read at most once here (its first use);
   * after that a version we do not hold is a copy we cannot open (BACKEND_REJECTED,
   * the next copy is tried), never an outage and never a disk read.
   */
  private async keyForVersion(version: string): Promise<KeyObject> {
    await this.current.ensureLoaded();
    const match = this.current.ring?.keys.find((k) => k.version === version);
    if (match) return match.keyObject;
    await Promise.all(this.previous.map((p) => p.ensureLoaded()));
    for (const p of this.previous) {
      const old = p.ring?.keys.find((k) => k.version === version);
      if (old) return old.keyObject;
    }
    // No key at all: the backend cannot unwrap anything, which is an outage.
    if (!this.current.ring && this.previous.every((p) => !p.ring)) {
      throw this.current.refusal ?? new TrousseauError('BACKEND_UNAVAILABLE', `key file ${this.current.file} is not loaded`);
    }
    throw new TrousseauError('BACKEND_REJECTED', `no local key with version ${version} is configured`);
  }
}

function fileIdentity(info: { dev: bigint; ino: bigint; size: bigint; mtimeNs: bigint; ctimeNs: bigint }): string {
  return `${info.dev}:${info.ino}:${info.size}:${info.mtimeNs}:${info.ctimeNs}`;
}

function unreadable(file: string, error: unknown): TrousseauError {
  if (error instanceof TrousseauError) return error;
  const code = (error as NodeJS.ErrnoException).code;
  if (code === 'ELOOP') return new TrousseauError('BACKEND_UNAVAILABLE', `key file ${file} is a symbolic link; name the file itself`, { cause: error });
  return new TrousseauError('BACKEND_UNAVAILABLE', `key file ${file} cannot be read (${code ?? 'error'})`, { cause: error });
}

/** A key's version: a fingerprint that names the key without revealing it; also its check value in the file. */
export function localKeyVersion(key: Uint8Array): string {
  return createHash('sha256').update('trousseau local key fingerprint\0').update(key).digest('hex').slice(0, 16);
}

/** One key file line: canonical base64 of 32 bytes (43 characters and one "="), then optionally its check value. */
const KEY_LINE = /^([A-Za-z0-9+/]{43}=)(?:[ \t]+([0-9a-f]{16}))?$/;

/** The line a key file holds for `key`. */
export function keyFileLine(key: Uint8Array): string {
  return `${Buffer.from(key).toString('base64')} ${localKeyVersion(key)}`;
}

/**
 * Parse a key file's text. Strict: exactly 32 bytes in canonical base64 (the
 * padding bits zero, so no two spellings of one key), the check value must match
 * when present, and when `known` is given (a reload) every key not in it must carry
 * its check value, so a damaged line is never taken for a rotation. Errors name the
 * line, never its content.
 */
export function parseKeyFile(text: string, file: string, known?: ReadonlySet<string>): { keys: LoadedKey[]; uncheckedLines: number[] } {
  const keys: LoadedKey[] = [];
  const uncheckedLines: number[] = [];
  const fail = (message: string): never => {
    for (const k of keys) k.key.fill(0);
    throw new TrousseauError('BACKEND_UNAVAILABLE', `key file ${file} ${message}`);
  };
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const trimmed = lines[i]!.trim();
    if (trimmed === '' || trimmed.startsWith('#')) continue;
    const match = KEY_LINE.exec(trimmed);
    if (!match) fail(`line ${i + 1} is not a base64 32-byte key followed by its check value`);
    const key = Buffer.from(match![1]!, 'base64');
    if (key.length !== KEY_BYTES || key.toString('base64') !== match![1]) {
      key.fill(0);
      fail(`line ${i + 1} is not canonical base64 of a 32-byte key`);
    }
    const version = localKeyVersion(key);
    const check = match![2];
    if (check !== undefined && check !== version) {
      key.fill(0);
      fail(`line ${i + 1} fails its check value: the key is damaged`);
    }
    if (check === undefined) {
      if (known && !known.has(version)) {
        key.fill(0);
        fail(`line ${i + 1} holds a new key without a check value; write keys with \`trousseau keygen\``);
      }
      uncheckedLines.push(i + 1);
    }
    keys.push({ key, version, keyObject: createSecretKey(key) });
  }
  if (keys.length === 0) fail('holds no key');
  return { keys, uncheckedLines };
}

/**
 * Open a key file for reading without following a link, and check what was opened:
 * a regular file, owned by us (or root), that group and others cannot access.
 */
async function openKeyFile(file: string): Promise<{ handle: FileHandle; identity: string; size: number }> {
  const handle = await open(file, READ_FLAGS);
  try {
    const info = await handle.stat({ bigint: true });
    if (!info.isFile()) throw new TrousseauError('BACKEND_UNAVAILABLE', `key file ${file} is not a regular file`);
    const owner = Number(info.uid);
    const euid = process.geteuid?.() ?? owner;
    if (owner !== euid && owner !== 0) {
      throw new TrousseauError('BACKEND_UNAVAILABLE', `key file ${file} is owned by uid ${owner}, not by the plugin's user (uid ${euid}) or root`);
    }
    const mode = Number(info.mode) & 0o777;
    if ((mode & 0o077) !== 0) {
      throw new TrousseauError('BACKEND_UNAVAILABLE', `key file ${file} is readable by group or others (mode ${mode.toString(8)}); chmod 600 it`);
    }
    if (info.size > BigInt(MAX_KEY_FILE_BYTES)) throw new TrousseauError('BACKEND_UNAVAILABLE', `key file ${file} is larger than a key file can be`);
    return { handle, identity: fileIdentity(info), size: Number(info.size) };
  } catch (error) {
    await handle.close();
    throw error;
  }
}

/**
 * Read and check a key file. With `held` (the ring already loaded from it) returns
 * undefined when the content is unchanged, after the permission checks.
 */
async function readKeyRing(file: string, held?: KeyRing): Promise<KeyRing | undefined> {
  const { handle, identity, size } = await openKeyFile(file);
  let bytes: Buffer;
  try {
    if (held?.identity === identity) return undefined;
    bytes = Buffer.alloc(size + 1);
    const { bytesRead } = await handle.read(bytes, 0, bytes.length, 0);
    if (bytesRead > size) throw new TrousseauError('BACKEND_UNAVAILABLE', `key file ${file} changed while it was read`);
    bytes = bytes.subarray(0, bytesRead);
  } finally {
    await handle.close();
  }
  try {
    const known = held ? new Set(held.keys.map((k) => k.version)) : undefined;
    return { ...parseKeyFile(bytes.toString('utf8'), file, known), identity };
  } finally {
    bytes.fill(0);
  }
}

/**
 * Read a key file: one base64 32-byte key per line with its check value, newest
 * first ("#" starts a comment). Refuses links, files of another owner, files that
 * group or others can read, and anything that fails the strict parse.
 */
export async function loadKeyRing(file: string): Promise<KeyRing> {
  try {
    return (await readKeyRing(file))!;
  } catch (error) {
    throw unreadable(file, error);
  }
}

/**
 * Write `lines` to a new file next to `file`, mode 0600 from the moment it exists
 * (created with O_EXCL and O_NOFOLLOW under a random name, so nothing can be put in
 * its place), flushed to disk; returns its name.
 */
async function writeTemporary(file: string, lines: readonly string[]): Promise<string> {
  const temporary = path.join(path.dirname(file), `.${path.basename(file)}.${randomBytes(8).toString('hex')}.tmp`);
  const handle = await open(temporary, CREATE_FLAGS, 0o600);
  try {
    await handle.chmod(0o600); // the umask can only remove bits; this states the mode outright
    await handle.writeFile(`${lines.join('\n')}\n`);
    await handle.sync();
  } catch (error) {
    await handle.close();
    await unlink(temporary).catch(() => undefined);
    throw error;
  }
  await handle.close();
  return temporary;
}

/** Make a rename or link in `folder` durable. */
async function syncFolder(folder: string): Promise<void> {
  const handle = await open(folder, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY);
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * Create a new key file with mode 0600; refuses to overwrite an existing file (or a
 * link). The key is written to a temporary file and hard-linked into place, so the
 * file appears whole or not at all (an interrupted start never leaves an empty key file).
 */
export async function generateKeyFile(file: string): Promise<string> {
  const key = randomBytes(KEY_BYTES);
  let temporary: string | undefined;
  try {
    temporary = await writeTemporary(file, [keyFileLine(key)]);
    await link(temporary, file); // fails with EEXIST rather than replace a key (or follow a link)
    await syncFolder(path.dirname(file));
    return localKeyVersion(key);
  } finally {
    key.fill(0);
    if (temporary) await unlink(temporary).catch(() => undefined);
  }
}

/**
 * Rewrite an existing key file: `newKey` first when rotating, then every key it
 * holds, each line with its check value. Written to a temporary file and renamed over
 * the old one, so a crash leaves either the old file or the new one, never half of
 * one; the old file is read with the same checks as the plugin's, so a damaged file
 * is never rewritten into a "valid" one. Returns the current key's version.
 */
async function rewriteKeyFile(file: string, newKey?: Buffer): Promise<string> {
  return withKeyFileLock(file, () => rewriteLocked(file, newKey));
}

/** How long a rotation waits for another one of the same file to finish. */
const LOCK_WAIT_MS = 10_000;

/**
 * Rewrites of one key file are serialised by a lock file beside it
 * (`<file>.lock`, created with O_EXCL and O_NOFOLLOW, holding the writer's pid).
 * Without it, two rotations started together both read the old file and the second
 * rename dropped the first one's new key, which a running plugin may already have
 * wrapped data keys with: those envelopes would have lost their local copy. A lock
 * left by a crashed keygen is not removed automatically (two waiters could otherwise
 * each remove the other's fresh lock); the error says which file to remove.
 */
async function withKeyFileLock<T>(file: string, work: () => Promise<T>): Promise<T> {
  const lockFile = `${file}.lock`;
  const deadline = Date.now() + LOCK_WAIT_MS;
  for (;;) {
    try {
      const handle = await open(lockFile, CREATE_FLAGS, 0o600);
      try {
        await handle.writeFile(`${process.pid}\n`);
      } finally {
        await handle.close();
      }
      break;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw unreadable(lockFile, error);
      if (Date.now() >= deadline) {
        throw new TrousseauError(
          'BACKEND_UNAVAILABLE',
          `key file ${file} is being rewritten by another process (lock file ${lockFile} exists since more than ${LOCK_WAIT_MS / 1000} s); if no keygen is running, a crashed one left it: remove it and retry`,
        );
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
  try {
    return await work();
  } finally {
    await unlink(lockFile).catch(() => undefined);
  }
}

async function rewriteLocked(file: string, newKey?: Buffer): Promise<string> {
  const existing = await loadKeyRing(file);
  let temporary: string | undefined;
  try {
    const keys = [...(newKey ? [newKey] : []), ...existing.keys.map((k) => k.key)];
    temporary = await writeTemporary(file, keys.map(keyFileLine));
    await rename(temporary, file);
    temporary = undefined;
    await syncFolder(path.dirname(file));
    return localKeyVersion(keys[0]!);
  } finally {
    for (const k of existing.keys) k.key.fill(0);
    if (temporary) await unlink(temporary).catch(() => undefined);
  }
}

/** Rotate: put a new key first in an existing key file, keeping the older keys so the envelopes they wrapped still unwrap. */
export async function addKeyToFile(file: string): Promise<string> {
  const key = randomBytes(KEY_BYTES);
  try {
    return await rewriteKeyFile(file, key);
  } finally {
    key.fill(0);
  }
}

/** Write the check value on every line of an older key file; the keys and their order stay the same. */
export async function addCheckValues(file: string): Promise<string> {
  return rewriteKeyFile(file);
}
