/**
 * `kms-plugin` backend: another Kubernetes KMS v2 plugin as one backend.
 *
 * Every cloud and HSM vendor ships a KMS v2 plugin (GCP k8s-cloudkms-plugin, Azure
 * kubernetes-kms, aws-encryption-provider, vault-kubernetes-kms, ...). This backend
 * talks to such a plugin's unix socket exactly as kube-apiserver would: wrap is its
 * Encrypt of our 32-byte data key, unwrap its Decrypt of the ciphertext it returned,
 * and its Status gives the key version and health. So Trousseau can keep a copy with
 * any KMS that has a plugin, including KMSes it has no SDK for.
 *
 * The copy (the "wrapped" bytes in our envelope) holds everything the inner plugin's
 * Decrypt needs: its ciphertext, its key_id and its annotations (layout below). The
 * copy's key version is the inner key_id when that is a short printable string (the
 * envelope header allows 255 printable bytes), else "sha256:" and its hex digest.
 *
 * Binding: KMS v2 has no field for associated data, so the wrap context cannot reach
 * the inner KMS. A copy is bound to its envelope only by our authenticated header and
 * the key commitment checked after unwrap (docs/envelope.md, "Threat model per backend
 * type"): a copy moved to another envelope unwraps to a key that fails that envelope's
 * commitment.
 *
 * Trust: whoever can bind or connect to the inner socket sees our data keys (Decrypt)
 * or can mint copies (Encrypt). So the socket's folder, and every folder on the way to
 * it, must be one only root (or the plugin's own user) can change, as for our own
 * socket (kms/socket.ts); the socket itself must be a socket, not a link. This is
 * checked before the first call and again at most every SOCKET_RECHECK_MS, and gRPC
 * dials the real path found, never the configured path through links.
 *
 * Errors: the inner plugin's gRPC status decides. Connection refused, UNAVAILABLE and
 * DEADLINE_EXCEEDED are BACKEND_UNAVAILABLE; INVALID_ARGUMENT and the other caller
 * statuses are BACKEND_REJECTED. Most plugins, both tested peers included, answer every
 * failure with UNKNOWN, whether the ciphertext was bad or their KMS is down. For a
 * Decrypt that fails that way the backend asks Status afresh: a plugin that calls
 * itself healthy right after refusing a copy refused that copy (rejected, no breaker
 * trip, so planted garbage copies cannot open the breaker); otherwise it is down.
 * An Encrypt of our own random key has nothing to refuse, so its UNKNOWN is an outage.
 * The inner plugin's messages go to `cause` only: they may name URLs and key paths.
 */
import { createHash, randomUUID } from 'node:crypto';
import { lstat, stat } from 'node:fs/promises';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { z } from 'zod';
import { MAX_KEY_VERSION_BYTES, MAX_WRAPPED_BYTES } from '../envelope/limits.ts';
import { isTrousseauError, TrousseauError } from '../errors.ts';
import { V2Service } from '../kms/proto.ts';
import { prepareTrustedFolder } from '../config/trusted-path.ts';
import type { V2DecryptRequest, V2DecryptResponse, V2EncryptRequest, V2EncryptResponse, V2StatusResponse } from '../kms/types.ts';
import type { KeyBackend, WrapContext, WrappedKey } from './backend.ts';
import { commonBackendFields, type BackendDefinition } from './definition.ts';

/** Layout byte of a kms-plugin copy; a new layout gets a new byte, old ones keep decrypting. */
const COPY_LAYOUT_1 = 0x01;
/** The apiserver's own bounds on what a plugin returns (k8s.io/kms v2). */
const MAX_INNER_CIPHERTEXT_BYTES = 1024;
const MAX_INNER_KEY_ID_BYTES = 1024;
const MAX_INNER_ANNOTATIONS = 16;
const MAX_ANNOTATION_NAME_BYTES = 253;
/** Largest message exchanged with the inner plugin: a copy is at most 2 KiB, a response a little more. */
const MAX_MESSAGE_BYTES = 64 * 1024;
/** How often the socket path is checked again (a few lstat calls). */
const SOCKET_RECHECK_MS = 1000;
/** Reconnect quickly after the inner plugin restarts (grpc-js backs off up to 120 s by default). */
const RECONNECT_BACKOFF_MS = { initial: 100, max: 1000 };
const PRINTABLE_KEY_VERSION = new RegExp(`^[\\x21-\\x7e]{1,${MAX_KEY_VERSION_BYTES}}$`);
/** KMS v2 Status versions kube-apiserver accepts. */
const V2_VERSIONS = new Set(['v2', 'v2beta1']);

export const kmsPluginConfigSchema = z
  .object({
    ...commonBackendFields,
    type: z.literal('kms-plugin'),
    /**
     * The inner plugin's unix socket (what its --listen / -socket flag names, without
     * "unix://"). Its folder and every folder above must be owned by root (or the
     * plugin's user) and not writable by others: whoever can bind there sees our data keys.
     */
    socket: z
      .string()
      .min(1)
      .max(107, 'must fit in a unix socket address (107 bytes)')
      .refine((p) => !p.includes('\0') && !p.startsWith('unix:'), 'must be a file path (no "unix:" prefix)'),
    /**
     * How long, in milliseconds, an answer of the inner plugin's Status is reused for the
     * key version and health (default 5000). The health probe asks for the key version
     * on its own interval, so Status is polled at the slower of the two.
     */
    statusIntervalMs: z.number().int().min(0).max(300_000).default(5000),
  })
  .strict();

export type KmsPluginBackendConfig = z.output<typeof kmsPluginConfigSchema>;

export const kmsPluginBackend: BackendDefinition<typeof kmsPluginConfigSchema> = {
  type: 'kms-plugin',
  configSchema: kmsPluginConfigSchema,
  create: async (config, deps) => new KmsPluginBackend({ ...config, socket: path.resolve(deps.baseDir, config.socket) }),
};

/** What the inner plugin's Decrypt needs back, as stored in our copy. */
export interface InnerCopy {
  ciphertext: Uint8Array;
  keyId: string;
  annotations: Map<string, Uint8Array>;
}

/** The copy's key version for an inner key_id: the key_id itself when the envelope header can hold it. */
export function keyVersionOf(keyId: string): string {
  return PRINTABLE_KEY_VERSION.test(keyId) ? keyId : `sha256:${createHash('sha256').update(keyId, 'utf8').digest('hex')}`;
}

/**
 * Copy layout 1, all lengths big-endian:
 *   u8 0x01 | u16 n, n bytes ciphertext | u16 k, k bytes key_id (UTF-8) |
 *   u8 count, count x (u8 a, a bytes annotation name | u16 v, v bytes value)
 * Annotations are written sorted by name, so one inner answer has one encoding.
 */
export function encodeCopy(copy: InnerCopy): Buffer | undefined {
  const keyId = Buffer.from(copy.keyId, 'utf8');
  const names = [...copy.annotations.keys()].sort();
  const parts: Buffer[] = [Buffer.from([COPY_LAYOUT_1]), u16(copy.ciphertext.length), Buffer.from(copy.ciphertext), u16(keyId.length), keyId, Buffer.from([names.length])];
  for (const name of names) {
    const nameBytes = Buffer.from(name, 'utf8');
    const value = copy.annotations.get(name)!;
    if (nameBytes.length < 1 || nameBytes.length > MAX_ANNOTATION_NAME_BYTES || value.length > 0xffff) return undefined;
    parts.push(Buffer.from([nameBytes.length]), nameBytes, u16(value.length), Buffer.from(value));
  }
  const bytes = Buffer.concat(parts);
  return bytes.length <= MAX_WRAPPED_BYTES ? bytes : undefined;
}

/** The copy's parts, or undefined when the bytes are not a layout-1 copy (checked before any call). */
export function decodeCopy(bytes: Uint8Array): InnerCopy | undefined {
  const buffer = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let at = 0;
  const take = (n: number): Buffer | undefined => {
    if (at + n > buffer.length) return undefined;
    const part = buffer.subarray(at, at + n);
    at += n;
    return part;
  };
  const byte = () => take(1)?.[0];
  const short = () => take(2)?.readUInt16BE(0);
  if (byte() !== COPY_LAYOUT_1) return undefined;
  const ciphertextLength = short();
  if (ciphertextLength === undefined || ciphertextLength < 1 || ciphertextLength > MAX_INNER_CIPHERTEXT_BYTES) return undefined;
  const ciphertext = take(ciphertextLength);
  const keyIdLength = short();
  if (!ciphertext || keyIdLength === undefined || keyIdLength < 1 || keyIdLength > MAX_INNER_KEY_ID_BYTES) return undefined;
  const keyIdBytes = take(keyIdLength);
  const count = byte();
  if (!keyIdBytes || count === undefined || count > MAX_INNER_ANNOTATIONS) return undefined;
  const keyId = keyIdBytes.toString('utf8');
  if (!Buffer.from(keyId, 'utf8').equals(keyIdBytes)) return undefined; // not valid UTF-8
  const annotations = new Map<string, Uint8Array>();
  let previous = '';
  for (let i = 0; i < count; i++) {
    const nameLength = byte();
    const name = nameLength ? take(nameLength)?.toString('utf8') : undefined;
    const valueLength = short();
    const value = valueLength === undefined ? undefined : take(valueLength);
    // Sorted and unique, as encodeCopy writes them: one copy has one reading.
    if (name === undefined || value === undefined || name <= previous) return undefined;
    annotations.set(name, value);
    previous = name;
  }
  if (at !== buffer.length) return undefined;
  return { ciphertext, keyId, annotations };
}

function u16(value: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value);
  return b;
}

/** One Status answer and when it was asked for. */
interface StatusAnswer {
  askedAt: number;
  response: V2StatusResponse;
}

/** A Status call shared by the callers waiting for it. */
interface StatusFlight {
  startedAt: number;
  answer: Promise<StatusAnswer>;
  controller: AbortController;
  waiters: number;
}

/** Statuses that mean "this request or this key", not "try again later". */
const REJECTING_STATUSES = new Set([
  grpc.status.INVALID_ARGUMENT,
  grpc.status.FAILED_PRECONDITION,
  grpc.status.PERMISSION_DENIED,
  grpc.status.UNAUTHENTICATED,
  grpc.status.NOT_FOUND,
  grpc.status.OUT_OF_RANGE,
  grpc.status.ALREADY_EXISTS,
  grpc.status.UNIMPLEMENTED,
  grpc.status.DATA_LOSS,
]);
/** Statuses that say nothing about the request: most plugins answer every failure so. */
const AMBIGUOUS_STATUSES = new Set([grpc.status.UNKNOWN, grpc.status.INTERNAL]);

type Method = 'Status' | 'Encrypt' | 'Decrypt';

export class KmsPluginBackend implements KeyBackend {
  readonly kind = 'kms-plugin';
  readonly name: string;
  private readonly config: KmsPluginBackendConfig;
  private client: grpc.Client | undefined;
  /** The real socket path the client dials, and when it was last found trustworthy. */
  private target: { realPath: string; checkedAt: number } | undefined;
  private checking: Promise<string> | undefined;
  private lastStatus: StatusAnswer | undefined;
  private statusInFlight: StatusFlight | undefined;
  private closed = false;

  /** `config.socket` must be absolute (the definition resolves it against the config's folder). */
  constructor(config: KmsPluginBackendConfig) {
    this.config = config;
    this.name = config.name;
  }

  async currentKeyVersion(signal: AbortSignal): Promise<string> {
    const answer = await this.status(signal, Date.now() - this.config.statusIntervalMs);
    return keyVersionOf(this.healthyKeyId(answer.response));
  }

  async wrap(dataKey: Uint8Array, _context: WrapContext, signal: AbortSignal): Promise<WrappedKey> {
    const request: V2EncryptRequest = { plaintext: Buffer.from(dataKey), uid: randomUUID() };
    let response: V2EncryptResponse;
    try {
      response = await this.call<V2EncryptRequest, V2EncryptResponse>('Encrypt', request, signal);
    } finally {
      request.plaintext.fill(0); // our copy of the key; grpc-js has serialised it by now
    }
    const ciphertext = response.ciphertext;
    const keyId = response.key_id;
    if (!(ciphertext instanceof Uint8Array) || ciphertext.length === 0 || ciphertext.length > MAX_INNER_CIPHERTEXT_BYTES) {
      throw new TrousseauError('BACKEND_UNAVAILABLE', `${this.label}: Encrypt returned no ciphertext or one over ${MAX_INNER_CIPHERTEXT_BYTES} bytes`);
    }
    if (typeof keyId !== 'string' || keyId.length === 0 || Buffer.byteLength(keyId) > MAX_INNER_KEY_ID_BYTES) {
      throw new TrousseauError('BACKEND_UNAVAILABLE', `${this.label}: Encrypt returned an empty or oversized key_id`);
    }
    const annotations = new Map(Object.entries(response.annotations ?? {}));
    if (annotations.size > MAX_INNER_ANNOTATIONS) {
      throw new TrousseauError('BACKEND_REJECTED', `${this.label}: Encrypt returned more than ${MAX_INNER_ANNOTATIONS} annotations`);
    }
    const wrapped = encodeCopy({ ciphertext, keyId, annotations });
    if (!wrapped) {
      throw new TrousseauError('BACKEND_REJECTED', `${this.label}: the inner ciphertext, key_id and annotations do not fit in one copy (${MAX_WRAPPED_BYTES} bytes)`);
    }
    // A key_id other than the one Status announced: the inner key rotated. The next
    // key version question asks Status again instead of announcing the old one.
    if (this.lastStatus && this.lastStatus.response.key_id !== keyId) this.lastStatus = undefined;
    return { wrapped, keyVersion: keyVersionOf(keyId) };
  }

  async unwrap(wrapped: Uint8Array, keyVersion: string, _context: WrapContext, signal: AbortSignal): Promise<Uint8Array> {
    const copy = decodeCopy(wrapped);
    if (!copy) throw new TrousseauError('BACKEND_REJECTED', `${this.label}: wrapped key is not a kms-plugin copy`);
    if (keyVersionOf(copy.keyId) !== keyVersion) {
      throw new TrousseauError('BACKEND_REJECTED', `${this.label}: the copy's key_id does not match its recorded key version`);
    }
    const request: V2DecryptRequest = {
      ciphertext: Buffer.from(copy.ciphertext),
      key_id: copy.keyId,
      annotations: Object.fromEntries([...copy.annotations].map(([name, value]) => [name, Buffer.from(value)])),
      uid: randomUUID(),
    };
    const startedAt = Date.now();
    let response: V2DecryptResponse;
    try {
      response = await this.call<V2DecryptRequest, V2DecryptResponse>('Decrypt', request, signal);
    } catch (error) {
      if (error instanceof AmbiguousFailure) throw await this.judgeDecryptFailure(error, startedAt, signal);
      throw error;
    }
    if (!(response.plaintext instanceof Uint8Array)) {
      throw new TrousseauError('BACKEND_UNAVAILABLE', `${this.label}: Decrypt returned no plaintext`);
    }
    return response.plaintext;
  }

  async close(): Promise<void> {
    this.closed = true;
    this.client?.close();
    this.client = undefined;
  }

  private get label(): string {
    return `kms-plugin backend ${this.name}`;
  }

  /** The key_id of a healthy Status answer; anything else is unavailable (or not a KMS v2 plugin). */
  private healthyKeyId(response: V2StatusResponse): string {
    if (!V2_VERSIONS.has(response.version)) {
      throw new TrousseauError('BACKEND_REJECTED', `${this.label}: the plugin on the socket does not speak KMS v2 (Status version is not v2)`);
    }
    // The healthz text is the plugin's own; only "ok" is shown, never what else it said.
    if (response.healthz !== 'ok') throw new TrousseauError('BACKEND_UNAVAILABLE', `${this.label}: the inner plugin reports itself unhealthy (Status healthz is not "ok")`);
    if (!response.key_id || Buffer.byteLength(response.key_id) > MAX_INNER_KEY_ID_BYTES) {
      throw new TrousseauError('BACKEND_UNAVAILABLE', `${this.label}: Status returned an empty or oversized key_id`);
    }
    return response.key_id;
  }

  /**
   * A Status answer asked for at `notBefore` or later: the last one, the one in flight,
   * or a new call. Callers share a call in flight; it lives while at least one of them
   * still waits (each stops waiting at its own signal), so one caller's abort does not
   * end it for the others, and nobody's abandoned call goes on alone.
   */
  private async status(signal: AbortSignal, notBefore: number): Promise<StatusAnswer> {
    if (this.lastStatus && this.lastStatus.askedAt >= notBefore) return this.lastStatus;
    let flight = this.statusInFlight;
    if (!flight || flight.startedAt < notBefore) {
      const startedAt = Date.now();
      const controller = new AbortController();
      const answer = this.call<object, V2StatusResponse>('Status', {}, controller.signal).then((response) => {
        const result = { askedAt: startedAt, response };
        if (!this.lastStatus || this.lastStatus.askedAt <= startedAt) this.lastStatus = result;
        return result;
      });
      const started: StatusFlight = { startedAt, answer, controller, waiters: 0 };
      answer.then(
        () => this.clearFlight(started),
        () => this.clearFlight(started),
      );
      this.statusInFlight = started;
      flight = started;
    }
    const shared = flight;
    shared.waiters += 1;
    try {
      return await abortable(shared.answer, signal, () => this.abandoned(signal.reason));
    } finally {
      shared.waiters -= 1;
      if (shared.waiters === 0) {
        // Nobody joins a call being cancelled: the next caller starts a new one.
        this.clearFlight(shared);
        shared.controller.abort(new Error('no caller waits for this Status any more'));
      }
    }
  }

  private clearFlight(flight: StatusFlight): void {
    if (this.statusInFlight === flight) this.statusInFlight = undefined;
  }

  /**
   * A Decrypt failed. With a clear status the status decides; with UNKNOWN or INTERNAL,
   * a Status asked after the failed call began does: healthy means the copy was refused.
   */
  private async judgeDecryptFailure(error: AmbiguousFailure, startedAt: number, signal: AbortSignal): Promise<TrousseauError> {
    try {
      const answer = await this.status(signal, startedAt);
      this.healthyKeyId(answer.response);
    } catch (statusError) {
      return new TrousseauError('BACKEND_UNAVAILABLE', `${this.label}: Decrypt failed and the inner plugin is not healthy`, { cause: [error, statusError] });
    }
    return new TrousseauError('BACKEND_REJECTED', `${this.label}: the inner plugin refused the copy while healthy (corrupted, or not made by its key)`, {
      cause: error,
    });
  }

  /** The real path of a socket we may send keys to; checked again at most every SOCKET_RECHECK_MS. */
  private trustedSocket(): Promise<string> {
    const target = this.target;
    if (target && Date.now() - target.checkedAt < SOCKET_RECHECK_MS) return Promise.resolve(target.realPath);
    this.checking ??= this.checkSocket().finally(() => (this.checking = undefined));
    return this.checking;
  }

  private async checkSocket(): Promise<string> {
    const socket = this.config.socket;
    const folder = path.dirname(socket);
    // The folder must exist: we never create the inner plugin's folder (it does).
    const folderInfo = await stat(folder).catch((error: NodeJS.ErrnoException) => error);
    if (folderInfo instanceof Error) {
      const reason = folderInfo.code === 'ENOENT' ? 'does not exist (is the inner plugin running?)' : `cannot be read (${folderInfo.code ?? 'error'})`;
      throw new TrousseauError('BACKEND_UNAVAILABLE', `${this.label}: the socket folder ${folder} ${reason}`, { cause: folderInfo });
    }
    let realFolder: string;
    try {
      realFolder = await prepareTrustedFolder(folder, 'the socket folder');
    } catch (error) {
      const reason = isTrousseauError(error) ? error.message : 'it cannot be checked';
      throw new TrousseauError('BACKEND_REJECTED', `${this.label}: not calling the inner plugin: ${reason}`, { cause: error });
    }
    const realPath = path.join(realFolder, path.basename(socket));
    const info = await lstat(realPath).catch((error: NodeJS.ErrnoException) => error);
    if (info instanceof Error) {
      const reason = info.code === 'ENOENT' ? 'no socket there (is the inner plugin running?)' : `cannot look at it (${info.code ?? 'error'})`;
      throw new TrousseauError('BACKEND_UNAVAILABLE', `${this.label}: ${socket}: ${reason}`, { cause: info });
    }
    if (info.isSymbolicLink()) {
      throw new TrousseauError('BACKEND_REJECTED', `${this.label}: ${socket} is a link; configure the socket's real path`);
    }
    if (!info.isSocket()) throw new TrousseauError('BACKEND_REJECTED', `${this.label}: ${socket} is not a socket`);
    if (this.target?.realPath !== realPath) {
      // A link on the way now leads elsewhere (or this is the first check): dial the new place.
      this.client?.close();
      this.client = undefined;
    }
    this.target = { realPath, checkedAt: Date.now() };
    return realPath;
  }

  private clientFor(realPath: string): grpc.Client {
    this.client ??= new V2Service(`unix:${realPath}`, grpc.credentials.createInsecure(), {
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
      'grpc.initial_reconnect_backoff_ms': RECONNECT_BACKOFF_MS.initial,
      'grpc.max_reconnect_backoff_ms': RECONNECT_BACKOFF_MS.max,
      'grpc.enable_channelz': 0,
    });
    return this.client;
  }

  /** One unary call to the inner plugin, ended by `signal` (and by a deadline of timeoutMs). */
  private async call<Req, Res>(method: Method, request: Req, signal: AbortSignal): Promise<Res> {
    if (this.closed) throw new TrousseauError('BACKEND_UNAVAILABLE', `${this.label}: closed`);
    if (signal.aborted) throw this.abandoned(signal.reason);
    const realPath = await abortable(this.trustedSocket(), signal, () => this.abandoned(signal.reason));
    const client = this.clientFor(realPath);
    const fn = (client as unknown as Record<Method, (r: Req, o: grpc.CallOptions, cb: (e: grpc.ServiceError | null, r: Res) => void) => grpc.ClientUnaryCall>)[
      method
    ];
    return new Promise<Res>((resolve, reject) => {
      const onAbort = () => {
        pending.cancel();
        reject(this.abandoned(signal.reason));
      };
      const pending = fn.call(client, request, { deadline: Date.now() + this.config.timeoutMs }, (error, response) => {
        signal.removeEventListener('abort', onAbort);
        if (error) reject(signal.aborted ? this.abandoned(signal.reason, error) : this.classify(method, error));
        else resolve(response);
      });
      signal.addEventListener('abort', onAbort, { once: true });
    });
  }

  private abandoned(reason: unknown, cause: unknown = reason): TrousseauError {
    return new TrousseauError('BACKEND_UNAVAILABLE', `${this.label}: call abandoned (deadline or cancellation)`, { cause });
  }

  /** The inner plugin's status to our classes, by code only: its details go to `cause`. */
  private classify(method: Method, error: grpc.ServiceError): TrousseauError {
    const code = grpc.status[error.code] ?? String(error.code);
    if (REJECTING_STATUSES.has(error.code)) {
      return new TrousseauError('BACKEND_REJECTED', `${this.label}: inner plugin refused ${method} (${code})`, { cause: error });
    }
    const message = `${this.label}: inner plugin ${method} failed (${code})`;
    return AMBIGUOUS_STATUSES.has(error.code) ? new AmbiguousFailure(message, { cause: error }) : new TrousseauError('BACKEND_UNAVAILABLE', message, { cause: error });
  }
}

/** An UNKNOWN or INTERNAL failure: unavailable, unless unwrap settles it with a fresh Status. */
class AmbiguousFailure extends TrousseauError {
  constructor(message: string, options: { cause: unknown }) {
    super('BACKEND_UNAVAILABLE', message, options);
  }
}

/** `promise`, or `onAbort()` as soon as `signal` aborts. */
function abortable<T>(promise: Promise<T>, signal: AbortSignal, onAbort: () => Error): Promise<T> {
  if (signal.aborted) {
    promise.catch(() => undefined);
    return Promise.reject(onAbort());
  }
  return new Promise<T>((resolve, reject) => {
    const abort = () => reject(onAbort());
    signal.addEventListener('abort', abort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener('abort', abort);
        resolve(value);
      },
      (error: Error) => {
        signal.removeEventListener('abort', abort);
        reject(error);
      },
    );
  });
}
