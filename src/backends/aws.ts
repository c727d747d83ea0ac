/**
 * AWS KMS backend: Encrypt/Decrypt of the data key under one symmetric KMS key.
 *
 * Credentials come only from the AWS SDK's default chain (environment, shared
 * config/profile, web identity/IRSA, EKS Pod Identity, IMDS), optionally exchanged
 * for a role with `assumeRole`. The EncryptionContext binds every copy to its
 * envelope and backend name; Decrypt always names the configured key (never KMS's
 * "discovery" of the key from the ciphertext) and the key KMS reports having used is
 * checked again. See docs/backends/aws-kms.md.
 */
import type * as KmsSdk from '@aws-sdk/client-kms';
import type * as AwsCoreClient from '@aws-sdk/core/client';
import type * as AwsCoreAuth from '@aws-sdk/core/httpAuthSchemes';
import type * as CredentialProvidersSdk from '@aws-sdk/credential-providers';
import type * as SmithyCore from '@smithy/core';
import type * as SmithyEndpoints from '@smithy/core/endpoints';
import type * as SmithyProtocols from '@smithy/core/protocols';
import type * as SmithyRetry from '@smithy/core/retry';
import type * as SignatureV4Sdk from '@smithy/signature-v4';
import type * as SmithyTypes from '@smithy/types';
import type { Endpoint, HandlerExecutionContext, HttpRequest as SmithyHttpRequest, HttpResponse as SmithyHttpResponse, OperationSchema, StaticOperationSchema } from '@smithy/types';
import { hash } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { z } from 'zod';
import { checkSdkCredentialFiles, recheckSdkCredentialFiles, type SdkCredentialFile } from '../config/sdk-credential-files.ts';
import { hmacSha256 } from '../envelope/hkdf.ts';
import { TrousseauError } from '../errors.ts';
import { contextMap, type KeyBackend, type WrapContext, type WrappedKey } from './backend.ts';
import { commonBackendFields, type BackendDefinition } from './definition.ts';

const ARN_PATTERN = /^arn:aws(?:-[a-z]+)*:kms:([a-z0-9-]+):(\d{12}):(key|alias)\/[A-Za-z0-9/_+=.@:-]+$/;
const KEY_ARN_PATTERN = /^arn:aws(?:-[a-z]+)*:kms:([a-z0-9-]+):(\d{12}):key\/[A-Za-z0-9-]+$/;
const REGION_PATTERN = /^[a-z]{2}(?:-[a-z]+)+-\d{1,2}$/;

/** Region named by a KMS ARN, or undefined for an alias name or bare key id. */
function arnRegion(id: string): string | undefined {
  return ARN_PATTERN.exec(id)?.[1];
}

export const awsConfigSchema = z
  .object({
    ...commonBackendFields,
    type: z.literal('aws'),
    /** Key ARN, alias ARN, alias name ("alias/x") or key id of a symmetric ENCRYPT_DECRYPT key. */
    keyId: z
      .string()
      .refine(
        (id) => ARN_PATTERN.test(id) || /^alias\/[A-Za-z0-9/_-]{1,250}$/.test(id) || /^(mrk-)?[0-9a-f-]{32,36}$/i.test(id),
        'must be a KMS key ARN, an alias ARN, an alias name ("alias/...") or a key id',
      ),
    /** Region of the key (and of the KMS endpoint the calls go to). */
    region: z.string().regex(REGION_PATTERN, 'must be an AWS region such as eu-west-1'),
    /** Override of the KMS endpoint for `region` (a VPC interface endpoint, a FIPS endpoint, a test server). */
    endpoint: z.url({ protocol: /^https?$/ }).optional(),
    /** Assume this role (from the default-chain credentials) before calling KMS. */
    assumeRole: z
      .object({
        roleArn: z.string().regex(/^arn:aws(?:-[a-z]+)*:iam::\d{12}:role\/[\w+=,.@/-]+$/, 'must be an IAM role ARN'),
        // Length outside the pattern: Go's RE2 (helm validates the chart's values against
        // this schema) refuses repeat counts above 1000, such as {2,1224}.
        externalId: z.string().min(2).max(1224).regex(/^[\w+=,.@:/-]+$/).optional(),
        sessionName: z
          .string()
          .regex(/^[\w+=,.@-]{2,64}$/)
          .default('trousseau'),
      })
      .strict()
      .optional(),
    /**
     * ARNs of replicas of a multi-Region key in other regions. Unwrap tries them, in
     * order, when the key's own region is unavailable; wrap never uses them.
     */
    replicaKeyIds: z.array(z.string().regex(KEY_ARN_PATTERN, 'must be a KMS key ARN (the region is taken from it)')).default([]),
  })
  .strict()
  .superRefine((config, ctx) => {
    const region = arnRegion(config.keyId);
    if (region !== undefined && region !== config.region) {
      ctx.addIssue({ code: 'custom', path: ['keyId'], message: `the key ARN is in ${region}, but region is ${config.region}` });
    }
    for (const [index, replica] of config.replicaKeyIds.entries()) {
      if (arnRegion(replica) === config.region) {
        ctx.addIssue({ code: 'custom', path: ['replicaKeyIds', index], message: 'a replica must be in another region than the key' });
      }
    }
  });

export type AwsBackendConfig = z.output<typeof awsConfigSchema>;

/**
 * The SDK's HTTP handler settings. A request's time is bounded by the engine's patient
 * timer (GuardedBackend: `timeoutMs`, not counting event-loop lag) through the abort
 * signal, so the SDK gets no request timeout of its own: in @smithy/node-http-handler
 * 4.x one only prints a warning to the console (an unstructured stderr line per slow
 * request) and lets the request run on, and set to throw instead it would be a second,
 * impatient timer that fails calls the guard would still wait for while the plugin's
 * event loop is late (docs/design/overload.md). The connection timeout stays.
 */
function requestHandlerOptions(timeoutMs: number): { connectionTimeout: number; requestTimeout: number } {
  return { connectionTimeout: timeoutMs, requestTimeout: 0 };
}

export const awsBackend: BackendDefinition<typeof awsConfigSchema> = {
  type: 'aws',
  configSchema: awsConfigSchema,
  create: async (config) => {
    // Before anything of the SDK runs: its configuration loading and its credential
    // chain read these files with plain reads (docs/security.md, "Credential files").
    await checkSdkCredentialFiles(`aws backend ${config.name}`, awsSdkCredentialFiles());
    await loadAwsSdk();
    return new AwsKmsBackend(config);
  },
};

/** The folder the SDK finds ~/.aws in: its own getHomeDir (@smithy/core/config), HOME first. */
function awsHomeDir(env: NodeJS.ProcessEnv): string {
  if (env.HOME) return env.HOME;
  if (env.USERPROFILE) return env.USERPROFILE;
  if (env.HOMEPATH) return `${env.HOMEDRIVE ?? `C:${path.sep}`}${env.HOMEPATH}`;
  return os.homedir();
}

/**
 * The files the AWS SDK reads for this backend, as the SDK finds them. The shared
 * config and credentials files are read by every client for its settings (endpoint
 * URLs, FIPS, retry mode) as well as by the credential chain, so always; the web
 * identity (IRSA) and container (EKS Pod Identity) token files when their variable is
 * set, unless static keys in the environment end the chain at its first link (as
 * they do when no AWS_PROFILE is named). A `~/` prefix is the home folder, as in the SDK.
 */
export function awsSdkCredentialFiles(env: NodeJS.ProcessEnv = process.env): SdkCredentialFile[] {
  const home = awsHomeDir(env);
  const expand = (file: string) => path.resolve(file.startsWith('~/') ? path.join(home, file.slice(2)) : file);
  const shared = (role: string, variable: string, name: string, secret: boolean): SdkCredentialFile => {
    const named = env[variable];
    return named ? { role, variable, file: expand(named), secret } : { role, file: path.resolve(home, '.aws', name), secret };
  };
  const files = [
    shared('AWS shared config file', 'AWS_CONFIG_FILE', 'config', false),
    shared('AWS shared credentials file', 'AWS_SHARED_CREDENTIALS_FILE', 'credentials', true),
  ];
  const staticKeys = !env.AWS_PROFILE && Boolean(env.AWS_ACCESS_KEY_ID) && Boolean(env.AWS_SECRET_ACCESS_KEY);
  if (!staticKeys) {
    const tokens: [string, string][] = [
      ['AWS web identity token file', 'AWS_WEB_IDENTITY_TOKEN_FILE'],
      ['AWS container authorization token file', 'AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE'],
    ];
    for (const [role, variable] of tokens) {
      const named = env[variable];
      if (named) files.push({ role, variable, file: path.resolve(named), secret: true });
    }
  }
  return files;
}

/**
 * The SDK's chain treats credentials as due for refresh this long before they expire
 * (credentialsTreatedAsExpired in @aws-sdk/credential-provider-node, and the client's
 * own memoisation): only then does it read its files again.
 */
const REFRESH_WINDOW_MS = 300_000;

/**
 * `inner`, with the SDK's credential files checked again before every call that may
 * make it read them: the first, a forced refresh, and any once the last credentials
 * are within the refresh window of their expiry. Between refreshes the SDK answers
 * from memory and nothing is checked (or read).
 */
function checkedProvider<Options, Identity extends { expiration?: Date | undefined }>(
  inner: (options?: Options) => Promise<Identity>,
  who: string,
  files: readonly SdkCredentialFile[],
): (options?: Options) => Promise<Identity> {
  let last: Identity | undefined;
  return async (options?: Options) => {
    const forced = (options as { forceRefresh?: unknown } | undefined)?.forceRefresh === true;
    const due = last?.expiration !== undefined && last.expiration.getTime() - Date.now() < REFRESH_WINDOW_MS;
    if (last === undefined || forced || due) await recheckSdkCredentialFiles(who, files);
    last = await inner(options);
    return last;
  };
}

// The SDK's classes, bound by loadAwsSdk(): only a plugin with an aws backend loads the
// SDK (definition.ts). They keep the SDK's names so that the code below reads as usual.
let KMSClient: typeof KmsSdk.KMSClient;
type KMSClient = KmsSdk.KMSClient;
let DecryptCommand: typeof KmsSdk.DecryptCommand;
let DescribeKeyCommand: typeof KmsSdk.DescribeKeyCommand;
let fromTemporaryCredentials: typeof CredentialProvidersSdk.fromTemporaryCredentials;
let fromNodeProviderChain: typeof CredentialProvidersSdk.fromNodeProviderChain;
type KeyMetadata = KmsSdk.KeyMetadata;
/** The SDK's own pieces that KmsCalls composes (see there). */
let lean: {
  encrypt: OperationSchema;
  decrypt: OperationSchema;
  SignatureV4: typeof SignatureV4Sdk.SignatureV4;
  AwsSdkSigV4Signer: typeof AwsCoreAuth.AwsSdkSigV4Signer;
  HttpRequest: typeof SmithyProtocols.HttpRequest;
  httpSigningMiddleware: typeof SmithyCore.httpSigningMiddleware;
  retryMiddleware: typeof SmithyRetry.retryMiddleware;
  userAgentMiddleware: typeof AwsCoreClient.userAgentMiddleware;
  getEndpointFromInstructions: typeof SmithyEndpoints.getEndpointFromInstructions;
  toEndpointV1: typeof SmithyEndpoints.toEndpointV1;
  contextKey: typeof SmithyTypes.SMITHY_CONTEXT_KEY;
};
let awsSdkLoaded = false;

/** Load the AWS SDK (once); awsBackend.create does, code that builds an AwsKmsBackend itself must first. */
export async function loadAwsSdk(): Promise<void> {
  if (awsSdkLoaded) return;
  const [kms, providers, signatureV4, awsAuth, awsClient, core, endpoints, protocols, retry, schema, types] = await Promise.all([
    import('@aws-sdk/client-kms'),
    import('@aws-sdk/credential-providers'),
    import('@smithy/signature-v4'),
    import('@aws-sdk/core/httpAuthSchemes'),
    import('@aws-sdk/core/client'),
    import('@smithy/core'),
    import('@smithy/core/endpoints'),
    import('@smithy/core/protocols'),
    import('@smithy/core/retry'),
    import('@smithy/core/schema'),
    import('@smithy/types'),
  ]);
  ({ DecryptCommand, DescribeKeyCommand } = kms);
  ({ fromTemporaryCredentials, fromNodeProviderChain } = providers);
  KMSClient = kms.KMSClient;
  // The operation schemas the commands carry, in the form the protocol takes.
  const op = ([, namespace, name, traits, input, output]: StaticOperationSchema) => schema.operation(namespace, name, traits, input, output);
  lean = {
    encrypt: op(kms.Encrypt$),
    decrypt: op(kms.Decrypt$),
    SignatureV4: signatureV4.SignatureV4,
    AwsSdkSigV4Signer: awsAuth.AwsSdkSigV4Signer,
    HttpRequest: protocols.HttpRequest,
    httpSigningMiddleware: core.httpSigningMiddleware,
    retryMiddleware: retry.retryMiddleware,
    userAgentMiddleware: awsClient.userAgentMiddleware,
    getEndpointFromInstructions: endpoints.getEndpointFromInstructions,
    toEndpointV1: endpoints.toEndpointV1,
    contextKey: types.SMITHY_CONTEXT_KEY,
  };
  awsSdkLoaded = true;
}

/**
 * The parts of a KMSClient's resolved configuration that KmsCalls uses: the client's
 * own protocol (awsJson1_1 serde, with the SDK's exception classes), HTTP handler
 * (keep-alive agent, timeouts), credential provider (the default chain or the role),
 * retry strategy and SigV4 signer.
 */
type ResolvedKmsConfig = Omit<KmsSdk.KMSClientResolvedConfig, 'protocol' | 'requestHandler'> & {
  requestHandler: { handle(request: SmithyHttpRequest, options: { abortSignal: AbortSignal }): Promise<{ response: SmithyHttpResponse }> };
  protocol: {
    serializeRequest(operation: OperationSchema, input: object, context: { endpoint: () => Promise<Endpoint> }): Promise<SmithyHttpRequest>;
    deserializeResponse(operation: OperationSchema, context: object, response: SmithyHttpResponse): Promise<unknown>;
  };
};

/**
 * Encrypt and Decrypt, the calls behind every KMS-path request, through the SDK's own
 * pieces composed once per client instead of `client.send`. Profiled (docs/performance.md,
 * issue 15 goal 2), `send` spends most of its CPU on work that is the same for every
 * call of a client: resolving and sorting the middleware stack, copying the whole
 * client configuration into each serde context, evaluating the endpoint rules, and
 * building the user agent. Here that is done once; per call there remain the
 * protocol's serialisation and parsing, the SDK's retry middleware (standard mode,
 * MAX_ATTEMPTS, throttling backoff, the abort signal) around its signing middleware
 * (SigV4 with the client's signer and credential provider, clock-skew correction),
 * and the client's NodeHttpHandler. Nothing of the AWS protocol is written here.
 * DescribeKey (probes, alias resolution) keeps using `client.send`.
 */
class KmsCalls {
  readonly client: KMSClient;
  private readonly config: ResolvedKmsConfig;
  private readonly signer: AwsCoreAuth.AwsSdkSigV4Signer;
  /** The client's endpoint: its rules depend only on the client's configuration (region, FIPS, dual-stack, override). */
  private endpoint: Endpoint | undefined;
  /** The user-agent headers the SDK's middleware builds from the client's configuration. */
  private userAgent: Record<string, string> | undefined;

  constructor(client: KMSClient) {
    this.client = client;
    this.config = client.config;
    this.signer = new lean.AwsSdkSigV4Signer();
  }

  async send<Output>(operation: OperationSchema, input: object, abortSignal: AbortSignal): Promise<Output> {
    const config = this.config;
    // Every KMS operation has the same endpoint parameters (the client's only), so
    // any command's instructions give the endpoint of both.
    const endpoint = this.endpoint ?? (this.endpoint = lean.toEndpointV1(await lean.getEndpointFromInstructions(input, DecryptCommand, config)));
    const userAgent = this.userAgent ?? (this.userAgent = await this.userAgentHeaders());
    // As the SDK's auth-scheme middleware: the identity before the request, outside the retries.
    const identity = await config.credentials();
    const request = await config.protocol.serializeRequest(operation, input, { endpoint: () => Promise.resolve(endpoint) });
    const headers = request.headers;
    headers.host = request.port === undefined ? request.hostname : `${request.hostname}:${request.port}`;
    const length = config.bodyLengthChecker(request.body);
    if (length !== undefined) headers['content-length'] = String(length);
    Object.assign(headers, userAgent);

    const signingProperties: Record<string, unknown> = { config };
    const context: HandlerExecutionContext = {
      logger: config.logger,
      [lean.contextKey]: {
        abortSignal,
        selectedHttpAuthScheme: { httpAuthOption: { schemeId: 'aws.auth#sigv4', signingProperties }, identity, signer: this.signer },
      },
    };
    signingProperties.context = context;
    const attempt = async ({ request: signed }: { request: unknown }) => {
      const { response } = await config.requestHandler.handle(signed as SmithyHttpRequest, { abortSignal });
      try {
        return { response, output: (await config.protocol.deserializeResponse(operation, config, response)) as Output & { $metadata: object } };
      } catch (error) {
        throw withResponse(error, response);
      }
    };
    const signing = lean.httpSigningMiddleware(config)(attempt, context);
    const { output } = await lean.retryMiddleware(config)(signing as never, context)({ input, request } as never);
    return output as Output;
  }

  private async userAgentHeaders(): Promise<Record<string, string>> {
    const probe = new lean.HttpRequest({ headers: {} });
    await lean.userAgentMiddleware(this.config)(async (args) => ({ output: args, response: undefined }), {})({ input: {}, request: probe });
    return probe.headers;
  }
}

/**
 * As the SDK's deserializer: the raw response stays on an error (the retry strategy
 * reads Retry-After from it), and an error that is no service exception gets the
 * HTTP status (so a 5xx whose body is not JSON is still a server error, retried).
 */
function withResponse(error: unknown, response: SmithyHttpResponse): unknown {
  if (typeof error !== 'object' || error === null) return error;
  Object.defineProperty(error, '$response', { value: response, enumerable: false, configurable: true });
  if (!('$metadata' in error)) Object.assign(error, { $metadata: { httpStatusCode: response.statusCode } });
  return error;
}

type SourceData = string | ArrayBuffer | ArrayBufferView;
const HMAC_BLOCK_BYTES = 64;

/**
 * SHA-256 and HMAC-SHA256 for SigV4 (the client's `sha256` option, which its signer
 * takes), on Node's one-shot `crypto.hash` as src/envelope/hkdf.ts. The SDK's default
 * makes a native Hash or Hmac per digest, four per signed request, and Node 24's
 * createHmac spends about 13 µs checking a Buffer key (3-4 µs for a string or a
 * KeyObject): two HMACs per request, most of what signing cost (docs/performance.md).
 * Same contract as the SDK's: a secret makes it an HMAC (keys longer than a block are
 * hashed first, RFC 2104), digest() may be called more than once.
 */
export class SigV4Sha256 {
  private readonly key: Buffer | undefined;
  private parts: Uint8Array[] = [];

  constructor(secret?: SourceData | null) {
    // As the SDK's: an empty string or no secret is a plain hash.
    if (!secret) return;
    const key = toBytes(secret);
    if (key.length <= HMAC_BLOCK_BYTES) {
      this.key = key;
      return;
    }
    this.key = hash('sha256', key, 'buffer');
    // A copy made here from a string secret; a caller's buffer is left as it is.
    if (typeof secret === 'string') key.fill(0);
  }

  update(data: SourceData): void {
    this.parts.push(toBytes(data));
  }

  digest(): Promise<Uint8Array> {
    const parts = this.parts;
    if (this.key === undefined) return Promise.resolve(hash('sha256', parts.length === 1 ? parts[0]! : Buffer.concat(parts), 'buffer'));
    return Promise.resolve(hmacSha256(this.key, ...parts));
  }

  reset(): void {
    this.parts = [];
  }
}

function toBytes(data: SourceData): Buffer {
  if (typeof data === 'string') return Buffer.from(data, 'utf8');
  if (ArrayBuffer.isView(data)) return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  return Buffer.from(data);
}

/**
 * The SDK's own retries must end inside the engine's per-call timeout: one retry
 * (standard mode, which also retries throttling with backoff), and each attempt
 * bounded by the timeout. The abort signal ends whatever is left.
 */
const MAX_ATTEMPTS = 2;

export class AwsKmsBackend implements KeyBackend {
  readonly kind = 'aws';
  readonly name: string;
  private readonly config: AwsBackendConfig;
  private readonly clients = new Map<string, KmsCalls>();
  private readonly credentials: ReturnType<typeof fromTemporaryCredentials> | undefined;
  /** What the SDK reads for this backend (awsSdkCredentialFiles), checked again on each credential refresh. */
  private readonly sdkFiles: readonly SdkCredentialFile[];
  /** ARN of the key `keyId` names, from DescribeKey; refreshed by currentKeyVersion(). */
  private keyArn: string | undefined;

  constructor(config: AwsBackendConfig) {
    if (!awsSdkLoaded) throw new Error('AwsKmsBackend built before loadAwsSdk()');
    this.config = config;
    this.name = config.name;
    const role = config.assumeRole;
    this.sdkFiles = awsSdkCredentialFiles();
    this.credentials = role
      ? this.checked(
          fromTemporaryCredentials({
            params: {
              RoleArn: role.roleArn,
              RoleSessionName: role.sessionName,
              ...(role.externalId === undefined ? {} : { ExternalId: role.externalId }),
            },
            clientConfig: {
              region: config.region,
              maxAttempts: MAX_ATTEMPTS,
              requestHandler: requestHandlerOptions(config.timeoutMs),
            },
          }),
        )
      : undefined;
  }

  private checked<Options, Identity extends { expiration?: Date | undefined }>(
    inner: (options?: Options) => Promise<Identity>,
  ): (options?: Options) => Promise<Identity> {
    return checkedProvider(inner, `aws backend ${this.name}`, this.sdkFiles);
  }

  async currentKeyVersion(signal: AbortSignal): Promise<string> {
    // Always asks KMS: this is what the health probe calls, so an alias moved to
    // another key or a key disabled since the last probe shows up here.
    const arn = await this.describe(signal);
    this.keyArn = arn;
    return arn;
  }

  async wrap(dataKey: Uint8Array, context: WrapContext, signal: AbortSignal): Promise<WrappedKey> {
    const keyArn = await this.resolvedKeyArn(signal);
    const calls = this.client(this.config.region);
    const input: KmsSdk.EncryptCommandInput = { KeyId: keyArn, Plaintext: dataKey, EncryptionContext: contextMap(context) };
    const response = await this.call((abortSignal) => calls.send<KmsSdk.EncryptCommandOutput>(lean.encrypt, input, abortSignal), signal, keyArn);
    if (!response.CiphertextBlob || response.CiphertextBlob.length === 0) {
      throw new TrousseauError('BACKEND_UNAVAILABLE', `AWS KMS returned no ciphertext for key ${keyArn}`);
    }
    if (response.KeyId !== keyArn) {
      throw new TrousseauError('BACKEND_REJECTED', `AWS KMS encrypted with key ${safeId(response.KeyId)} instead of ${keyArn}`);
    }
    return { wrapped: response.CiphertextBlob, keyVersion: keyArn };
  }

  async unwrap(wrapped: Uint8Array, keyVersion: string, context: WrapContext, signal: AbortSignal): Promise<Uint8Array> {
    let firstFailure: unknown;
    const candidates = [...this.config.replicaKeyIds];
    try {
      candidates.unshift(await this.resolvedKeyArn(signal));
    } catch (error) {
      // An alias that cannot be resolved because its region is down must not stop
      // the replicas from being asked.
      if (candidates.length === 0 || !isUnavailable(error)) throw error;
      firstFailure = error;
    }
    for (const candidate of candidates) {
      try {
        return await this.decryptWith(candidate, wrapped, keyVersion, context, signal);
      } catch (error) {
        firstFailure ??= error;
        // Only an outage of a region is a reason to ask a replica: a refusal (wrong
        // key, wrong context, disabled key) would be the same answer everywhere.
        if (signal.aborted || !isUnavailable(error)) throw error;
      }
    }
    throw firstFailure;
  }

  async close(): Promise<void> {
    for (const calls of this.clients.values()) calls.client.destroy();
    this.clients.clear();
  }

  private async decryptWith(
    keyArn: string,
    wrapped: Uint8Array,
    keyVersion: string,
    context: WrapContext,
    signal: AbortSignal,
  ): Promise<Uint8Array> {
    const region = arnRegion(keyArn) ?? this.config.region;
    const calls = this.client(region);
    const input: KmsSdk.DecryptCommandInput = { KeyId: keyArn, CiphertextBlob: wrapped, EncryptionContext: contextMap(context) };
    const response = await this.call((abortSignal) => calls.send<KmsSdk.DecryptCommandOutput>(lean.decrypt, input, abortSignal), signal, keyArn, keyVersion);
    const plaintext = response.Plaintext;
    // KMS was told which key to use; a server answering with another key is not one
    // we trust with this envelope.
    if (response.KeyId !== keyArn) {
      plaintext?.fill(0);
      throw new TrousseauError('BACKEND_REJECTED', `AWS KMS decrypted with key ${safeId(response.KeyId)}, not the configured key ${keyArn}`);
    }
    if (!plaintext || plaintext.length === 0) {
      throw new TrousseauError('BACKEND_UNAVAILABLE', `AWS KMS returned no plaintext for key ${keyArn}`);
    }
    return plaintext;
  }

  private async resolvedKeyArn(signal: AbortSignal): Promise<string> {
    if (this.keyArn !== undefined) return this.keyArn;
    // A key ARN needs no DescribeKey before wrapping or unwrapping: KMS itself
    // refuses a key that is missing, disabled or pending deletion.
    if (KEY_ARN_PATTERN.test(this.config.keyId)) return this.config.keyId;
    // Concurrent first calls each ask (with their own deadline) rather than share
    // one call that the first caller's abort would end for all.
    const arn = await this.describe(signal);
    this.keyArn = arn;
    return arn;
  }

  /** DescribeKey of the configured key: its ARN, once it is known to be usable for wrapping. */
  private async describe(signal: AbortSignal): Promise<string> {
    const label = this.config.keyId;
    const { client } = this.client(this.config.region);
    const command = new DescribeKeyCommand({ KeyId: label });
    const response = await this.call((abortSignal) => client.send(command, { abortSignal }), signal, label);
    const metadata = response.KeyMetadata;
    if (!metadata?.Arn || !KEY_ARN_PATTERN.test(metadata.Arn)) {
      throw new TrousseauError('BACKEND_UNAVAILABLE', `AWS KMS DescribeKey of ${label} returned no usable key ARN`);
    }
    checkKeyMetadata(metadata, label === metadata.Arn ? label : `${label} (${metadata.Arn})`);
    return metadata.Arn;
  }

  private client(region: string): KmsCalls {
    let calls = this.clients.get(region);
    if (!calls) {
      const timeout = this.config.timeoutMs;
      let signer: SignatureV4Sdk.SignatureV4 | undefined;
      const client: KMSClient = new KMSClient({
        region,
        // The override is for the configured region only (VPC and FIPS endpoints are
        // regional); replicas use their region's endpoint from the SDK's usual
        // configuration (AWS_ENDPOINT_URL_KMS, the profile's endpoint_url, or the default).
        ...(region === this.config.region && this.config.endpoint !== undefined ? { endpoint: this.config.endpoint } : {}),
        // The SDK's own default chain, given the client's configuration as the SDK would
        // give it (credentialDefaultProvider), wrapped only to check its files again on refresh.
        ...(this.credentials === undefined
          ? { credentialDefaultProvider: (input: Parameters<typeof fromNodeProviderChain>[0]) => this.checked(fromNodeProviderChain(input)) }
          : { credentials: this.credentials }),
        maxAttempts: MAX_ATTEMPTS,
        retryMode: 'standard',
        requestHandler: requestHandlerOptions(timeout),
        sha256: SigV4Sha256,
        // One SigV4 signer per client, built as the SDK builds its own: without this
        // option the SDK builds a new one for every call, copying the whole client
        // configuration into it, and so also derives the signing key on every call
        // (the signer keeps the cache of derived keys).
        signer: () =>
          Promise.resolve(
            (signer ??= new lean.SignatureV4({
              credentials: client.config.credentials,
              region,
              service: 'kms',
              sha256: client.config.sha256,
              uriEscapePath: true,
            })),
          ),
      });
      calls = new KmsCalls(client);
      this.clients.set(region, calls);
    }
    return calls;
  }

  /** One SDK call, with the abort signal honoured even while the SDK waits between retries. */
  private async call<Output>(
    send: (abortSignal: AbortSignal) => Promise<Output>,
    signal: AbortSignal,
    keyLabel: string,
    keyVersion?: string,
  ): Promise<Output> {
    if (signal.aborted) throw abandoned(signal);
    let onAbort: (() => void) | undefined;
    const aborted = new Promise<never>((_, reject) => {
      onAbort = () => reject(abandoned(signal));
      signal.addEventListener('abort', onAbort, { once: true });
    });
    const sent = send(signal);
    // Whichever loses the race must not become an unhandled rejection.
    sent.catch(() => undefined);
    aborted.catch(() => undefined);
    try {
      return await Promise.race([sent, aborted]);
    } catch (error) {
      if (error instanceof TrousseauError) throw error;
      if (signal.aborted) throw abandoned(signal, error);
      throw classify(error, keyLabel, keyVersion);
    } finally {
      if (onAbort) signal.removeEventListener('abort', onAbort);
    }
  }
}

function isUnavailable(error: unknown): boolean {
  return error instanceof TrousseauError && error.code === 'BACKEND_UNAVAILABLE';
}

function abandoned(signal: AbortSignal, cause: unknown = signal.reason): TrousseauError {
  return new TrousseauError('BACKEND_UNAVAILABLE', 'AWS KMS call abandoned (deadline or cancellation)', { cause });
}

/** Only Enabled symmetric encryption keys can wrap; anything else is named plainly. */
function checkKeyMetadata(metadata: KeyMetadata, label: string): void {
  switch (metadata.KeyState) {
    case 'Enabled':
      break;
    case 'Disabled':
      throw new TrousseauError('BACKEND_REJECTED', `AWS KMS key ${label} is disabled`);
    case 'PendingDeletion':
    case 'PendingReplicaDeletion':
      throw new TrousseauError('BACKEND_REJECTED', `AWS KMS key ${label} is scheduled for deletion`);
    case 'PendingImport':
      throw new TrousseauError('BACKEND_REJECTED', `AWS KMS key ${label} has no key material (pending import)`);
    case 'Creating':
    case 'Updating':
    case 'Unavailable':
      throw new TrousseauError('BACKEND_UNAVAILABLE', `AWS KMS key ${label} is temporarily unusable (${metadata.KeyState})`);
    default:
      throw new TrousseauError('BACKEND_REJECTED', `AWS KMS key ${label} is in an unusable state`);
  }
  if (metadata.KeyUsage !== undefined && metadata.KeyUsage !== 'ENCRYPT_DECRYPT') {
    throw new TrousseauError('BACKEND_REJECTED', `AWS KMS key ${label} is not an encryption key (KeyUsage ${safeId(metadata.KeyUsage)})`);
  }
  if (metadata.KeySpec !== undefined && metadata.KeySpec !== 'SYMMETRIC_DEFAULT') {
    throw new TrousseauError('BACKEND_REJECTED', `AWS KMS key ${label} is not a symmetric key (KeySpec ${safeId(metadata.KeySpec)})`);
  }
}

/** An identifier from a response, shown only if it looks like one. */
function safeId(value: string | undefined): string {
  return value !== undefined && /^[A-Za-z0-9:/_+=.@-]{1,256}$/.test(value) ? value : '(unrecognised)';
}

const NETWORK_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ECONNABORTED',
  'ETIMEDOUT',
  'ENOTFOUND',
  'EAI_AGAIN',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'EPIPE',
  'UND_ERR_SOCKET',
]);

const CREDENTIAL_REJECTIONS = new Set([
  'UnrecognizedClientException',
  'InvalidSignatureException',
  'IncompleteSignature',
  'InvalidClientTokenId',
  'ExpiredTokenException',
  'SignatureDoesNotMatch',
]);

/**
 * Maps an SDK error to a TrousseauError by its name and HTTP status only: SDK and
 * server messages never reach `message` (they go to `cause`).
 */
export function classify(error: unknown, keyLabel: string, keyVersion?: string): TrousseauError {
  const e = (typeof error === 'object' && error !== null ? error : {}) as {
    name?: unknown;
    code?: unknown;
    $metadata?: { httpStatusCode?: number };
  };
  const name = typeof e.name === 'string' ? e.name : '';
  const status = e.$metadata?.httpStatusCode;
  const rejected = (message: string) => new TrousseauError('BACKEND_REJECTED', message, { cause: error });
  const unavailable = (message: string) => new TrousseauError('BACKEND_UNAVAILABLE', message, { cause: error });
  const otherKey =
    keyVersion !== undefined && keyVersion !== keyLabel ? ` (the copy was made with ${safeId(keyVersion)})` : '';

  switch (name) {
    case 'DisabledException':
      return rejected(`AWS KMS key ${keyLabel} is disabled`);
    case 'KMSInvalidStateException':
      return rejected(`AWS KMS key ${keyLabel} is not in a usable state (scheduled for deletion, pending import, or unavailable)`);
    case 'NotFoundException':
      return rejected(`AWS KMS key ${keyLabel} was not found`);
    case 'AccessDeniedException':
      return rejected(`access to AWS KMS key ${keyLabel} was denied (IAM or key policy, or encryption context condition)`);
    case 'InvalidCiphertextException':
      return rejected(`AWS KMS refused the wrapped copy under key ${keyLabel}: corrupted, or bound to another envelope${otherKey}`);
    case 'IncorrectKeyException':
      return rejected(`the wrapped copy was not made with AWS KMS key ${keyLabel}${otherKey}`);
    case 'InvalidKeyUsageException':
      return rejected(`AWS KMS key ${keyLabel} cannot be used to encrypt and decrypt`);
    case 'ThrottlingException':
    case 'LimitExceededException':
      return unavailable(`AWS KMS throttled calls for key ${keyLabel}`);
    case 'KMSInternalException':
    case 'DependencyTimeoutException':
    case 'KeyUnavailableException':
      return unavailable(`AWS KMS could not serve key ${keyLabel} right now (${name})`);
    case 'CredentialsProviderError':
      return unavailable('no AWS credentials could be obtained from the default credential chain');
    case 'TimeoutError':
    case 'RequestTimeout':
    case 'AbortError':
      return unavailable(`AWS KMS call for key ${keyLabel} timed out`);
  }
  if (CREDENTIAL_REJECTIONS.has(name)) return rejected(`AWS rejected the credentials used for key ${keyLabel} (${name})`);
  if (typeof e.code === 'string' && NETWORK_CODES.has(e.code)) return unavailable(`AWS KMS endpoint unreachable (${e.code})`);
  if (status !== undefined && (status >= 500 || status === 429)) return unavailable(`AWS KMS answered HTTP ${status}`);
  if (status !== undefined && status >= 400) {
    return rejected(`AWS KMS refused the call for key ${keyLabel} (HTTP ${status}${/^[A-Za-z]{1,64}$/.test(name) ? `, ${name}` : ''})`);
  }
  // No HTTP answer at all: a network or client-side failure, which may pass.
  return unavailable(`AWS KMS call for key ${keyLabel} failed without an answer from the server`);
}
