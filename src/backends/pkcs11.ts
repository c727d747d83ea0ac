/**
 * PKCS#11 backend: a key held in an HSM (Thales Luna, Entrust nShield, YubiHSM 2,
 * AWS CloudHSM, SoftHSM2 in tests) through the vendor's PKCS#11 module.
 *
 * Wraps with CKM_AES_GCM under an AES-256 token key that is sensitive and never
 * extractable, the wrap context as AAD (so a copy moved to another envelope fails
 * at the token); the plugin draws the 96-bit IV. The key version is the key's label
 * and its check value (CKA_CHECK_VALUE), "trousseau-2:1a2b3c": rotation is a new key
 * object under a new label, with the old label kept in `previousKeys` so that older
 * copies still unwrap. See docs/backends/pkcs11.md and policies/pkcs11/.
 *
 * Threads: PKCS#11 calls block in C for as long as the HSM takes, so every call
 * goes to a worker thread of this backend (pkcs11-worker.ts) that owns the module
 * and its logged-in session. The caller never waits for the worker beyond its own
 * signal: an aborted call is answered at once and its late result dropped (a data
 * key zeroed). The worker skips calls whose deadline passed while they waited, at
 * most MAX_PENDING calls wait at all, and a token that has calls to answer but
 * has answered none for STUCK_MS makes new calls fail at once as unavailable
 * instead of queueing behind it. pkcs11js (the native binding) is loaded only by that worker, so a plugin
 * without a pkcs11 backend never loads it.
 */
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import type { Logger } from 'pino';
import { z } from 'zod';
import { TrousseauError } from '../errors.ts';
import { contextBytes, type KeyBackend, type WrapContext, type WrappedKey } from './backend.ts';
import { commonBackendFields, type BackendDefinition } from './definition.ts';
import type { TokenSettings } from './pkcs11-token.ts';
import type { WorkerReply, WorkerRequest } from './pkcs11-worker.ts';

/** Calls waiting for the worker at most; more are refused as overload, before the token is asked. */
const MAX_PENDING = 64;
/** A token call running this long means the token hangs: new calls fail at once instead of queueing. */
const STUCK_MS = 3000;
/** How long close() waits for the worker to log out before it is terminated. */
const CLOSE_TIMEOUT_MS = 2000;
const WRAPPED_BYTES = 60;
/**
 * Extra time a call sent before the worker has started may wait in its queue:
 * starting a thread and loading the module can take seconds on a loaded node. The
 * caller's own signal still bounds what the caller waits.
 */
const STARTUP_ALLOWANCE_MS = 10_000;

const label = z.string().regex(/^[\x21-\x39\x3b-\x7e]{1,64}$/, 'must be 1 to 64 printable ASCII characters, without spaces or ":"');
const keySelector = z
  .object({
    /** CKA_LABEL of the AES-256 secret key. */
    label,
    /** CKA_ID as hex, when several objects share the label. */
    id: z.string().regex(/^([0-9a-f]{2}){1,64}$/, 'must be lowercase hex').optional(),
  })
  .strict();

export const pkcs11ConfigSchema = z
  .object({
    ...commonBackendFields,
    type: z.literal('pkcs11'),
    /** Path of the vendor's PKCS#11 module (shared library), e.g. /usr/lib/softhsm/libsofthsm2.so; owned by root, not writable by others. */
    module: z.string().min(1),
    /** Label of the token (CKA token label); give this or slot. */
    tokenLabel: z.string().min(1).max(32).optional(),
    /** Slot number of the token; give this or tokenLabel. */
    slot: z.number().int().min(0).max(2 ** 48).optional(),
    /** File (mode 0600, owned by the plugin's user or root, not a link) holding the user PIN; re-read at every login. */
    pinFile: z.string().min(1),
    /** The key new wraps use. */
    key: keySelector,
    /** Older keys, kept only to unwrap copies made before a rotation. */
    previousKeys: z.array(keySelector).max(32).default([]),
  })
  .strict()
  .refine((c) => (c.tokenLabel === undefined) !== (c.slot === undefined), { message: 'give exactly one of tokenLabel and slot', path: ['tokenLabel'] })
  .refine((c) => new Set([c.key.label, ...c.previousKeys.map((k) => k.label)]).size === 1 + c.previousKeys.length, {
    message: 'every key needs a label of its own',
    path: ['previousKeys'],
  });

export type Pkcs11BackendConfig = z.output<typeof pkcs11ConfigSchema>;

export const pkcs11Backend: BackendDefinition<typeof pkcs11ConfigSchema> = {
  type: 'pkcs11',
  configSchema: pkcs11ConfigSchema,
  create: async (config, deps) => new Pkcs11Backend(config, deps),
};

interface Pending {
  resolve(reply: Extract<WorkerReply, { ok: true }>): void;
  reject(error: Error): void;
}

type Request = DistributiveOmit<WorkerRequest, 'id' | 'backend' | 'deadline'>;

/**
 * The plugin's side of one module's worker thread (pkcs11-worker.ts), shared by
 * every pkcs11 backend on that module: the module's state is one per process, so
 * one thread owns it. Started at the first call, ended when its last backend closes.
 */
class ModuleWorker {
  private static readonly byModule = new Map<string, ModuleWorker>();

  static for(modulePath: string): ModuleWorker {
    let shared = ModuleWorker.byModule.get(modulePath);
    if (!shared) {
      shared = new ModuleWorker(modulePath);
      ModuleWorker.byModule.set(modulePath, shared);
    }
    return shared;
  }

  private readonly modulePath: string;
  private worker: Worker | undefined;
  private readonly pending = new Map<number, Pending>();
  private readonly registered = new Map<number, TokenSettings>();
  private nextId = 1;
  private nextBackend = 1;
  /** Whether the current thread has answered once (started and loaded its code). */
  private started = false;
  /** When the thread last answered, was started, or was given work while idle. */
  private lastProgressAt = Date.now();
  private logger: Logger | undefined;

  private constructor(modulePath: string) {
    this.modulePath = modulePath;
  }

  /** A backend joins; its settings are sent to the thread before its first call. */
  register(settings: TokenSettings, logger: Logger | undefined): number {
    const backend = this.nextBackend++;
    this.registered.set(backend, settings);
    this.logger ??= logger;
    if (this.worker) this.worker.postMessage({ id: 0, backend, deadline: 0, op: 'register', settings } satisfies WorkerRequest);
    return backend;
  }

  /** A backend leaves; the last one ends the thread, which finalizes the module. */
  async release(backend: number): Promise<void> {
    if (!this.registered.delete(backend)) return;
    const worker = this.worker;
    if (this.registered.size === 0) {
      ModuleWorker.byModule.delete(this.modulePath);
      this.worker = undefined;
    }
    if (!worker) return;
    const exited = this.registered.size === 0 ? new Promise<void>((resolve) => worker.once('exit', () => resolve())) : undefined;
    worker.ref();
    worker.postMessage({ id: 0, backend, deadline: 0, op: 'release' } satisfies WorkerRequest);
    if (!exited) return;
    const timer = setTimeout(() => void worker.terminate(), CLOSE_TIMEOUT_MS);
    await exited;
    clearTimeout(timer);
  }

  call(backend: number, request: Request, timeoutMs: number, signal: AbortSignal, what: string): Promise<Extract<WorkerReply, { ok: true }>> {
    if (signal.aborted) return Promise.reject(signal.reason as Error);
    if (this.pending.size > 0) {
      // Stuck: busy with calls and no answer for a while (a thread still starting gets longer).
      const silent = Date.now() - this.lastProgressAt;
      if (silent > (this.started ? STUCK_MS : STARTUP_ALLOWANCE_MS)) {
        return Promise.reject(new TrousseauError('BACKEND_UNAVAILABLE', `${what}: the token has not answered for ${silent} ms`));
      }
    } else {
      this.lastProgressAt = Date.now(); // an idle thread is not a silent one
    }
    if (this.pending.size >= MAX_PENDING) {
      return Promise.reject(new TrousseauError('OVERLOADED', `${what}: ${MAX_PENDING} calls are waiting for the token already`));
    }
    const worker = this.workerNow();
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const onAbort = () => {
        // The thread may still run it; its reply finds no one waiting and is dropped.
        this.pending.delete(id);
        this.idle();
        reject(signal.reason as Error);
      };
      signal.addEventListener('abort', onAbort, { once: true });
      this.pending.set(id, {
        resolve: (reply) => {
          signal.removeEventListener('abort', onAbort);
          resolve(reply);
        },
        reject: (error) => {
          signal.removeEventListener('abort', onAbort);
          reject(error);
        },
      });
      worker.ref();
      const deadline = Date.now() + timeoutMs + (this.started ? 0 : STARTUP_ALLOWANCE_MS);
      const message: WorkerRequest = { ...request, id, backend, deadline };
      worker.postMessage(message);
    });
  }

  private workerNow(): Worker {
    if (this.worker) return this.worker;
    const worker = new Worker(new URL('./pkcs11-worker.ts', import.meta.url), { workerData: this.modulePath, name: 'pkcs11' });
    worker.on('message', (reply: WorkerReply) => this.settle(reply));
    worker.on('error', (error: Error) => {
      // A crash of the thread (the module's fault or ours) is an outage of these backends, never of the plugin.
      this.logger?.error({ err: { name: error.name } }, 'pkcs11 module thread failed; it is restarted at the next call');
    });
    worker.on('exit', () => {
      if (this.worker === worker) {
        this.worker = undefined;
        this.started = false;
      }
      const waiting = [...this.pending.values()];
      this.pending.clear();
      for (const p of waiting) p.reject(new TrousseauError('BACKEND_UNAVAILABLE', 'pkcs11: the module thread stopped'));
    });
    this.worker = worker;
    this.started = false;
    this.lastProgressAt = Date.now();
    for (const [backend, settings] of this.registered) worker.postMessage({ id: 0, backend, deadline: 0, op: 'register', settings } satisfies WorkerRequest);
    return worker;
  }

  private settle(reply: WorkerReply): void {
    this.lastProgressAt = Date.now();
    if (reply.id === 0) return; // register and release answer nobody
    this.started = true;
    const waiting = this.pending.get(reply.id);
    this.pending.delete(reply.id);
    this.idle();
    if (!waiting) {
      if (reply.ok) reply.dataKey?.fill(0);
      return;
    }
    if (reply.ok) {
      waiting.resolve(reply);
      return;
    }
    const code = reply.kind === 'rejected' ? 'BACKEND_REJECTED' : reply.kind === 'expired' ? 'DEADLINE' : 'BACKEND_UNAVAILABLE';
    waiting.reject(new TrousseauError(code, reply.message));
  }

  /** Let the process exit while no call is waiting (a CLI run), as with an idle socket. */
  private idle(): void {
    if (this.pending.size === 0) this.worker?.unref();
  }
}

export class Pkcs11Backend implements KeyBackend {
  readonly kind = 'pkcs11';
  readonly name: string;
  private readonly timeoutMs: number;
  private readonly logger: Logger | undefined;
  private readonly thread: ModuleWorker;
  private readonly backendId: number;
  private closed = false;
  /** Logins to the token so far (1 after the first call; more after each token reset). */
  logins = 0;

  constructor(config: Pkcs11BackendConfig, deps: { baseDir: string; logger?: Logger }) {
    this.name = config.name;
    this.timeoutMs = config.timeoutMs;
    this.logger = deps.logger;
    const settings: TokenSettings = {
      modulePath: path.resolve(deps.baseDir, config.module),
      tokenLabel: config.tokenLabel,
      slot: config.slot,
      pinFile: path.resolve(deps.baseDir, config.pinFile),
      keys: [config.key, ...config.previousKeys],
    };
    this.thread = ModuleWorker.for(settings.modulePath);
    this.backendId = this.thread.register(settings, deps.logger);
  }

  async currentKeyVersion(signal: AbortSignal): Promise<string> {
    return (await this.call({ op: 'version' }, signal)).keyVersion!;
  }

  async wrap(dataKey: Uint8Array, context: WrapContext, signal: AbortSignal): Promise<WrappedKey> {
    // Copies of their own for the thread (the data key is zeroed there): a view into
    // Node's shared buffer pool would send the whole 8 KiB pool slab with it.
    const reply = await this.call({ op: 'wrap', dataKey: new Uint8Array(dataKey), aad: new Uint8Array(contextBytes(context)) }, signal);
    return { wrapped: reply.wrapped!, keyVersion: reply.keyVersion! };
  }

  async unwrap(wrapped: Uint8Array, keyVersion: string, context: WrapContext, signal: AbortSignal): Promise<Uint8Array> {
    // Checked here too, so a malformed copy costs no message to the thread.
    if (wrapped.length !== WRAPPED_BYTES) throw new TrousseauError('BACKEND_REJECTED', `pkcs11 backend ${this.name}: wrapped key has the wrong length for a pkcs11 copy`);
    const reply = await this.call({ op: 'unwrap', wrapped: new Uint8Array(wrapped), keyVersion, aad: new Uint8Array(contextBytes(context)) }, signal);
    return reply.dataKey!;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.thread.release(this.backendId);
  }

  private async call(request: Request, signal: AbortSignal): Promise<Extract<WorkerReply, { ok: true }>> {
    const what = `pkcs11 backend ${this.name}`;
    if (this.closed) throw new TrousseauError('BACKEND_UNAVAILABLE', `${what} is closed`);
    try {
      const reply = await this.thread.call(this.backendId, request, this.timeoutMs, signal, what);
      if (reply.logins > this.logins && this.logins > 0) this.logger?.info({ logins: reply.logins }, 'logged in to the token again');
      this.logins = reply.logins;
      return reply;
    } catch (error) {
      // Messages from the thread name the call, never the backend: say which one it was.
      if (error instanceof TrousseauError && !error.message.startsWith(what)) throw new TrousseauError(error.code, `${what}: ${error.message}`);
      throw error;
    }
  }
}

type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;
