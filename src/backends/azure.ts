/**
 * Azure Key Vault backend: RSA-OAEP-256 key wrap with an RSA (or RSA-HSM) key held in
 * Azure Key Vault or Managed HSM.
 *
 * RSA-OAEP-256 is chosen on purpose: the SDK wraps RSA-OAEP and RSA1_5 locally with the
 * public key, so only RSA-OAEP-256 makes wrap a server call that checks the key's state
 * and the caller's permission on every wrap, as unwrap always does.
 *
 * RSA key wrap takes no associated data, so a wrapped copy is not bound to its envelope
 * by the server; the envelope's key commitment refuses a copy moved to another envelope.
 *
 * With keyVersion "latest" the version is resolved at start and on every refresh
 * interval; each wrap records the version it used, and unwrap talks to that exact
 * version, so envelopes written before a rotation keep unwrapping.
 */
import { Agent } from 'node:https';
import { readFile } from 'node:fs/promises';
import { rootCertificates } from 'node:tls';
import path from 'node:path';
import { z } from 'zod';
import type { AccessToken, GetTokenOptions, TokenCredential } from '@azure/core-auth';
import {
  ClientCertificateCredential,
  ClientSecretCredential,
  DefaultAzureCredential,
  ManagedIdentityCredential,
  WorkloadIdentityCredential,
} from '@azure/identity';
import { CryptographyClient, KeyClient, type CryptographyClientOptions } from '@azure/keyvault-keys';
import { TrousseauError, isTrousseauError } from '../errors.ts';
import type { KeyBackend, WrapContext, WrappedKey } from './backend.ts';
import { commonBackendFields, type BackendDefinition } from './definition.ts';

const ALGORITHM = 'RSA-OAEP-256';

const nonEmpty = z.string().min(1);

const credentialSchema = z.discriminatedUnion('method', [
  /** DefaultAzureCredential: environment, workload identity, managed identity, Azure CLI, ... */
  z.object({ method: z.literal('default') }).strict(),
  /** AKS workload identity: a projected service-account token exchanged for an Entra token. */
  z.object({ method: z.literal('workloadIdentity'), tenantId: nonEmpty, clientId: nonEmpty, tokenFile: nonEmpty }).strict(),
  /** System-assigned managed identity, or the user-assigned one with this client id. */
  z.object({ method: z.literal('managedIdentity'), clientId: nonEmpty.optional() }).strict(),
  /** Service principal with a client secret read from a file (never inline in the config). */
  z.object({ method: z.literal('clientSecret'), tenantId: nonEmpty, clientId: nonEmpty, secretFile: nonEmpty }).strict(),
  /** Service principal with a PEM file holding the certificate and its private key. */
  z.object({ method: z.literal('clientCertificate'), tenantId: nonEmpty, clientId: nonEmpty, certificateFile: nonEmpty }).strict(),
]);

export type AzureCredentialConfig = z.output<typeof credentialSchema>;

export const azureConfigSchema = z
  .object({
    ...commonBackendFields,
    type: z.literal('azure'),
    /** Vault or Managed HSM URL, e.g. https://my-vault.vault.azure.net */
    vaultUrl: z.url({ protocol: /^https$/, error: 'must be an https:// URL' }),
    /** Name of the RSA key (Key Vault key names: letters, digits and "-"). */
    keyName: z.string().regex(/^[0-9A-Za-z-]{1,127}$/, 'must be a Key Vault key name: letters, digits and "-"'),
    /** "latest" follows rotations; a version id pins one version. */
    keyVersion: z
      .union([z.literal('latest'), z.string().regex(/^[0-9A-Za-z]{1,64}$/, 'must be "latest" or a key version id')])
      .default('latest'),
    /** How often "latest" is re-resolved, in milliseconds (default 5 minutes). */
    keyRefreshIntervalMs: z.number().int().min(1000).max(86_400_000).default(300_000),
    /** PEM bundle of extra CAs trusted for the vault's TLS certificate, besides Node's bundled roots. */
    caFile: nonEmpty.optional(),
    /** Skip the check that the auth challenge's resource matches the vault host (for non-Azure hosts such as localhost). */
    disableChallengeResourceVerification: z.boolean().default(false),
    credential: credentialSchema.default({ method: 'default' }),
  })
  .strict();

export type AzureBackendConfig = z.output<typeof azureConfigSchema>;

export const azureBackend: BackendDefinition<typeof azureConfigSchema> = {
  type: 'azure',
  configSchema: azureConfigSchema,
  create: (config, deps) => new AzureKeyVaultBackend(config, { baseDir: deps.baseDir }),
};

export interface AzureBackendOptions {
  /** Folder relative file paths (caFile, secret files) are resolved against. */
  baseDir: string;
  /**
   * Use this credential instead of the configured one. Only for code that builds a
   * backend directly (tests); the configuration file cannot reach it.
   */
  credential?: TokenCredential;
  /**
   * Extra HTTP pipeline policies for the Key Vault clients (request logging, tracing,
   * recording). Like `credential`, only for code that builds a backend directly.
   */
  additionalPolicies?: CryptographyClientOptions['additionalPolicies'];
}

interface Clients {
  keyClient: KeyClient;
  clientOptions: CryptographyClientOptions;
  credential: TokenCredential;
  agent: Agent | undefined;
}

export class AzureKeyVaultBackend implements KeyBackend {
  readonly kind = 'azure';
  readonly name: string;
  private readonly config: AzureBackendConfig;
  private readonly options: AzureBackendOptions;
  private clients: Promise<Clients> | undefined;
  private readonly cryptoClients = new Map<string, CryptographyClient>();
  private latest: { version: string; resolvedAt: number } | undefined;
  private resolving: Promise<string> | undefined;
  private closed = false;

  constructor(config: AzureBackendConfig, options: AzureBackendOptions) {
    this.name = config.name;
    this.config = config;
    this.options = options;
  }

  async currentKeyVersion(signal: AbortSignal): Promise<string> {
    if (this.config.keyVersion !== 'latest') return this.config.keyVersion;
    if (this.latest && Date.now() - this.latest.resolvedAt < this.config.keyRefreshIntervalMs) return this.latest.version;
    return this.resolveLatest(signal);
  }

  async wrap(dataKey: Uint8Array, _context: WrapContext, signal: AbortSignal): Promise<WrappedKey> {
    let version: string;
    try {
      version = await this.currentKeyVersion(signal);
    } catch (error) {
      // A failed refresh must not stop wraps while the last resolved version still works:
      // the wrap call itself tells whether the vault and the key are usable.
      if (!this.latest || signal.aborted) throw error;
      version = this.latest.version;
    }
    const client = await this.cryptoClient(version, signal);
    const result = await this.call('wrap', signal, () => client.wrapKey(ALGORITHM, dataKey, { abortSignal: signal }));
    return { wrapped: result.result, keyVersion: version };
  }

  async unwrap(wrapped: Uint8Array, keyVersion: string, _context: WrapContext, signal: AbortSignal): Promise<Uint8Array> {
    if (!/^[0-9A-Za-z]{1,64}$/.test(keyVersion)) {
      throw new TrousseauError('BACKEND_REJECTED', 'recorded key version is not a Key Vault key version');
    }
    const client = await this.cryptoClient(keyVersion, signal);
    const result = await this.call('unwrap', signal, () => client.unwrapKey(ALGORITHM, wrapped, { abortSignal: signal }));
    return result.result;
  }

  async close(): Promise<void> {
    this.closed = true;
    const clients = this.clients;
    this.clients = undefined;
    this.cryptoClients.clear();
    const settled = await clients?.catch(() => undefined);
    settled?.agent?.destroy();
  }

  private resolveLatest(signal: AbortSignal): Promise<string> {
    // Concurrent callers share one getKey; each still gives up on its own signal.
    this.resolving ??= (async () => {
      try {
        const { keyClient } = await this.setup();
        // The shared lookup gets its own deadline so one caller's abort does not fail the others.
        const key = await this.call('key lookup', AbortSignal.timeout(this.config.timeoutMs), (s) =>
          keyClient.getKey(this.config.keyName, { abortSignal: s }),
        );
        const version = key.properties.version;
        if (!version) throw new TrousseauError('BACKEND_REJECTED', `key ${this.config.keyName} has no version`);
        this.latest = { version, resolvedAt: Date.now() };
        return version;
      } finally {
        this.resolving = undefined;
      }
    })();
    return raceAbort(this.resolving, signal);
  }

  private async cryptoClient(version: string, signal: AbortSignal): Promise<CryptographyClient> {
    const cached = this.cryptoClients.get(version);
    if (cached) return cached;
    const { credential, clientOptions } = await raceAbort(this.setup(), signal);
    const keyId = `${this.config.vaultUrl.replace(/\/+$/, '')}/keys/${this.config.keyName}/${version}`;
    const client = new CryptographyClient(keyId, credential, clientOptions);
    if (!this.closed) this.cryptoClients.set(version, client);
    return client;
  }

  private setup(): Promise<Clients> {
    if (this.closed) return Promise.reject(new TrousseauError('SHUTTING_DOWN', `backend ${this.name} is closed`));
    // Built lazily and rebuilt after a failure (unreadable CA or secret file): a broken
    // backend is unavailable, never a reason for the plugin to refuse to start.
    this.clients ??= this.buildClients().catch((error: unknown) => {
      this.clients = undefined;
      throw error;
    });
    return this.clients;
  }

  private async buildClients(): Promise<Clients> {
    let agent: Agent | undefined;
    if (this.config.caFile) {
      const file = path.resolve(this.options.baseDir, this.config.caFile);
      const pem = await readFile(file, 'utf8').catch((error: unknown) => {
        throw new TrousseauError('BACKEND_UNAVAILABLE', `CA file ${file} cannot be read (${(error as NodeJS.ErrnoException).code ?? 'error'})`, {
          cause: error,
        });
      });
      // Passing `ca` replaces Node's roots, so they are added back: caFile extends trust,
      // like NODE_EXTRA_CA_CERTS, but for this client only and without a restart.
      agent = new Agent({ ca: [...rootCertificates, pem], keepAlive: true });
    }
    const credential = this.options.credential ?? createCredential(this.config.credential, this.options.baseDir);
    const clientOptions: CryptographyClientOptions = {
      disableChallengeResourceVerification: this.config.disableChallengeResourceVerification,
      // Retries belong to the engine, which tries other copies within the apiserver's deadline.
      retryOptions: { maxRetries: 0 },
      ...(agent ? { agent } : {}),
      ...(this.options.additionalPolicies ? { additionalPolicies: this.options.additionalPolicies } : {}),
    };
    const keyClient = new KeyClient(this.config.vaultUrl, credential, clientOptions);
    return { keyClient, clientOptions, credential, agent };
  }

  /** Run an SDK call, ending it when `signal` aborts and mapping its errors to our codes. */
  private async call<T>(what: string, signal: AbortSignal, body: (signal: AbortSignal) => Promise<T>): Promise<T> {
    try {
      return await raceAbort(body(signal), signal);
    } catch (error) {
      throw classifyAzureError(error, `${what} with Azure key ${this.config.keyName} in ${this.config.vaultUrl}`);
    }
  }
}

/** The credential a config block asks for. Paths are resolved against baseDir. */
export function createCredential(config: AzureCredentialConfig, baseDir: string): TokenCredential {
  switch (config.method) {
    case 'default':
      return new DefaultAzureCredential();
    case 'workloadIdentity':
      return new WorkloadIdentityCredential({
        tenantId: config.tenantId,
        clientId: config.clientId,
        tokenFilePath: path.resolve(baseDir, config.tokenFile),
      });
    case 'managedIdentity':
      return config.clientId ? new ManagedIdentityCredential({ clientId: config.clientId }) : new ManagedIdentityCredential();
    case 'clientSecret':
      return new FileSecretCredential(config.tenantId, config.clientId, path.resolve(baseDir, config.secretFile));
    case 'clientCertificate':
      return new ClientCertificateCredential(config.tenantId, config.clientId, {
        certificatePath: path.resolve(baseDir, config.certificateFile),
      });
  }
}

/** ClientSecretCredential whose secret is read from a file on first use, so it never sits in the config. */
class FileSecretCredential implements TokenCredential {
  private inner: Promise<ClientSecretCredential> | undefined;
  private readonly tenantId: string;
  private readonly clientId: string;
  private readonly secretFile: string;

  constructor(tenantId: string, clientId: string, secretFile: string) {
    this.tenantId = tenantId;
    this.clientId = clientId;
    this.secretFile = secretFile;
  }

  async getToken(scopes: string | string[], options?: GetTokenOptions): Promise<AccessToken | null> {
    this.inner ??= readFile(this.secretFile, 'utf8').then(
      (secret) => new ClientSecretCredential(this.tenantId, this.clientId, secret.trim()),
      (error: unknown) => {
        this.inner = undefined;
        throw new TrousseauError(
          'BACKEND_UNAVAILABLE',
          `client secret file ${this.secretFile} cannot be read (${(error as NodeJS.ErrnoException).code ?? 'error'})`,
          { cause: error },
        );
      },
    );
    return (await this.inner).getToken(scopes, options);
  }
}

/** Resolve with `promise`, or reject as soon as `signal` aborts (the SDK call is abandoned). */
function raceAbort<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  // The SDK honours abortSignal on the HTTP request, but token acquisition and the
  // challenge round-trip may not; racing guarantees the caller is released at once.
  if (signal.aborted) {
    promise.catch(() => undefined);
    return Promise.reject(abortError(signal));
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(abortError(signal));
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener('abort', onAbort);
        resolve(value);
      },
      (error: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(error instanceof Error ? error : new Error(String(error)));
      },
    );
  });
}

function abortError(signal: AbortSignal): TrousseauError {
  return new TrousseauError('BACKEND_UNAVAILABLE', 'Azure Key Vault call aborted', { cause: signal.reason });
}

const NETWORK_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENOTFOUND',
  'EAI_AGAIN',
  'ETIMEDOUT',
  'EPIPE',
  'REQUEST_SEND_ERROR',
  'UND_ERR_SOCKET',
]);

/**
 * Map an SDK, identity or network error to BACKEND_REJECTED / BACKEND_UNAVAILABLE.
 * The message names the operation and the status only: SDK messages may quote
 * request data, so they travel as `cause`.
 */
export function classifyAzureError(error: unknown, what: string): TrousseauError {
  if (isTrousseauError(error)) return error;
  const e = (typeof error === 'object' && error !== null ? error : {}) as {
    name?: unknown;
    statusCode?: unknown;
    code?: unknown;
    message?: unknown;
  };
  const name = typeof e.name === 'string' ? e.name : '';
  const status = typeof e.statusCode === 'number' ? e.statusCode : undefined;
  const code = typeof e.code === 'string' ? e.code : undefined;
  // Service error codes are fixed identifiers (Forbidden, KeyNotFound, BadParameter), safe to show.
  const label = code && /^[A-Za-z_]{1,40}$/.test(code) ? ` ${code}` : '';

  if (name === 'AbortError') return new TrousseauError('BACKEND_UNAVAILABLE', `${what}: call aborted`, { cause: error });
  if (status !== undefined) {
    if (status === 408 || status === 429 || status >= 500) {
      return new TrousseauError('BACKEND_UNAVAILABLE', `${what}: vault answered HTTP ${status}${label}`, { cause: error });
    }
    return new TrousseauError('BACKEND_REJECTED', `${what}: vault refused with HTTP ${status}${label}`, { cause: error });
  }
  if (name === 'CredentialUnavailableError') {
    return new TrousseauError('BACKEND_UNAVAILABLE', `${what}: no Azure credential is available`, { cause: error });
  }
  if (name === 'AuthenticationRequiredError' || name === 'AuthenticationError') {
    return new TrousseauError('BACKEND_REJECTED', `${what}: Azure authentication failed`, { cause: error });
  }
  const message = typeof e.message === 'string' ? e.message : '';
  if (code && (NETWORK_CODES.has(code) || code.startsWith('ERR_TLS') || code.includes('CERT'))) {
    return new TrousseauError('BACKEND_UNAVAILABLE', `${what}: vault unreachable (${code})`, { cause: error });
  }
  if (/challenge resource/i.test(message)) {
    return new TrousseauError(
      'BACKEND_REJECTED',
      `${what}: the vault's auth challenge names another resource (set disableChallengeResourceVerification only for non-Azure hosts)`,
      { cause: error },
    );
  }
  // The SDK checks a fetched key's expiry, not-before and permitted operations locally
  // and throws a plain Error: a key problem, not an outage.
  if (/expired at|can't be used before|is not supported on key/.test(message)) {
    return new TrousseauError('BACKEND_REJECTED', `${what}: the key does not allow this operation now`, { cause: error });
  }
  return new TrousseauError('BACKEND_UNAVAILABLE', `${what}: call failed`, { cause: error });
}
