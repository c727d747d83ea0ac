/**
 * Azure Key Vault backend: RSA-OAEP-256 key wrap with an RSA (or RSA-HSM) key held in
 * Azure Key Vault or Managed HSM.
 *
 * RSA-OAEP-256 is chosen on purpose: the SDK wraps RSA-OAEP and RSA1_5 locally with the
 * public key, so only RSA-OAEP-256 makes wrap a server call that checks the key's state
 * and the caller's permission on every wrap, as unwrap always does.
 *
 * RSA key wrap takes no associated data and needs only the public key, so anyone could
 * mint a copy. Each copy therefore also carries Key Vault's PS256 signature over its
 * envelope, backend, key, version and wrapped bytes (azure-copy.ts), checked locally
 * before unwrap: Encrypt costs wrapKey + sign, Decrypt one unwrapKey as before.
 *
 * With keyVersion "latest" the version is resolved at start and on every refresh
 * interval, and at once when a wrap finds it gone (404); each wrap records the version
 * it used, and unwrap talks to that exact version, so envelopes written before a
 * rotation keep unwrapping. Only versions the vault issued get a (bounded) cache entry.
 */
import type { KeyObject } from 'node:crypto';
import type { Agent } from 'node:https';
import { rootCertificates } from 'node:tls';
import path from 'node:path';
import { z } from 'zod';
import type { AccessToken, GetTokenOptions, TokenCredential } from '@azure/core-auth';
import type * as IdentitySdk from '@azure/identity';
import type * as KeyVaultSdk from '@azure/keyvault-keys';
import type { CryptographyClientOptions, KeyVaultKey } from '@azure/keyvault-keys';
import { checkSdkCredentialFiles, recheckSdkCredentialFiles, type SdkCredentialFile } from '../config/sdk-credential-files.ts';
import { readCredentialFile } from '../config/trusted-path.ts';
import { TrousseauError, isTrousseauError } from '../errors.ts';
import { encodeSignedCopy, parseAzureCopy, signedDigest, verifyCopySignature, rsaPublicKeyFromJwk } from './azure-copy.ts';
import type { KeyBackend, WrapContext, WrappedKey } from './backend.ts';
import { commonBackendFields, type BackendDefinition } from './definition.ts';
import { keepAliveHttpsAgent } from './https-agent.ts';

const ALGORITHM = 'RSA-OAEP-256';
/** RSASSA-PSS with SHA-256: provably safe to share one RSA key with RSA-OAEP (see azure-copy.ts). */
const SIGNATURE_ALGORITHM = 'PS256';
const VERSION_PATTERN = /^[0-9A-Za-z]{1,64}$/;

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
    /**
     * Accept copies written before Azure copies were signed (layout 0), during a
     * migration only: such a copy can be minted by anyone holding the public key.
     * Refused by default; docs/backends/azure-keyvault.md says how to migrate.
     */
    acceptUnsignedCopies: z.boolean().default(false),
    /** Skip the check that the auth challenge's resource matches the vault host (for non-Azure hosts such as localhost). */
    disableChallengeResourceVerification: z.boolean().default(false),
    credential: credentialSchema.default({ method: 'default' }),
  })
  .strict();

export type AzureBackendConfig = z.output<typeof azureConfigSchema>;

export const azureBackend: BackendDefinition<typeof azureConfigSchema> = {
  type: 'azure',
  configSchema: azureConfigSchema,
  create: async (config, deps) => {
    // Before the SDK could read them (docs/security.md, "Credential files").
    await checkSdkCredentialFiles(`azure backend ${config.name}`, azureSdkCredentialFiles(config.credential, deps.baseDir));
    await loadAzureSdk();
    return new AzureKeyVaultBackend(config, { baseDir: deps.baseDir });
  },
};

// The SDKs' classes, bound by loadAzureSdk(): only a plugin with an azure backend loads
// them (definition.ts). They keep the SDKs' names so that the code below reads as usual.
let ClientAssertionCredential: typeof IdentitySdk.ClientAssertionCredential;
let ClientCertificateCredential: typeof IdentitySdk.ClientCertificateCredential;
let ClientSecretCredential: typeof IdentitySdk.ClientSecretCredential;
type ClientSecretCredential = IdentitySdk.ClientSecretCredential;
let DefaultAzureCredential: typeof IdentitySdk.DefaultAzureCredential;
let ManagedIdentityCredential: typeof IdentitySdk.ManagedIdentityCredential;
let CryptographyClient: typeof KeyVaultSdk.CryptographyClient;
type CryptographyClient = KeyVaultSdk.CryptographyClient;
let KeyClient: typeof KeyVaultSdk.KeyClient;
type KeyClient = KeyVaultSdk.KeyClient;
let azureSdkLoaded: Promise<void> | undefined;

/**
 * Load the Azure SDKs (once). azureBackend.create does, and so does the backend before
 * it first builds its clients, so code that builds an AzureKeyVaultBackend itself works too.
 */
export function loadAzureSdk(): Promise<void> {
  azureSdkLoaded ??= Promise.all([import('@azure/identity'), import('@azure/keyvault-keys')]).then(([identity, keyVault]) => {
    ({ ClientAssertionCredential, ClientCertificateCredential, ClientSecretCredential, DefaultAzureCredential, ManagedIdentityCredential } = identity);
    ({ CryptographyClient, KeyClient } = keyVault);
  });
  return azureSdkLoaded;
}

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

/** Most key versions whose public key and client are kept (each holds a KeyObject and a client). */
const MAX_CACHED_VERSIONS = 64;
/** Most versions remembered from the vault's listing; a key rotated more often than this keeps its newest. */
const MAX_LISTED_VERSIONS = 10_000;
/** Most refused versions remembered, and for how long: a forged version costs nothing the second time. */
const MAX_REFUSED_VERSIONS = 1024;
const REFUSED_VERSION_TTL_MS = 10_000;
/**
 * The listing of versions is re-read for an unknown version at most this often, so
 * envelopes naming thousands of invented versions cost one listing per interval, not
 * one call each; a version rotated in by another plugin instance is found within it.
 */
const LIST_MIN_INTERVAL_MS = 2_000;

/** What one key version needs: its public key (signature checks) and a client bound to it. */
interface VersionKeys {
  publicKey: KeyObject;
  client: CryptographyClient;
}

export class AzureKeyVaultBackend implements KeyBackend {
  readonly kind = 'azure';
  readonly name: string;
  private readonly config: AzureBackendConfig;
  private readonly options: AzureBackendOptions;
  /** The key's identifier without a version: what every signature names. */
  private readonly keyId: string;
  private clients: Promise<Clients> | undefined;
  /** Bounded, least recently used first. Only versions the vault issued get an entry. */
  private readonly versions = new Map<string, Promise<VersionKeys>>();
  private listed: { versions: Set<string>; at: number } | undefined;
  private listing: Promise<Set<string>> | undefined;
  /** Versions the vault's listing did not have, with the time they stop being refused unread. */
  private readonly refusedVersions = new Map<string, number>();
  private latest: { version: string; resolvedAt: number } | undefined;
  private resolving: Promise<string> | undefined;
  private closed = false;

  constructor(config: AzureBackendConfig, options: AzureBackendOptions) {
    this.name = config.name;
    this.config = config;
    this.options = options;
    this.keyId = `${config.vaultUrl.replace(/\/+$/, '')}/keys/${config.keyName}`;
  }

  async currentKeyVersion(signal: AbortSignal): Promise<string> {
    if (this.config.keyVersion !== 'latest') return this.config.keyVersion;
    if (this.latest && Date.now() - this.latest.resolvedAt < this.config.keyRefreshIntervalMs) return this.latest.version;
    return this.resolveLatest(signal);
  }

  async wrap(dataKey: Uint8Array, context: WrapContext, signal: AbortSignal): Promise<WrappedKey> {
    const version = await this.versionForWrap(signal);
    try {
      return await this.wrapWith(version, dataKey, context, signal);
    } catch (error) {
      // The version vanished (key deleted and re-created, version purged): find the
      // current one now rather than at the next refresh, and wrap once more with it.
      if (this.config.keyVersion !== 'latest' || !isKeyNotFound(error) || signal.aborted) throw error;
      this.forgetVersion(version);
      const current = await this.resolveLatest(signal);
      if (current === version) throw error;
      return this.wrapWith(current, dataKey, context, signal);
    }
  }

  async unwrap(wrapped: Uint8Array, keyVersion: string, context: WrapContext, signal: AbortSignal): Promise<Uint8Array> {
    if (!VERSION_PATTERN.test(keyVersion)) {
      throw new TrousseauError('BACKEND_REJECTED', 'recorded key version is not a Key Vault key version');
    }
    // Structure first: a malformed copy costs no call.
    const copy = parseAzureCopy(wrapped);
    if (copy.layout === 0 && !this.config.acceptUnsignedCopies) {
      throw new TrousseauError(
        'BACKEND_REJECTED',
        'unsigned Azure copy refused (written before copies were signed; acceptUnsignedCopies admits them during a migration)',
      );
    }
    const keys = await this.versionKeys(keyVersion, signal);
    if (copy.layout === 1 && !verifyCopySignature(keys.publicKey, this.binding(context, keyVersion), copy.wrapped, copy.signature)) {
      throw new TrousseauError('BACKEND_REJECTED', `Azure copy signature does not verify with key version ${keyVersion}: not made by this key`);
    }
    const result = await this.call('unwrap', signal, () => keys.client.unwrapKey(ALGORITHM, copy.wrapped, { abortSignal: signal }));
    return result.result;
  }

  async close(): Promise<void> {
    this.closed = true;
    const clients = this.clients;
    this.clients = undefined;
    this.versions.clear();
    this.refusedVersions.clear();
    this.listed = undefined;
    const settled = await clients?.catch(() => undefined);
    settled?.agent?.destroy();
  }

  private async versionForWrap(signal: AbortSignal): Promise<string> {
    try {
      return await this.currentKeyVersion(signal);
    } catch (error) {
      // A failed refresh must not stop wraps while the last resolved version still works:
      // the wrap call itself tells whether the vault and the key are usable.
      if (!this.latest || signal.aborted) throw error;
      return this.latest.version;
    }
  }

  /** Wrap with the vault, then have the vault sign the copy (two calls, inside one timeout). */
  private async wrapWith(version: string, dataKey: Uint8Array, context: WrapContext, signal: AbortSignal): Promise<WrappedKey> {
    const keys = await this.versionKeys(version, signal);
    const { result: wrapped } = await this.call('wrap', signal, () => keys.client.wrapKey(ALGORITHM, dataKey, { abortSignal: signal }));
    const binding = this.binding(context, version);
    const { result: signature } = await this.call('sign', signal, () =>
      keys.client.sign(SIGNATURE_ALGORITHM, signedDigest(binding, wrapped), { abortSignal: signal }),
    );
    // Checked here too, so a copy that Decrypt would refuse is never handed out.
    if (!verifyCopySignature(keys.publicKey, binding, wrapped, signature)) {
      throw new TrousseauError('BACKEND_REJECTED', `Key Vault's signature does not verify with key version ${version}`);
    }
    return { wrapped: encodeSignedCopy(wrapped, signature), keyVersion: version };
  }

  private binding(context: WrapContext, keyVersion: string) {
    return { context, keyId: this.keyId, keyVersion };
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
        if (!version || !VERSION_PATTERN.test(version)) throw new TrousseauError('BACKEND_REJECTED', `key ${this.config.keyName} has no version`);
        // The newest version is one the vault issued: cache it from this answer, no second call.
        if (!this.versions.has(version)) this.remember(version, Promise.resolve(await this.keysFrom(key)));
        this.listed?.versions.add(version);
        this.latest = { version, resolvedAt: Date.now() };
        return version;
      } finally {
        this.resolving = undefined;
      }
    })();
    return raceAbort(this.resolving, signal);
  }

  /**
   * Public key and client of a version the vault issued. A version it never issued (an
   * envelope naming an invented one) is refused as a rejected copy, remembered for a
   * while, and never creates a client or counts against the breaker.
   */
  private async versionKeys(version: string, signal: AbortSignal): Promise<VersionKeys> {
    const cached = this.versions.get(version);
    if (cached) {
      this.versions.delete(version);
      this.versions.set(version, cached);
      return raceAbort(cached, signal);
    }
    if (version !== this.config.keyVersion && version !== this.latest?.version && !(await this.isIssued(version, signal))) {
      throw new TrousseauError('BACKEND_REJECTED', `key ${this.config.keyName} has no version ${version} in the vault`);
    }
    const loading = (async () => {
      const { keyClient } = await this.setup();
      const key = await this.call('key lookup', AbortSignal.timeout(this.config.timeoutMs), (s) =>
        keyClient.getKey(this.config.keyName, { version, abortSignal: s }),
      );
      if (key.properties.version !== version) throw new TrousseauError('BACKEND_REJECTED', `key lookup answered another version than ${version}`);
      return this.keysFrom(key);
    })();
    // A failed lookup is not cached: the next call tries again.
    loading.catch(() => this.versions.get(version) === loading && this.versions.delete(version));
    this.remember(version, loading);
    return raceAbort(loading, signal);
  }

  private async keysFrom(key: KeyVaultKey): Promise<VersionKeys> {
    const { credential, clientOptions } = await this.setup();
    const publicKey = rsaPublicKeyFromJwk(key.key ?? {});
    // Built from the fetched key, the client does not fetch it again before each operation.
    return { publicKey, client: new CryptographyClient(key, credential, clientOptions) };
  }

  private remember(version: string, keys: Promise<VersionKeys>): void {
    if (this.closed) return;
    this.versions.set(version, keys);
    while (this.versions.size > MAX_CACHED_VERSIONS) this.versions.delete(this.versions.keys().next().value!);
  }

  private forgetVersion(version: string): void {
    this.versions.delete(version);
    this.listed?.versions.delete(version);
    if (this.latest?.version === version) this.latest = undefined;
  }

  /** Whether the vault lists `version` for this key; relisted at most every LIST_MIN_INTERVAL_MS. */
  private async isIssued(version: string, signal: AbortSignal): Promise<boolean> {
    if (this.listed?.versions.has(version)) return true;
    const refusedUntil = this.refusedVersions.get(version);
    if (refusedUntil !== undefined && refusedUntil > Date.now()) return false;
    if (!this.listed || Date.now() - this.listed.at >= LIST_MIN_INTERVAL_MS) {
      const versions = await raceAbort(this.listVersions(), signal);
      if (versions.has(version)) return true;
    }
    this.refusedVersions.delete(version);
    this.refusedVersions.set(version, Date.now() + REFUSED_VERSION_TTL_MS);
    while (this.refusedVersions.size > MAX_REFUSED_VERSIONS) this.refusedVersions.delete(this.refusedVersions.keys().next().value!);
    return false;
  }

  private listVersions(): Promise<Set<string>> {
    this.listing ??= (async () => {
      try {
        const { keyClient } = await this.setup();
        const signal = AbortSignal.timeout(this.config.timeoutMs);
        const versions = await this.call('key version listing', signal, async (s) => {
          const found = new Set<string>();
          for await (const properties of keyClient.listPropertiesOfKeyVersions(this.config.keyName, { abortSignal: s })) {
            if (properties.version && VERSION_PATTERN.test(properties.version)) found.add(properties.version);
            if (found.size >= MAX_LISTED_VERSIONS) break;
          }
          return found;
        });
        if (!this.closed) this.listed = { versions, at: Date.now() };
        return versions;
      } finally {
        this.listing = undefined;
      }
    })();
    return this.listing;
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
    await loadAzureSdk();
    let agent: Agent | undefined;
    if (this.config.caFile) {
      const file = path.resolve(this.options.baseDir, this.config.caFile);
      const pem = await readTrustedText(file, 'CA file').catch((error: unknown) => {
        if (error instanceof TrousseauError) throw unavailable(error);
        throw new TrousseauError('BACKEND_UNAVAILABLE', `CA file ${file} cannot be read (${(error as NodeJS.ErrnoException).code ?? 'error'})`, {
          cause: error,
        });
      });
      // Passing `ca` replaces Node's roots, so they are added back: caFile extends trust,
      // like NODE_EXTRA_CA_CERTS, but for this client only and without a restart.
      agent = keepAliveHttpsAgent(`azure backend ${this.name}`, { ca: [...rootCertificates, pem] });
    }
    const credential = this.options.credential ?? createCredential(this.config.credential, this.options.baseDir, this.name);
    const clientOptions: CryptographyClientOptions = {
      disableChallengeResourceVerification: this.config.disableChallengeResourceVerification,
      // No SDK retries: its default retries a 5xx for several seconds, past the backend's
      // timeout. Retrying belongs to the engine, which tries other copies within the
      // apiserver's deadline.
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

/** A 404 from the vault: the key or the version is gone. */
function isKeyNotFound(error: unknown): boolean {
  const cause = isTrousseauError(error) ? (error as { cause?: unknown }).cause : error;
  return typeof cause === 'object' && cause !== null && (cause as { statusCode?: unknown }).statusCode === 404;
}

/**
 * The files the Azure SDK (or, for workload identity, the plugin itself) reads for a
 * credential block: the configured token or certificate file, and what the
 * environment names where the credential would read it. DefaultAzureCredential reads
 * AZURE_FEDERATED_TOKEN_FILE (workload identity, and managed identity's token
 * exchange) and AZURE_CLIENT_CERTIFICATE_PATH (its environment credential);
 * ManagedIdentityCredential reads AZURE_FEDERATED_TOKEN_FILE when it has a client id
 * and AZURE_TENANT_ID is set (its tokenExchangeMsi). The developer-tool credentials in
 * the default chain (Azure CLI, PowerShell, azd) run programs that read their own files:
 * not covered. Relative environment paths are taken from the working folder, as the SDK reads them.
 */
export function azureSdkCredentialFiles(config: AzureCredentialConfig, baseDir: string, env: NodeJS.ProcessEnv = process.env): SdkCredentialFile[] {
  const fromEnv = (role: string, variable: string): SdkCredentialFile[] => {
    const named = env[variable];
    return named ? [{ role, variable, file: path.resolve(named), secret: true }] : [];
  };
  const federated = () => fromEnv('Azure federated token file', 'AZURE_FEDERATED_TOKEN_FILE');
  switch (config.method) {
    case 'default':
      return [...federated(), ...fromEnv('Azure client certificate file', 'AZURE_CLIENT_CERTIFICATE_PATH')];
    case 'managedIdentity':
      return (config.clientId ?? env.AZURE_CLIENT_ID) && env.AZURE_TENANT_ID ? federated() : [];
    case 'workloadIdentity':
      return [{ role: 'Azure workload identity token file', file: path.resolve(baseDir, config.tokenFile), secret: true }];
    case 'clientCertificate':
      return [{ role: 'Azure client certificate file', file: path.resolve(baseDir, config.certificateFile), secret: true }];
    case 'clientSecret':
      // Read by FileSecretCredential with readCredentialFile itself.
      return [];
  }
}

/** The credential a config block asks for. Paths are resolved against baseDir; `name` is the backend's, for messages. */
export function createCredential(config: AzureCredentialConfig, baseDir: string, name: string): TokenCredential {
  const who = `azure backend ${name}`;
  const checked = (inner: TokenCredential) => new CheckedFilesCredential(inner, who, azureSdkCredentialFiles(config, baseDir));
  switch (config.method) {
    case 'default':
      return checked(new DefaultAzureCredential());
    case 'workloadIdentity': {
      // WorkloadIdentityCredential is this ClientAssertionCredential with a plain
      // readFile of the token as the assertion: here the plugin reads it, by the
      // trusted-path rule, each time the SDK asks for one (the kubelet rotates it).
      const tokenFile = path.resolve(baseDir, config.tokenFile);
      const what = `${who}: Azure workload identity token file`;
      const readToken = async () => {
        const token = (await readCredentialFile(tokenFile, what)).content.toString('utf8').trim();
        if (!token) throw new TrousseauError('BACKEND_UNAVAILABLE', `${what}: ${tokenFile} is empty`);
        return token;
      };
      return checked(new ClientAssertionCredential(config.tenantId, config.clientId, readToken));
    }
    case 'managedIdentity':
      return checked(config.clientId ? new ManagedIdentityCredential({ clientId: config.clientId }) : new ManagedIdentityCredential());
    case 'clientSecret':
      return new FileSecretCredential(config.tenantId, config.clientId, path.resolve(baseDir, config.secretFile));
    case 'clientCertificate':
      // The SDK reads the PEM file again on every getToken: checked just before each.
      return checked(
        new ClientCertificateCredential(config.tenantId, config.clientId, {
          certificatePath: path.resolve(baseDir, config.certificateFile),
        }),
      );
  }
}

/**
 * A credential whose SDK files (azureSdkCredentialFiles) are checked again before
 * each getToken: the Key Vault clients ask only when their cached token is due for
 * refresh, which is when the SDK reads the files again. A refused file makes the call
 * fail as unavailable, with the reason, and nothing is read or sent.
 */
class CheckedFilesCredential implements TokenCredential {
  private readonly inner: TokenCredential;
  private readonly who: string;
  private readonly files: readonly SdkCredentialFile[];

  constructor(inner: TokenCredential, who: string, files: readonly SdkCredentialFile[]) {
    this.inner = inner;
    this.who = who;
    this.files = files;
  }

  async getToken(scopes: string | string[], options?: GetTokenOptions): Promise<AccessToken | null> {
    if (this.files.length > 0) await recheckSdkCredentialFiles(this.who, this.files);
    return this.inner.getToken(scopes, options);
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
    this.inner ??= readTrustedText(this.secretFile, 'client secret file').then(
      (secret) => new ClientSecretCredential(this.tenantId, this.clientId, secret.trim()),
      (error: unknown) => {
        this.inner = undefined;
        if (error instanceof TrousseauError) throw unavailable(error);
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

/**
 * lowkey-vault, the Key Vault emulator the tests run against, answers HTTP 500 where
 * Azure answers 400 or 403: its error code is then the Java exception's class name. A
 * ciphertext that does not decrypt (CryptoException) or a disabled key ("is not
 * enabled") is a refusal, not an outage. Azure never sends these codes.
 */
function isEmulatorRefusal(code: string | undefined, message: unknown): boolean {
  if (!code?.startsWith('com.github.nagyesta.lowkeyvault.') && !code?.startsWith('java.lang.')) return false;
  return code.endsWith('.CryptoException') || (typeof message === 'string' && / is not enabled\.?$/.test(message));
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
  if (status === 500 && isEmulatorRefusal(code, e.message)) {
    return new TrousseauError('BACKEND_REJECTED', `${what}: vault refused the request (HTTP 500, a key or ciphertext problem)`, { cause: error });
  }
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

/** A file the client sends or trusts (client secret, CA), read by the trusted-path rule. */
async function readTrustedText(file: string, what: string): Promise<string> {
  return (await readCredentialFile(file, `azure backend: ${what}`)).content.toString('utf8');
}

/** A file refused by the trust rule: this backend cannot authenticate, an outage of it, not a crash. */
function unavailable(error: TrousseauError): TrousseauError {
  return error.code === 'BACKEND_UNAVAILABLE' ? error : new TrousseauError('BACKEND_UNAVAILABLE', error.message, { cause: error });
}
