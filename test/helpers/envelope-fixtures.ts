/**
 * Shared fixtures for the envelope tests and the golden-vector generator: real key
 * backends (local AES key files, RSA-OAEP-256 with 4096-bit keys), a Plugin built
 * around injected backends, and helpers that re-encode an envelope's header so tests
 * can strip, reorder or replace copies while keeping the original payload.
 */
import { constants, createHash, createPrivateKey, createPublicKey, privateDecrypt, publicEncrypt, randomUUID, type KeyObject } from 'node:crypto';
import { chmod, copyFile, mkdtemp, readFile, rename, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { contextBytes, type KeyBackend, type WrapContext, type WrappedKey } from '../../src/backends/backend.ts';
import { LocalKeyBackend, generateKeyFile } from '../../src/backends/local.ts';
import { parseConfig } from '../../src/config/load.ts';
import { TrousseauError, errorCodeOf, type ErrorCode } from '../../src/errors.ts';
import { encodeHeader, type CopyToEncode, type ParsedEnvelope } from '../../src/envelope/format.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { Metrics } from '../../src/observability/metrics.ts';
import { Plugin } from '../../src/plugin.ts';

export const GOLDEN_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../fixtures/golden');

/**
 * Test-only RSA-OAEP-256 backend. A 4096-bit key gives exactly 512-byte copies, the
 * size that pushes KMS v2 envelopes into annotations. The wrap context is the OAEP
 * label, so a copy moved to another envelope or backend name fails to unwrap, as
 * with the real backends.
 */
export class RsaOaepTestBackend implements KeyBackend {
  readonly kind = 'rsa-oaep-test';
  readonly name: string;
  readonly version: string;
  private readonly privateKey: KeyObject;
  private readonly publicKey: KeyObject;

  constructor(name: string, privateKeyPem: string) {
    this.name = name;
    this.privateKey = createPrivateKey(privateKeyPem);
    this.publicKey = createPublicKey(this.privateKey);
    const spki = this.publicKey.export({ type: 'spki', format: 'der' });
    this.version = `rsa-${createHash('sha256').update(spki).digest('hex').slice(0, 16)}`;
  }

  async currentKeyVersion(): Promise<string> {
    return this.version;
  }

  async wrap(dataKey: Uint8Array, context: WrapContext): Promise<WrappedKey> {
    const wrapped = publicEncrypt(
      { key: this.publicKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256', oaepLabel: contextBytes(context) },
      dataKey,
    );
    return { wrapped, keyVersion: this.version };
  }

  async unwrap(wrapped: Uint8Array, keyVersion: string, context: WrapContext): Promise<Uint8Array> {
    if (keyVersion !== this.version) throw new TrousseauError('BACKEND_REJECTED', `no RSA key with version ${keyVersion}`);
    try {
      return privateDecrypt(
        { key: this.privateKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256', oaepLabel: contextBytes(context) },
        wrapped,
      );
    } catch (error) {
      throw new TrousseauError('BACKEND_REJECTED', 'wrapped key does not decrypt under this RSA key', { cause: error });
    }
  }

  async close(): Promise<void> {}
}

/** Delegates to a shared backend but ignores close(), so one backend can serve many short-lived plugins. */
export class SharedBackend implements KeyBackend {
  readonly name: string;
  readonly kind: string;
  readonly inner: KeyBackend;
  unwrapCalls = 0;
  wrapCalls = 0;

  constructor(inner: KeyBackend) {
    this.inner = inner;
    this.name = inner.name;
    this.kind = inner.kind;
  }

  currentKeyVersion(signal: AbortSignal): Promise<string> {
    return this.inner.currentKeyVersion(signal);
  }

  wrap(dataKey: Uint8Array, context: WrapContext, signal: AbortSignal): Promise<WrappedKey> {
    this.wrapCalls++;
    return this.inner.wrap(dataKey, context, signal);
  }

  unwrap(wrapped: Uint8Array, keyVersion: string, context: WrapContext, signal: AbortSignal): Promise<Uint8Array> {
    this.unwrapCalls++;
    return this.inner.unwrap(wrapped, keyVersion, context, signal);
  }

  async close(): Promise<void> {}
}

/** A backend that is down: every call fails as unavailable (used to make partially wrapped envelopes). */
export class DownBackend implements KeyBackend {
  readonly kind = 'down';
  readonly name: string;

  constructor(name: string) {
    this.name = name;
  }

  private failure(): TrousseauError {
    return new TrousseauError('BACKEND_UNAVAILABLE', `backend ${this.name} is down (test)`);
  }

  currentKeyVersion(): Promise<string> {
    return Promise.reject(this.failure());
  }
  wrap(): Promise<WrappedKey> {
    return Promise.reject(this.failure());
  }
  unwrap(): Promise<Uint8Array> {
    return Promise.reject(this.failure());
  }
  async close(): Promise<void> {}
}

export interface TempDir {
  dir: string;
  remove: () => Promise<void>;
}

export async function makeTempDir(prefix = 'trousseau-envelope-'): Promise<TempDir> {
  const dir = await mkdtemp(path.join(tmpdir(), prefix));
  return { dir, remove: () => rm(dir, { recursive: true, force: true }) };
}

/** `count` LocalKeyBackends named local-0..local-(count-1), each with a fresh key file in `dir`. */
export async function freshLocalBackends(dir: string, count: number, prefix = 'local'): Promise<LocalKeyBackend[]> {
  const backends: LocalKeyBackend[] = [];
  for (let i = 0; i < count; i++) {
    const file = path.join(dir, `${prefix}-${i}.key`);
    await generateKeyFile(file);
    backends.push(new LocalKeyBackend(`${prefix}-${i}`, file));
  }
  return backends;
}

/**
 * A committed golden key file, copied to `dir` and chmod 0600 there: git does not keep
 * file modes and LocalKeyBackend refuses group- or world-readable key files.
 */
export async function goldenLocalBackend(name: string, relativeKeyFile: string, dir: string): Promise<LocalKeyBackend> {
  const target = path.join(dir, path.basename(relativeKeyFile));
  // Copy aside and rename over: tests running at once share `dir`, and copyFile onto the
  // file another backend is reading would show it an empty key file.
  const staged = `${target}.${randomUUID()}`;
  await copyFile(path.join(GOLDEN_DIR, relativeKeyFile), staged);
  await chmod(staged, 0o600);
  await rename(staged, target);
  return new LocalKeyBackend(name, target);
}

export async function goldenRsaBackend(name: string, relativePemFile: string): Promise<RsaOaepTestBackend> {
  return new RsaOaepTestBackend(name, await readFile(path.join(GOLDEN_DIR, relativePemFile), 'utf8'));
}

export interface PluginOptions {
  quorum?: number;
  /** Decrypt priority per backend name (lower is tried first); default 100. */
  priorities?: Record<string, number>;
  hedging?: boolean;
  stragglerGraceMs?: number;
}

export interface TestPlugin {
  plugin: Plugin;
  metrics: Metrics;
  close: () => Promise<void>;
}

/** A Plugin over injected backends; the config only carries names, priorities and policy. */
export function makePlugin(backends: readonly KeyBackend[], options: PluginOptions = {}): TestPlugin {
  const config = parseConfig({
    quorum: options.quorum ?? 1,
    // The longest timeouts the schema allows: these tests check envelopes, not latency,
    // and must not flake when the whole suite shares two busy cores.
    backends: backends.map((b) => ({ name: b.name, type: 'local', keyFile: 'injected', priority: options.priorities?.[b.name] ?? 100, timeoutMs: 2900 })),
    encrypt: { stragglerGraceMs: options.stragglerGraceMs ?? 150, deadlineMs: 2900 },
    decrypt: { hedging: { enabled: options.hedging ?? false }, deadlineMs: 2900 },
  });
  const metrics = new Metrics();
  const plugin = new Plugin({ config, baseDir: '.', logger: silentLogger(), metrics, backends: [...backends] });
  return { plugin, metrics, close: () => plugin.close() };
}

/** Rebuild an envelope with a different list of copies (or header fields), keeping the original payload. */
export function reencode(
  envelope: ParsedEnvelope,
  changes: { copies?: readonly CopyToEncode[]; quorum?: number; configuredBackends?: number; commitment?: Uint8Array } = {},
): Buffer {
  const header = encodeHeader({
    envelopeId: envelope.envelopeId,
    quorum: changes.quorum ?? envelope.quorum,
    configuredBackends: changes.configuredBackends ?? envelope.configuredBackends,
    copies: changes.copies ?? copiesOf(envelope),
    commitment: changes.commitment ?? envelope.commitment,
    nonce: envelope.nonce,
    payloadLength: envelope.sealedPayload.length,
  });
  return Buffer.concat([header, envelope.sealedPayload]);
}

/** The parsed copies in encodable form (annotation copies must have been resolved). */
export function copiesOf(envelope: ParsedEnvelope): CopyToEncode[] {
  return envelope.copies.map((c) => {
    if (!c.wrapped) throw new Error(`copy ${c.backendName} was not resolved from the annotations`);
    return { backendName: c.backendName, keyVersion: c.keyVersion, location: c.location, wrapped: c.wrapped };
  });
}

export type DecryptOutcome = { ok: true; plaintext: Buffer } | { ok: false; code: ErrorCode; error: unknown };

/** Decrypt and report the outcome instead of throwing. */
export async function tryDecrypt(plugin: Plugin, ciphertext: Uint8Array, annotations: ReadonlyMap<string, Uint8Array> = new Map()): Promise<DecryptOutcome> {
  try {
    return { ok: true, plaintext: await plugin.decrypt(Buffer.from(ciphertext), annotations, AbortSignal.timeout(5000)) };
  } catch (error) {
    return { ok: false, code: errorCodeOf(error), error };
  }
}

/** Error codes a tampered or malformed envelope may legitimately produce. */
export const REJECTION_CODES: readonly ErrorCode[] = ['INVALID_INPUT', 'TAMPERED', 'BACKEND_REJECTED'];
