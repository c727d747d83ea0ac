/**
 * Local key backend: AES-256-GCM with a 32-byte key held in a file.
 *
 * It is the embedded default (`serve --dev`) and an offline break-glass / escrow
 * copy: a key file kept in a safe decrypts every envelope it wrapped without any
 * cloud. Older key files can be listed in `previousKeyFiles` so that envelopes
 * written before a key change still unwrap.
 */
import { createCipheriv, createDecipheriv, createHash, createSecretKey, randomBytes, type KeyObject } from 'node:crypto';
import { link, open, readFile, rename, stat, unlink } from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';
import { pooledRandomBytes } from '../envelope/random.ts';
import { TrousseauError } from '../errors.ts';
import { contextBytes, type KeyBackend, type WrapContext, type WrappedKey } from './backend.ts';
import { commonBackendFields, type BackendDefinition } from './definition.ts';

const KEY_BYTES = 32;
const NONCE_BYTES = 12;
const TAG_BYTES = 16;

export const localConfigSchema = z
  .object({
    ...commonBackendFields,
    type: z.literal('local'),
    /** Key file (mode 0600): one base64 32-byte key per line, the current key first. */
    keyFile: z.string().min(1),
    /** Other key files whose keys are used only to unwrap older envelopes. */
    previousKeyFiles: z.array(z.string().min(1)).default([]),
  })
  .strict();

export type LocalBackendConfig = z.output<typeof localConfigSchema>;

export const localBackend: BackendDefinition<typeof localConfigSchema> = {
  type: 'local',
  configSchema: localConfigSchema,
  create: (config, deps) =>
    new LocalKeyBackend(
      config.name,
      path.resolve(deps.baseDir, config.keyFile),
      config.previousKeyFiles.map((f) => path.resolve(deps.baseDir, f)),
    ),
};

interface LoadedKey {
  version: string;
  key: Buffer;
  /** The key as a KeyObject, made once: building one per call costs more than the cipher. */
  keyObject: KeyObject;
}

/** A key file's keys, newest first, and what identifies the file's content on disk. */
interface KeyRing {
  keys: LoadedKey[];
  identity: string;
}

export class LocalKeyBackend implements KeyBackend {
  readonly kind = 'local';
  readonly name: string;
  private readonly keyFile: string;
  private readonly previousKeyFiles: readonly string[];
  private ring: KeyRing | undefined;
  private previous: LoadedKey[] | undefined;

  constructor(name: string, keyFile: string, previousKeyFiles: readonly string[] = []) {
    this.name = name;
    this.keyFile = keyFile;
    this.previousKeyFiles = previousKeyFiles;
  }

  /**
   * Re-reads the key file when it changed (the health probe calls this, which is how
   * `keygen --rotate` reaches the key_id), and reports the backend unavailable when
   * the file is gone: an operator who removes a key file means it.
   */
  async currentKeyVersion(): Promise<string> {
    let identity: string;
    try {
      identity = fileIdentity(await stat(this.keyFile));
    } catch (error) {
      this.forget();
      throw unreadable(this.keyFile, error);
    }
    if (this.ring?.identity !== identity) {
      this.forget();
      this.ring = await loadKeyRing(this.keyFile);
    }
    return this.ring.keys[0]!.version;
  }

  async wrap(dataKey: Uint8Array, context: WrapContext): Promise<WrappedKey> {
    const { keyObject, version } = (await this.keyRing()).keys[0]!;
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
    this.forget();
    for (const loaded of this.previous ?? []) loaded.key.fill(0);
    this.previous = undefined;
  }

  private forget(): void {
    for (const loaded of this.ring?.keys ?? []) loaded.key.fill(0);
    this.ring = undefined;
  }

  private async keyRing(): Promise<KeyRing> {
    // Loaded lazily and retried on every call until it works: a missing key file
    // makes this backend unavailable, never the plugin, and is never replaced.
    this.ring ??= await loadKeyRing(this.keyFile);
    return this.ring;
  }

  private async keyForVersion(version: string): Promise<KeyObject> {
    const ring = await this.keyRing();
    const match = ring.keys.find((k) => k.version === version);
    if (match) return match.keyObject;
    this.previous ??= (await Promise.all(this.previousKeyFiles.map((f) => loadKeyRing(f)))).flatMap((r) => r.keys);
    const old = this.previous.find((k) => k.version === version);
    if (old) return old.keyObject;
    throw new TrousseauError('BACKEND_REJECTED', `no local key with version ${version} is configured`);
  }
}

function fileIdentity(info: { ino: number; size: number; mtimeMs: number }): string {
  return `${info.ino}:${info.size}:${info.mtimeMs}`;
}

function unreadable(file: string, error: unknown): TrousseauError {
  if (error instanceof TrousseauError) return error;
  return new TrousseauError('BACKEND_UNAVAILABLE', `key file ${file} cannot be read (${(error as NodeJS.ErrnoException).code ?? 'error'})`, {
    cause: error,
  });
}

/** A key's version: a fingerprint that names the key without revealing it. */
export function localKeyVersion(key: Uint8Array): string {
  return createHash('sha256').update('trousseau local key fingerprint\0').update(key).digest('hex').slice(0, 16);
}

/**
 * Read a key file: one base64 32-byte key per line, newest first ("#" starts a
 * comment). Refuses files that group or others can read, and keys of the wrong size.
 */
export async function loadKeyRing(file: string): Promise<KeyRing> {
  let text: string;
  let identity: string;
  try {
    const info = await stat(file);
    if ((info.mode & 0o077) !== 0) {
      throw new TrousseauError(
        'BACKEND_UNAVAILABLE',
        `key file ${file} is readable by group or others (mode ${(info.mode & 0o777).toString(8)}); chmod 600 it`,
      );
    }
    identity = fileIdentity(info);
    text = await readFile(file, 'utf8');
  } catch (error) {
    throw unreadable(file, error);
  }
  const keys: LoadedKey[] = [];
  for (const line of text.split('\n')) {
    const trimmed = line.trim();
    if (trimmed === '' || trimmed.startsWith('#')) continue;
    const key = Buffer.from(trimmed, 'base64');
    if (key.length !== KEY_BYTES) {
      key.fill(0);
      for (const k of keys) k.key.fill(0);
      throw new TrousseauError('BACKEND_UNAVAILABLE', `key file ${file} holds a line that is not a base64 32-byte key`);
    }
    keys.push({ key, version: localKeyVersion(key), keyObject: createSecretKey(key) });
  }
  if (keys.length === 0) throw new TrousseauError('BACKEND_UNAVAILABLE', `key file ${file} holds no key`);
  return { keys, identity };
}

/**
 * Create a new key file with mode 0600; refuses to overwrite an existing file. The
 * key is written to a temporary file and hard-linked into place, so the file appears
 * whole or not at all (an interrupted start never leaves an empty key file).
 */
export async function generateKeyFile(file: string): Promise<string> {
  const key = randomBytes(KEY_BYTES);
  const temporary = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  try {
    const handle = await open(temporary, 'wx', 0o600);
    try {
      await handle.writeFile(`${key.toString('base64')}\n`);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await link(temporary, file); // fails with EEXIST rather than replace a key
    return localKeyVersion(key);
  } finally {
    key.fill(0);
    await unlink(temporary).catch(() => undefined);
  }
}

/**
 * Rotate: put a new key first in an existing key file, keeping the older keys so the
 * envelopes they wrapped still unwrap. Written to a temporary file and renamed, so a
 * crash leaves either the old file or the new one, never half of one.
 */
export async function addKeyToFile(file: string): Promise<string> {
  const existing = await loadKeyRing(file);
  const key = randomBytes(KEY_BYTES);
  const temporary = `${file}.${process.pid}.tmp`;
  try {
    const lines = [key, ...existing.keys.map((k) => k.key)].map((k) => k.toString('base64'));
    const handle = await open(temporary, 'wx', 0o600);
    try {
      await handle.writeFile(`${lines.join('\n')}\n`);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temporary, file);
    return localKeyVersion(key);
  } finally {
    key.fill(0);
    for (const k of existing.keys) k.key.fill(0);
  }
}
