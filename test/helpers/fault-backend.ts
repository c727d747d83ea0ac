/**
 * A fault-injecting KeyBackend for engine and server tests: it forwards to a real
 * LocalKeyBackend (so envelopes are real) and can, per operation, fail, hang until
 * aborted, or add latency. It counts every call and every abort it observed, so a
 * test can prove that a breaker refused without calling, that malformed input cost
 * no backend call, or that an abandoned call was really aborted.
 */
import { TrousseauError } from '../../src/errors.ts';
import type { KeyBackend, WrapContext, WrappedKey } from '../../src/backends/backend.ts';

export type FaultMode =
  | { kind: 'ok' }
  | { kind: 'error'; code: 'unavailable' | 'rejected' }
  | { kind: 'hang' }
  | { kind: 'latency'; ms: number; jitterMs?: number };

export type FaultOperation = 'wrap' | 'unwrap' | 'key_version';

const OPERATIONS: readonly FaultOperation[] = ['wrap', 'unwrap', 'key_version'];

export const ok: FaultMode = { kind: 'ok' };
export const unavailable: FaultMode = { kind: 'error', code: 'unavailable' };
export const rejected: FaultMode = { kind: 'error', code: 'rejected' };
export const hang: FaultMode = { kind: 'hang' };
export const latency = (ms: number, jitterMs = 0): FaultMode => ({ kind: 'latency', ms, jitterMs });

export class FaultBackend implements KeyBackend {
  readonly name: string;
  readonly kind: string;
  readonly inner: KeyBackend;
  /** Calls that reached this backend, per operation. */
  readonly calls: Record<FaultOperation, number> = { wrap: 0, unwrap: 0, key_version: 0 };
  /** Calls whose AbortSignal fired while they were still pending here. */
  aborts = 0;
  /** Calls pending right now. */
  pending = 0;
  private readonly modes = new Map<FaultOperation, FaultMode>();
  private readonly abortListeners: (() => void)[] = [];

  constructor(inner: KeyBackend, mode: FaultMode = ok) {
    this.inner = inner;
    this.name = inner.name;
    this.kind = inner.kind;
    this.setMode(mode);
  }

  /** Change the behaviour of the given operations (all by default), effective for the next call. */
  setMode(mode: FaultMode, operations: readonly FaultOperation[] = OPERATIONS): void {
    for (const op of operations) this.modes.set(op, mode);
  }

  /** Forget the calls so far (the start-up probe, a setup Encrypt). */
  resetCounts(): void {
    this.calls.wrap = this.calls.unwrap = this.calls.key_version = 0;
    this.aborts = 0;
  }

  get totalCalls(): number {
    return this.calls.wrap + this.calls.unwrap + this.calls.key_version;
  }

  /** Resolves at the next abort this backend observes. */
  nextAbort(): Promise<void> {
    return new Promise((resolve) => this.abortListeners.push(resolve));
  }

  currentKeyVersion(signal: AbortSignal): Promise<string> {
    return this.run('key_version', signal, () => this.inner.currentKeyVersion(signal));
  }

  wrap(dataKey: Uint8Array, context: WrapContext, signal: AbortSignal): Promise<WrappedKey> {
    return this.run('wrap', signal, () => this.inner.wrap(dataKey, context, signal));
  }

  unwrap(wrapped: Uint8Array, keyVersion: string, context: WrapContext, signal: AbortSignal): Promise<Uint8Array> {
    return this.run('unwrap', signal, () => this.inner.unwrap(wrapped, keyVersion, context, signal));
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  private async run<T>(operation: FaultOperation, signal: AbortSignal, forward: () => Promise<T>): Promise<T> {
    this.calls[operation]++;
    const mode = this.modes.get(operation) ?? ok;
    this.pending++;
    const onAbort = () => {
      this.aborts++;
      for (const listener of this.abortListeners.splice(0)) listener();
    };
    signal.addEventListener('abort', onAbort, { once: true });
    try {
      switch (mode.kind) {
        case 'ok':
          return await forward();
        case 'error':
          throw mode.code === 'rejected'
            ? new TrousseauError('BACKEND_REJECTED', `injected rejection from ${this.name}`)
            : new TrousseauError('BACKEND_UNAVAILABLE', `injected outage of ${this.name}`);
        case 'hang':
          // Like a server that accepted the connection and never answers: only the abort ends it.
          await new Promise<never>((_, reject) => {
            if (signal.aborted) reject(new TrousseauError('BACKEND_UNAVAILABLE', 'aborted', { cause: signal.reason }));
            signal.addEventListener('abort', () => reject(new TrousseauError('BACKEND_UNAVAILABLE', 'aborted', { cause: signal.reason })), {
              once: true,
            });
          });
          throw new Error('unreachable');
        case 'latency': {
          const ms = mode.ms + Math.random() * (mode.jitterMs ?? 0);
          await sleep(ms, signal);
          return await forward();
        }
      }
    } finally {
      this.pending--;
      signal.removeEventListener('abort', onAbort);
    }
  }
}

/** setTimeout as a promise that rejects when `signal` aborts (what a well-behaved SDK does). */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) {
      reject(new TrousseauError('BACKEND_UNAVAILABLE', 'aborted', { cause: signal.reason }));
      return;
    }
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(new TrousseauError('BACKEND_UNAVAILABLE', 'aborted', { cause: signal.reason }));
    };
    signal.addEventListener('abort', onAbort, { once: true });
  });
}
