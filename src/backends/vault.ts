/**
 * HashiCorp Vault / OpenBao transit backend.
 *
 * Wraps data keys with `transit/encrypt/<key>` (AES-256-GCM keys; the envelope context
 * goes in as `associated_data`, so a copy moved to another envelope fails to decrypt
 * at the server) and unwraps them with `transit/decrypt/<key>`. The key version is
 * transit's `latest_version` and that version's creation time, both read from
 * `transit/keys/<key>`: "3@1733076000". The version number alone would name the key
 * material of a transit key that was deleted and re-created under the same name with
 * the same key_id as the old one; its creation time tells them apart (to the second,
 * which is all the API exposes). Rotating the transit key changes key_id while older
 * copies still unwrap. Envelopes written before the creation time was recorded carry
 * the bare number ("3") and unwrap as before.
 *
 * Authentication: a token file (re-read when it changes, e.g. written by Vault Agent),
 * AppRole, Kubernetes or JWT login. Tokens are renewed before they expire and, when the
 * server refuses a token that has been revoked or has expired, the backend logs in
 * again once and retries; it never crashes the plugin over a token.
 *
 * HTTP goes through node-vault (paths, headers, namespace, error bodies) with our own
 * request function plugged in: node-vault's built-in axios wrapper drops per-request
 * options such as `signal`, so a call could not be aborted. The request function uses
 * node:http/https directly, which honours AbortSignal and our TLS settings.
 */
import { stat } from 'node:fs/promises';
import type http from 'node:http';
import type https from 'node:https';
import path from 'node:path';
import type NodeVaultModule from 'node-vault';
import type { Logger } from 'pino';
import { z } from 'zod';
import { readCredentialFile } from '../config/trusted-path.ts';
import { TrousseauError } from '../errors.ts';
import { contextBytes, type KeyBackend, type WrapContext, type WrappedKey } from './backend.ts';
import { Coalescer } from './coalescer.ts';
import { keepAliveHttpsAgent } from './https-agent.ts';
import { commonBackendFields, type BackendDefinition, type BackendMetrics } from './definition.ts';

// The CommonJS modules, not ESM imports: importing node:http from ESM builds its
// namespace, which reads the lazy WebSocket getters and so loads Node's bundled undici
// (about 13 MiB of RSS). This module is loaded by every plugin, Vault configured or not.
const httpModule = process.getBuiltinModule('node:http');
const httpsModule = process.getBuiltinModule('node:https');

const DATA_KEY_BYTES = 32;
/** Transit ciphertexts of 32-byte keys are ~70 characters; anything far larger is not ours. */
const MAX_CIPHERTEXT_CHARS = 4096;
const MAX_RESPONSE_BYTES = 1024 * 1024;
/** Deadline of background calls (login, renew) that no caller waits on directly. */
const BACKGROUND_TIMEOUT_MS = 10_000;
/** After a failed login, callers fail fast for this long instead of hammering the auth endpoint. */
const LOGIN_RETRY_MS = 1000;
/** A token file is read again at least this often even when its stat is unchanged. */
const TOKEN_FILE_RECHECK_MS = 1000;
/** Delay before retrying a renewal that failed for a transient reason. */
const RENEW_RETRY_MS = 5000;
/** Renew (or log in again) when this fraction of the token's TTL has passed. */
const RENEW_AT_FRACTION = 2 / 3;
const CIPHERTEXT_PATTERN = /^vault:v([1-9][0-9]{0,9}):[A-Za-z0-9+/]+={0,2}$/;
/** A recorded key version: "<transit version>@<its creation time, unix seconds>", or the bare number of older envelopes. */
const KEY_VERSION_PATTERN = /^([1-9][0-9]{0,9})(?:@([0-9]{1,12}))?$/;

/**
 * Up to 4 transit requests of each kind in flight before calls coalesce, at most 64 data
 * keys in one: 4 x 64 keys per round trip, 12,800 keys/s at 20 ms, well above a
 * cluster's cold start, while a lightly loaded plugin (4 calls in flight or fewer) never
 * waits. With 8 in flight batches stayed smaller under the benchmark's load and an
 * Encrypt with three backends cost more CPU; 2 gained nothing over 4 (docs/performance.md).
 */
const DEFAULT_BATCH = { maxItems: 64, maxRequests: 4 };

const relativePath = z.string().min(1);
const pathSegments = z
  .string()
  .regex(/^[A-Za-z0-9_.-]+(\/[A-Za-z0-9_.-]+)*$/, 'must be a mount path such as "transit" or "team/transit", without leading or trailing "/"');

const tokenAuth = z
  .object({
    method: z.literal('token'),
    /** File holding the token (e.g. written by Vault Agent); re-read whenever it changes. */
    tokenFile: relativePath,
  })
  .strict();

const approleAuth = z
  .object({
    method: z.literal('approle'),
    /** The role_id (not a secret); give this or roleIdFile. */
    roleId: z.string().min(1).optional(),
    /** File holding the role_id; give this or roleId. */
    roleIdFile: relativePath.optional(),
    /** File holding the secret_id; re-read at every login. */
    secretIdFile: relativePath,
    /** Mount path of the AppRole auth method (default "approle"). */
    mount: pathSegments.default('approle'),
  })
  .strict()
  .refine((a) => (a.roleId === undefined) !== (a.roleIdFile === undefined), {
    message: 'give exactly one of roleId and roleIdFile',
    path: ['roleId'],
  });

const kubernetesAuth = z
  .object({
    method: z.literal('kubernetes'),
    /** Vault role bound to the plugin's service account. */
    role: z.string().min(1),
    /** Projected service account token, re-read at every login. */
    tokenFile: relativePath.default('/var/run/secrets/kubernetes.io/serviceaccount/token'),
    /** Mount path of the Kubernetes auth method (default "kubernetes"). */
    mount: pathSegments.default('kubernetes'),
  })
  .strict();

const jwtAuth = z
  .object({
    method: z.literal('jwt'),
    /** Vault role of the JWT auth method. */
    role: z.string().min(1),
    /** File holding the JWT, re-read at every login. */
    tokenFile: relativePath,
    /** Mount path of the JWT auth method (default "jwt"). */
    mount: pathSegments.default('jwt'),
  })
  .strict();

export const vaultConfigSchema = z
  .object({
    ...commonBackendFields,
    type: z.literal('vault'),
    /** Server address, e.g. "https://vault.example:8200". */
    address: z.url({ protocol: /^https?$/, error: 'must be an http:// or https:// URL' }),
    /** Vault Enterprise / OpenBao namespace, sent as X-Vault-Namespace. */
    namespace: z.string().min(1).optional(),
    /** TLS settings for an https address; the system CAs are used when caFile is absent. */
    tls: z
      .object({
        /** PEM bundle of CAs trusted for the server certificate. */
        caFile: relativePath.optional(),
        /** PEM client certificate, for servers that require mutual TLS. */
        certFile: relativePath.optional(),
        /** PEM private key of certFile. */
        keyFile: relativePath.optional(),
        /** Name to verify the server certificate against, when it differs from the address host. */
        serverName: z.string().min(1).optional(),
      })
      .strict()
      .refine((t) => (t.certFile === undefined) === (t.keyFile === undefined), {
        message: 'certFile and keyFile go together',
        path: ['certFile'],
      })
      .optional(),
    /** Mount path of the transit secrets engine (default "transit"). */
    transitMount: pathSegments.default('transit'),
    /** Name of the transit key (type aes256-gcm96 or chacha20-poly1305, which take associated_data). */
    keyName: z.string().regex(/^[A-Za-z0-9_.-]+$/, 'must be a transit key name (letters, digits, "_", ".", "-")'),
    /** How long, in milliseconds, the key's latest_version is cached (default 5000); a rotation shows up in key_id within this time. */
    keyVersionRefreshMs: z.number().int().min(0).max(300_000).default(5000),
    /**
     * Concurrent wraps (and, separately, unwraps) go to transit together as one batch
     * request when requests are already in flight: the per-request cost (HTTP, JSON, the
     * server's token check and audit entry) is then paid once per batch.
     */
    batch: z
      .object({
        /** Data keys in one transit request at most (default 64); 1 turns batching off: one request per data key, and none waits. */
        maxItems: z.number().int().min(1).max(256).default(DEFAULT_BATCH.maxItems),
        /** Encrypt requests (and decrypt requests) in flight at once; calls beyond wait and go together in the next one (default 4). */
        maxRequests: z.number().int().min(1).max(1024).default(DEFAULT_BATCH.maxRequests),
      })
      .strict()
      .default(DEFAULT_BATCH),
    auth: z.discriminatedUnion('method', [tokenAuth, approleAuth, kubernetesAuth, jwtAuth]),
  })
  .strict();

export type VaultBackendConfig = z.output<typeof vaultConfigSchema>;
type AuthConfig = VaultBackendConfig['auth'];

export const vaultBackend: BackendDefinition<typeof vaultConfigSchema> = {
  type: 'vault',
  configSchema: vaultConfigSchema,
  create: async (config, deps) => {
    await loadVaultSdk();
    return new VaultBackend(config, { baseDir: deps.baseDir, logger: deps.logger, metrics: deps.metrics });
  },
};

// node-vault, bound by loadVaultSdk(): only a plugin with a vault backend loads it (definition.ts).
let NodeVault: typeof NodeVaultModule | undefined;

/** Load node-vault (once); vaultBackend.create does, code that builds a VaultBackend itself must first. */
export async function loadVaultSdk(): Promise<void> {
  NodeVault ??= (await import('node-vault')).default;
}

export interface VaultBackendOptions {
  /** Folder relative file paths are resolved against. */
  baseDir: string;
  logger?: Logger;
  /** Told the size of every transit request (data keys per batch). */
  metrics?: BackendMetrics;
}

type VaultClient = ReturnType<typeof NodeVaultModule>;

/** The request shape node-vault hands to its pluggable request function. */
interface RawRequest {
  method: string;
  uri: string;
  headers?: Record<string, string>;
  json?: unknown;
  signal?: AbortSignal;
}

interface RawResponse {
  statusCode: number;
  body: unknown;
  request: { path: string };
}

/** One data key's part of a transit batch request (`batch_input` entry, before its reference is added). */
type TransitItem = Record<'plaintext' | 'associated_data', string> | Record<'ciphertext' | 'associated_data', string>;

/** One entry of a transit batch answer, as far as it is read. */
interface TransitResult {
  reference?: unknown;
  error?: unknown;
  ciphertext?: unknown;
  plaintext?: unknown;
}

interface TokenState {
  token: string;
  /** For the token method: identity of the file content this token came from. */
  fileStamp?: string;
}

export class VaultBackend implements KeyBackend {
  readonly kind = 'vault';
  readonly name: string;
  private readonly config: VaultBackendConfig;
  private readonly baseDir: string;
  private readonly logger: Logger | undefined;
  private readonly metrics: BackendMetrics | undefined;
  private readonly client: VaultClient;
  private readonly httpAgent = new httpModule.Agent({ keepAlive: true });
  private httpsAgent: https.Agent | undefined;
  /** Aborts background requests (login, renew) on close. */
  private readonly lifetime = new AbortController();
  private current: TokenState | undefined;
  private login: Promise<TokenState> | undefined;
  private lastLoginFailure: { at: number; error: TrousseauError } | undefined;
  private lastFileRead: number | undefined;
  private timer: NodeJS.Timeout | undefined;
  /** The key's latest version and every version's creation time (unix seconds), as last read. */
  private keyInfo: { latest: number; created: ReadonlyMap<number, number>; at: number } | undefined;
  /** When `token` expires (ms since the epoch); `at` undefined: it never does (root-like) or is not known. */
  private expiry: { token: string; at: number | undefined } | undefined;
  private closed = false;
  /** Wraps and unwraps on their way to transit, coalesced into batch requests under load. */
  private readonly encrypts: Coalescer<TransitItem, string>;
  private readonly decrypts: Coalescer<TransitItem, Buffer>;

  constructor(config: VaultBackendConfig, options: VaultBackendOptions) {
    this.name = config.name;
    this.config = config;
    this.baseDir = options.baseDir;
    this.metrics = options.metrics;
    // The plugin hands every backend a logger already bound to its name (plugin.ts):
    // binding it again would write the "backend" key twice in every line.
    const named = options.logger?.bindings().backend === config.name;
    this.logger = options.logger?.child(named ? { kind: 'vault' } : { backend: config.name, kind: 'vault' });
    if (!NodeVault) throw new Error('VaultBackend built before loadVaultSdk()');
    this.client = NodeVault({
      endpoint: config.address,
      // node-vault logs request bodies (plaintext keys, secret_ids) when DEBUG matches it.
      debug: () => undefined,
      'request-promise': { defaults: () => (request: RawRequest) => this.send(request) },
    });
    // node-vault falls back to VAULT_TOKEN, VAULT_NAMESPACE and VAULT_PREFIX from the
    // environment; the configuration file is the only source here.
    this.client.token = '';
    // maxItems 1 is batching off: each call its own request at once, as many as the
    // engine's admission control lets through.
    const batch = { maxItems: config.batch.maxItems, maxRequests: config.batch.maxItems === 1 ? Infinity : config.batch.maxRequests };
    this.encrypts = new Coalescer((items, signal) => this.transitBatch('encrypt', items, signal, (result) => this.ciphertextOf(result)), batch);
    this.decrypts = new Coalescer(
      (items, signal) => this.transitBatch('decrypt', items, signal, (result) => this.dataKeyOf(result)),
      batch,
      (key) => key.fill(0), // a key that arrived after its caller gave up
    );
    (this.client as { namespace?: string }).namespace = config.namespace;
    (this.client as { pathPrefix?: string }).pathPrefix = '';
  }

  async currentKeyVersion(signal: AbortSignal): Promise<string> {
    const cached = this.keyInfo;
    const info = cached && Date.now() - cached.at < this.config.keyVersionRefreshMs ? cached : await this.readKey(signal);
    return this.recordedVersion(info, info.latest);
  }

  /** Read the transit key: its latest version and the creation time of each version. */
  private async readKey(signal: AbortSignal): Promise<NonNullable<VaultBackend['keyInfo']>> {
    const body = await this.call<unknown>('read key', signal, (token) =>
      this.client.read(`${this.config.transitMount}/keys/${this.config.keyName}`, this.requestOptions(token, signal)),
    );
    const data = (body as { data?: { latest_version?: unknown; keys?: unknown } } | undefined)?.data;
    const latest = data?.latest_version;
    if (typeof latest !== 'number' || !Number.isSafeInteger(latest) || latest < 1) {
      throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name}: key read returned no latest_version`);
    }
    const created = new Map<number, number>();
    const keys = data?.keys;
    if (keys !== null && typeof keys === 'object') {
      for (const [version, value] of Object.entries(keys as Record<string, unknown>)) {
        const seconds = creationSeconds(value);
        if (/^[1-9][0-9]{0,9}$/.test(version) && seconds !== undefined) created.set(Number(version), seconds);
      }
    }
    if (!created.has(latest)) {
      throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name}: key read returned no creation time for version ${latest}`);
    }
    const info = { latest, created, at: Date.now() };
    this.keyInfo = info;
    return info;
  }

  /** "3@1733076000": the version and its creation time, which tell a re-created key from the old one. */
  private recordedVersion(info: NonNullable<VaultBackend['keyInfo']>, version: number): string {
    const created = info.created.get(version);
    if (created === undefined) throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name}: no creation time known for key version ${version}`);
    return `${version}@${created}`;
  }

  async wrap(dataKey: Uint8Array, context: WrapContext, signal: AbortSignal): Promise<WrappedKey> {
    this.throwIfClosed();
    const ciphertext = await this.encrypts.submit(
      { plaintext: Buffer.from(dataKey).toString('base64'), associated_data: contextBytes(context).toString('base64') },
      signal,
    );
    const version = Number(CIPHERTEXT_PATTERN.exec(ciphertext)?.[1]);
    // A wrap made with a version the cache does not know means the key rotated (or was
    // re-created): read it again so the copy records that version's creation time.
    let info = this.keyInfo;
    if (!info?.created.has(version)) info = await this.readKey(signal);
    return { wrapped: Buffer.from(ciphertext, 'utf8'), keyVersion: this.recordedVersion(info, version) };
  }

  async unwrap(wrapped: Uint8Array, keyVersion: string, context: WrapContext, signal: AbortSignal): Promise<Uint8Array> {
    const ciphertext = Buffer.from(wrapped).toString('latin1');
    const match = wrapped.length <= MAX_CIPHERTEXT_CHARS ? CIPHERTEXT_PATTERN.exec(ciphertext) : null;
    if (!match) throw new TrousseauError('BACKEND_REJECTED', `vault backend ${this.name}: wrapped key is not a transit ciphertext`);
    // The creation time is not checked here: only the server knows whether it still
    // holds that key material, and a cached key read may be older than the envelope.
    const recorded = KEY_VERSION_PATTERN.exec(keyVersion);
    if (recorded?.[1] !== match[1]) {
      throw new TrousseauError('BACKEND_REJECTED', `vault backend ${this.name}: wrapped key was made by key version ${match[1]}, not the recorded one`);
    }
    this.throwIfClosed();
    return this.decrypts.submit({ ciphertext, associated_data: contextBytes(context).toString('base64') }, signal);
  }

  /** What a batch result holds for an encrypt: the transit ciphertext. */
  private ciphertextOf(result: TransitResult): string {
    const ciphertext = result.ciphertext;
    if (typeof ciphertext !== 'string' || !CIPHERTEXT_PATTERN.test(ciphertext)) {
      throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name}: encrypt returned no transit ciphertext`);
    }
    return ciphertext;
  }

  /** What a batch result holds for a decrypt: the data key. */
  private dataKeyOf(result: TransitResult): Buffer {
    if (typeof result.plaintext !== 'string') {
      throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name}: decrypt returned no plaintext`);
    }
    const key = Buffer.from(result.plaintext, 'base64');
    if (key.length !== DATA_KEY_BYTES) {
      key.fill(0);
      throw new TrousseauError('BACKEND_REJECTED', `vault backend ${this.name}: ciphertext does not hold a ${DATA_KEY_BYTES}-byte data key`);
    }
    return key;
  }

  /**
   * One transit encrypt or decrypt request for several data keys (`batch_input`), each
   * tagged with its position as `reference`. Vault answers 400 when it refused an item
   * (a ciphertext that does not open, say) and 500 when an item failed inside it, with
   * every item's result in the body either way: one caller's bad copy must not fail the
   * others' calls, and is refused as it would have been alone. A refusal of the request
   * itself (403, an unknown key) fails every item, as it would have failed each call.
   */
  private async transitBatch<R>(
    what: 'encrypt' | 'decrypt',
    items: readonly TransitItem[],
    batchSignal: AbortSignal,
    read: (result: TransitResult) => R,
  ): Promise<Array<R | Error>> {
    const signal = AbortSignal.any([batchSignal, this.lifetime.signal]);
    const input = items.map((item, index) => ({ ...item, reference: String(index) }));
    this.metrics?.keysPerRequest(what === 'encrypt' ? 'wrap' : 'unwrap', items.length);
    const answer = await this.call(what, signal, (token) =>
      this.client.write(`${this.config.transitMount}/${what}/${this.config.keyName}`, { batch_input: input }, this.requestOptions(token, signal)).then(
        (body: unknown) => ({ status: 200, body }),
        (error: unknown) => {
          const status = statusOf(error);
          const body = (error as { response?: { body?: unknown } } | null)?.response?.body;
          if ((status === 400 || status === 500) && batchResultsOf(body)) return { status, body };
          throw error;
        },
      ),
    );
    const results = batchResultsOf(answer.body);
    // Every result must be where its item was: a key handed to the wrong caller would
    // only fail later, at the envelope's commitment check, so refuse the answer here.
    if (results?.length !== items.length || results.some((result, index) => result?.reference !== String(index))) {
      throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name}: ${what} answer does not match its batch request`);
    }
    return results.map((result) => {
      if (typeof result.error === 'string' && result.error !== '') return this.itemError(what, answer.status, result.error);
      try {
        return read(result);
      } catch (error) {
        return error instanceof Error ? error : new Error(String(error));
      }
    });
  }

  /** One item's error in a batch answer, classified as the same answer to that item alone would have been. */
  private itemError(what: string, status: number, text: string): TrousseauError {
    const reason = knownPhrase(text);
    const detail = `HTTP ${status}${reason ? ` (${reason})` : ''}`;
    return status >= 500
      ? new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name}: ${what} failed: ${detail}`)
      : new TrousseauError('BACKEND_REJECTED', `vault backend ${this.name}: ${what} refused: ${detail}`);
  }

  private throwIfClosed(): void {
    if (this.closed) throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name} is closed`);
  }

  /**
   * When the token in use expires if it is not renewed or replaced, as last learnt from
   * login, renew-self or lookup-self. Undefined for a token without TTL, before the first
   * call, and while no token is held.
   */
  credentialExpiresAt(): number | undefined {
    const expiry = this.expiry;
    return expiry && expiry.token === this.current?.token ? expiry.at : undefined;
  }

  close(): Promise<void> {
    this.closed = true;
    this.clearTimer();
    this.lifetime.abort(new TrousseauError('SHUTTING_DOWN', `vault backend ${this.name} is closed`));
    const closed = new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name} is closed`);
    this.encrypts.failAll(closed);
    this.decrypts.failAll(closed);
    this.current = undefined;
    this.login = undefined;
    this.httpAgent.destroy();
    this.httpsAgent?.destroy();
    return Promise.resolve();
  }

  // ---------------------------------------------------------------- calls and errors

  private requestOptions(token: string, signal: AbortSignal): { headers: Record<string, string>; signal: AbortSignal } {
    return { headers: { 'X-Vault-Token': token }, signal };
  }

  /**
   * Run one authenticated call. On a 403 the token is checked with lookup-self: a
   * token the server no longer knows (revoked, expired) is replaced once and the call
   * retried; a valid token that is refused is a policy decision and is not retried.
   */
  private async call<T>(what: string, signal: AbortSignal, body: (token: string) => Promise<T>): Promise<T> {
    if (this.closed) throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name} is closed`);
    signal.throwIfAborted();
    const used = await this.token(signal);
    try {
      return await body(used.token);
    } catch (error) {
      if (signal.aborted || statusOf(error) !== 403) throw this.classify(error, what, signal);
      const replacement = await this.replaceRefusedToken(used, signal);
      if (!replacement) throw this.classify(error, what, signal);
      try {
        return await body(replacement.token);
      } catch (retryError) {
        throw this.classify(retryError, what, signal);
      }
    }
  }

  private classify(error: unknown, what: string, signal: AbortSignal): unknown {
    if (signal.aborted) return signal.reason ?? error;
    if (error instanceof TrousseauError) return error;
    const prefix = `vault backend ${this.name}: ${what}`;
    const status = statusOf(error);
    if (status !== undefined) {
      const reason = knownReason(error);
      const detail = `HTTP ${status}${reason ? ` (${reason})` : ''}`;
      // 412 is Vault's "not yet replicated to this standby"; 408/429/5xx pass with time.
      if (status === 408 || status === 412 || status === 429 || status >= 500) {
        return new TrousseauError('BACKEND_UNAVAILABLE', `${prefix} failed: ${detail}`, { cause: error });
      }
      return new TrousseauError('BACKEND_REJECTED', `${prefix} refused: ${detail}`, { cause: error });
    }
    const code = (error as { code?: unknown } | null)?.code;
    const safeCode = typeof code === 'string' && /^[A-Z0-9_]{1,40}$/.test(code) ? code : 'error';
    return new TrousseauError('BACKEND_UNAVAILABLE', `${prefix} failed: cannot reach ${this.config.address} (${safeCode})`, { cause: error });
  }

  /** Returns the token to retry with, or undefined when the refusal is the policy's. */
  private async replaceRefusedToken(used: TokenState, signal: AbortSignal): Promise<TokenState | undefined> {
    if (this.current && this.current.token !== used.token) return this.current; // someone already replaced it
    try {
      await this.client.read('auth/token/lookup-self', this.requestOptions(used.token, signal));
      return undefined; // the token is alive, so the 403 was about the path
    } catch (error) {
      if (signal.aborted || statusOf(error) !== 403) throw this.classify(error, 'token lookup', signal);
    }
    this.logger?.info('vault token was refused and is no longer valid; authenticating again');
    if (this.current?.token === used.token) this.current = undefined;
    this.clearTimer();
    const fresh = await this.token(signal, used.token);
    if (fresh.token === used.token) {
      // Only a token file can hand back the same dead token: wait for it to be rewritten.
      throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name}: the token is no longer valid and no new one is available yet`);
    }
    return fresh;
  }

  // ---------------------------------------------------------------- tokens

  /** The token to use now; `stale` is a token known to be dead that must not be returned. */
  private async token(signal: AbortSignal, stale?: string): Promise<TokenState> {
    const auth = this.config.auth;
    if (auth.method === 'token') return this.tokenFromFile(auth.tokenFile, stale !== undefined);
    if (this.current && this.current.token !== stale) return this.current;
    const failure = this.lastLoginFailure;
    if (failure && Date.now() - failure.at < LOGIN_RETRY_MS) throw failure.error;
    this.login ??= this.logIn(auth).finally(() => {
      this.login = undefined;
    });
    return raceAbort(this.login, signal);
  }

  private async tokenFromFile(file: string, force: boolean): Promise<TokenState> {
    const full = path.resolve(this.baseDir, file);
    let stamp: string;
    try {
      const info = await stat(full);
      stamp = `${info.ino}:${info.size}:${info.mtimeMs}:${info.ctimeMs}`;
      // The stamp catches a rewrite at once; the periodic re-read catches one the stamp
      // misses (same size within a coarse mtime tick).
      const fresh = this.lastFileRead !== undefined && Date.now() - this.lastFileRead < TOKEN_FILE_RECHECK_MS;
      if (!force && fresh && this.current && this.current.fileStamp === stamp) return this.current;
      const token = (await readCredentialFile(full, `vault backend ${this.name}: token file`)).content.toString('utf8').trim();
      this.lastFileRead = Date.now();
      if (!token) throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name}: token file ${file} is empty`);
      const changed = this.current?.token !== token;
      this.current = { token, fileStamp: stamp };
      if (changed) this.scheduleTokenWatch(token);
      return this.current;
    } catch (error) {
      if (error instanceof TrousseauError) throw unavailable(error);
      throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name}: token file ${file} cannot be read (${errnoOf(error)})`, {
        cause: error,
      });
    }
  }

  private async logIn(auth: Exclude<AuthConfig, { method: 'token' }>): Promise<TokenState> {
    const signal = AbortSignal.any([this.lifetime.signal, AbortSignal.timeout(BACKGROUND_TIMEOUT_MS)]);
    try {
      const payload = await this.loginPayload(auth);
      const sentAt = Date.now();
      const body = (await this.client.write(`auth/${auth.mount}/login`, payload, { signal })) as { auth?: LoginAuth } | undefined;
      const token = body?.auth?.client_token;
      if (typeof token !== 'string' || !token) throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name}: login returned no token`);
      if (this.closed) throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name} is closed`);
      this.current = { token };
      this.lastLoginFailure = undefined;
      this.scheduleAfterLease(token, body?.auth?.lease_duration, body?.auth?.renewable === true, undefined, sentAt);
      this.logger?.info({ method: auth.method }, 'logged in to vault');
      return this.current;
    } catch (error) {
      const failure =
        error instanceof TrousseauError && error.code === 'BACKEND_UNAVAILABLE'
          ? error
          : new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name}: ${auth.method} login failed (${describe(error)})`, { cause: error });
      this.lastLoginFailure = { at: Date.now(), error: failure };
      this.logger?.warn({ method: auth.method, reason: failure.message }, 'vault login failed');
      throw failure;
    }
  }

  private async loginPayload(auth: Exclude<AuthConfig, { method: 'token' }>): Promise<Record<string, string>> {
    switch (auth.method) {
      case 'approle':
        return {
          role_id: auth.roleId ?? (await this.readSecretFile(auth.roleIdFile ?? '', 'role_id')),
          secret_id: await this.readSecretFile(auth.secretIdFile, 'secret_id'),
        };
      case 'kubernetes':
      case 'jwt':
        return { role: auth.role, jwt: await this.readSecretFile(auth.tokenFile, 'JWT') };
    }
  }

  private async readSecretFile(file: string, what: string): Promise<string> {
    let text: string;
    try {
      text = (await readCredentialFile(path.resolve(this.baseDir, file), `vault backend ${this.name}: ${what} file`)).content.toString('utf8').trim();
    } catch (error) {
      if (error instanceof TrousseauError) throw unavailable(error);
      throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name}: ${what} file ${file} cannot be read (${errnoOf(error)})`, {
        cause: error,
      });
    }
    if (!text) throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name}: ${what} file ${file} is empty`);
    return text;
  }

  /** For a token read from a file, learn its TTL so that it is renewed in time. */
  private scheduleTokenWatch(token: string): void {
    this.clearTimer();
    const signal = AbortSignal.any([this.lifetime.signal, AbortSignal.timeout(BACKGROUND_TIMEOUT_MS)]);
    const sentAt = Date.now();
    void this.client.read('auth/token/lookup-self', this.requestOptions(token, signal)).then(
      (body: { data?: { ttl?: unknown; renewable?: unknown } } | undefined) => {
        const ttl = body?.data?.ttl;
        this.scheduleAfterLease(token, typeof ttl === 'number' ? ttl : undefined, body?.data?.renewable === true, undefined, sentAt);
      },
      (error: unknown) => {
        if (this.closed) return;
        // A dead token is handled by the next call (403, file re-read); only a
        // transient failure needs another look later.
        if (statusOf(error) !== 403) this.setTimer(() => this.scheduleTokenWatch(token), RENEW_RETRY_MS);
      },
    );
  }

  /**
   * Plan the next step for `token` after learning it lives `ttlSeconds` more: renew it
   * if it is renewable and renewal still extends it; otherwise, for login methods, log
   * in again before it expires. A token without TTL (ttl 0) needs nothing. `sentAt` is
   * when the request that reported the TTL left: counting from then errs early.
   */
  private scheduleAfterLease(token: string, ttlSeconds: number | undefined, renewable: boolean, previousTtl: number | undefined, sentAt: number): void {
    this.clearTimer();
    if (this.closed || this.current?.token !== token) return;
    const known = typeof ttlSeconds === 'number' && Number.isFinite(ttlSeconds);
    this.expiry = { token, at: known && ttlSeconds > 0 ? sentAt + ttlSeconds * 1000 : undefined };
    if (ttlSeconds === undefined || ttlSeconds <= 0) return;
    const delay = Math.max(500, ttlSeconds * 1000 * RENEW_AT_FRACTION);
    const canLogIn = this.config.auth.method !== 'token';
    // Renewal that no longer extends the token means its max TTL is near.
    const capped = previousTtl !== undefined && ttlSeconds < previousTtl * RENEW_AT_FRACTION;
    if (renewable && !(capped && canLogIn)) {
      this.setTimer(() => this.renew(token, ttlSeconds), delay);
    } else if (canLogIn) {
      this.setTimer(() => this.refreshLogin(token), delay);
    }
  }

  private renew(token: string, ttlSeconds: number): void {
    const signal = AbortSignal.any([this.lifetime.signal, AbortSignal.timeout(BACKGROUND_TIMEOUT_MS)]);
    const sentAt = Date.now();
    void this.client.write('auth/token/renew-self', {}, this.requestOptions(token, signal)).then(
      (body: { auth?: LoginAuth } | undefined) => {
        this.logger?.debug('renewed vault token');
        this.scheduleAfterLease(token, body?.auth?.lease_duration, body?.auth?.renewable === true, ttlSeconds, sentAt);
      },
      (error: unknown) => {
        if (this.closed || this.current?.token !== token) return;
        this.logger?.warn({ status: statusOf(error), reason: describe(error) }, 'vault token renewal failed');
        if (statusOf(error) === 403) {
          if (this.config.auth.method === 'token') return; // the next call re-reads the file
          this.refreshLogin(token);
        } else {
          this.setTimer(() => this.renew(token, ttlSeconds), RENEW_RETRY_MS);
        }
      },
    );
  }

  /** Log in again in the background, keeping `old` usable until the new token arrives. */
  private refreshLogin(old: string): void {
    const auth = this.config.auth;
    if (this.closed || auth.method === 'token' || this.current?.token !== old) return;
    this.login ??= this.logIn(auth).finally(() => {
      this.login = undefined;
    });
    void this.login.catch(() => {
      if (!this.closed && this.current?.token === old) this.setTimer(() => this.refreshLogin(old), RENEW_RETRY_MS);
    });
  }

  private setTimer(action: () => void, delayMs: number): void {
    this.clearTimer();
    if (this.closed) return;
    this.timer = setTimeout(action, delayMs);
    // Token upkeep must never keep the process alive on its own.
    this.timer.unref();
  }

  private clearTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  // ---------------------------------------------------------------- HTTP

  private async agentFor(url: URL): Promise<http.Agent> {
    if (url.protocol !== 'https:') return this.httpAgent;
    if (this.httpsAgent) return this.httpsAgent;
    const tls = this.config.tls;
    const load = async (file: string | undefined, what: string) => {
      if (file === undefined) return undefined;
      try {
        return (await readCredentialFile(path.resolve(this.baseDir, file), `vault backend ${this.name}: TLS ${what} file`)).content;
      } catch (error) {
        if (error instanceof TrousseauError) throw unavailable(error);
        throw new TrousseauError('BACKEND_UNAVAILABLE', `vault backend ${this.name}: TLS ${what} file ${file} cannot be read (${errnoOf(error)})`, {
          cause: error,
        });
      }
    };
    const [ca, cert, key] = await Promise.all([load(tls?.caFile, 'CA'), load(tls?.certFile, 'certificate'), load(tls?.keyFile, 'key')]);
    this.httpsAgent ??= keepAliveHttpsAgent(`vault backend ${this.name}`, { ca, cert, key, servername: tls?.serverName });
    return this.httpsAgent;
  }

  /** node-vault's pluggable request function: one HTTP exchange, abortable. */
  private async send(request: RawRequest): Promise<RawResponse> {
    const { signal } = request;
    signal?.throwIfAborted();
    const url = new URL(request.uri);
    const agent = await this.agentFor(url);
    signal?.throwIfAborted();
    const payload = request.json !== undefined && typeof request.json === 'object' ? Buffer.from(JSON.stringify(request.json)) : undefined;
    const headers: Record<string, string> = { ...request.headers, accept: 'application/json' };
    if (payload) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = String(payload.length);
    }
    return new Promise<RawResponse>((resolve, reject) => {
      const onAbort = () => {
        outgoing.destroy();
        reject(signal?.reason as Error);
      };
      const finish = () => signal?.removeEventListener('abort', onAbort);
      const outgoing = (url.protocol === 'https:' ? httpsModule : httpModule).request(url, { method: request.method, headers, agent }, (response) => {
        const chunks: Buffer[] = [];
        let size = 0;
        response.on('data', (chunk: Buffer) => {
          size += chunk.length;
          if (size > MAX_RESPONSE_BYTES) outgoing.destroy(new Error('response too large'));
          else chunks.push(chunk);
        });
        response.on('error', (error) => {
          finish();
          reject(error);
        });
        response.on('end', () => {
          finish();
          const text = Buffer.concat(chunks).toString('utf8');
          let body: unknown;
          try {
            body = text ? JSON.parse(text) : undefined;
          } catch {
            body = undefined; // non-JSON bodies (proxies' error pages) keep only their status
          }
          resolve({ statusCode: response.statusCode ?? 0, body, request: { path: url.pathname } });
        });
      });
      outgoing.on('error', (error) => {
        finish();
        reject(error);
      });
      signal?.addEventListener('abort', onAbort, { once: true });
      outgoing.end(payload);
    });
  }
}

interface LoginAuth {
  client_token?: unknown;
  lease_duration?: number;
  renewable?: boolean;
}

/**
 * A version's creation time in unix seconds, as transit reports it: a number for
 * symmetric keys, an object with an RFC 3339 `creation_time` for asymmetric ones.
 */
function creationSeconds(value: unknown): number | undefined {
  if (typeof value === 'number') return Number.isSafeInteger(value) && value >= 0 ? value : undefined;
  const text = (value as { creation_time?: unknown } | null)?.creation_time;
  const ms = typeof text === 'string' ? Date.parse(text) : NaN;
  return Number.isFinite(ms) && ms >= 0 ? Math.floor(ms / 1000) : undefined;
}

function statusOf(error: unknown): number | undefined {
  const status = (error as { response?: { statusCode?: unknown } } | null)?.response?.statusCode;
  return typeof status === 'number' ? status : undefined;
}

/**
 * The server's reason, only when it is one of the fixed phrases below: free-form
 * error text could echo request data, so it stays in `cause`.
 */
function knownReason(error: unknown): string | undefined {
  const errors = (error as { response?: { body?: { errors?: unknown } } } | null)?.response?.body?.errors;
  return knownPhrase(Array.isArray(errors) ? errors.filter((e) => typeof e === 'string').join(' ') : '');
}

/** The first of the fixed phrases below that `text` contains. */
function knownPhrase(text: string): string | undefined {
  const phrases = [
    'permission denied',
    'cipher: message authentication failed',
    'invalid ciphertext length',
    'invalid ciphertext: version is too new',
    'invalid ciphertext: version is disallowed by policy (too old)',
    'invalid ciphertext',
    'encryption key not found',
    'key is not allowed to be used for encryption',
    'Vault is sealed',
    'missing client token',
    'invalid role or secret ID',
    'invalid secret id',
  ];
  return phrases.find((p) => text.includes(p));
}

/** `data.batch_results` of a transit answer, when it is a list of objects. */
function batchResultsOf(body: unknown): TransitResult[] | undefined {
  const results = (body as { data?: { batch_results?: unknown } } | null | undefined)?.data?.batch_results;
  return Array.isArray(results) && results.every((r) => r !== null && typeof r === 'object') ? (results as TransitResult[]) : undefined;
}

function describe(error: unknown): string {
  if (error instanceof TrousseauError) return error.message;
  const status = statusOf(error);
  if (status !== undefined) {
    const reason = knownReason(error);
    return `HTTP ${status}${reason ? `: ${reason}` : ''}`;
  }
  return errnoOf(error);
}

/** A credential file refused by the trust rule: the backend cannot authenticate, an outage of this backend, not a configuration crash. */
function unavailable(error: TrousseauError): TrousseauError {
  return error.code === 'BACKEND_UNAVAILABLE' ? error : new TrousseauError('BACKEND_UNAVAILABLE', error.message, { cause: error });
}

function errnoOf(error: unknown): string {
  const code = (error as { code?: unknown } | null)?.code;
  if (typeof code === 'string' && /^[A-Z0-9_]{1,40}$/.test(code)) return code;
  return error instanceof Error && error.name ? error.name : 'error';
}

/** Wait for a shared promise, but give up as soon as this caller's signal aborts. */
function raceAbort<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason as Error);
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason as Error);
    signal.addEventListener('abort', onAbort, { once: true });
    void promise.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}
