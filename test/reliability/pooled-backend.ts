/**
 * A KeyBackend with the one property of a real KMS client that overload tests need:
 * it serves at most `connections` calls at once and queues the rest inside itself,
 * as an SDK's HTTP connection pool does (the AWS SDK's default is 50 sockets). Each
 * call holds a connection for `serviceMs`, then the real LocalKeyBackend answers, so
 * envelopes are real. `gate()` holds every call until `open()`, to freeze a burst
 * mid-flight. A call aborted while queued leaves the queue (as a queued HTTP request
 * does); counters say how many calls arrived and how many were served.
 */
import { TrousseauError } from '../../src/errors.ts';
import type { KeyBackend, WrapContext, WrappedKey } from '../../src/backends/backend.ts';

export class PooledBackend implements KeyBackend {
  readonly name: string;
  readonly kind: string;
  private readonly inner: KeyBackend;
  private readonly connections: number;
  /** Time each call holds its connection; may be changed between calls. */
  serviceMs: number;
  private busy = 0;
  private readonly queue: (() => void)[] = [];
  private gateOpen = true;
  private readonly gateWaiters: (() => void)[] = [];
  /** Calls that reached this backend (queued or served), per operation. */
  readonly arrived = { wrap: 0, unwrap: 0, key_version: 0 };
  /** Largest number of calls waiting inside the backend for a connection. */
  peakQueued = 0;
  /** Calls inside the backend right now (queued or served), and the most at once. */
  inside = 0;
  peakInside = 0;

  constructor(inner: KeyBackend, options: { connections: number; serviceMs: number }) {
    this.inner = inner;
    this.name = inner.name;
    this.kind = inner.kind;
    this.connections = options.connections;
    this.serviceMs = options.serviceMs;
  }

  /** Hold every call (after it took a connection) until open(). */
  gate(): void {
    this.gateOpen = false;
  }

  open(): void {
    this.gateOpen = true;
    for (const waiter of this.gateWaiters.splice(0)) waiter();
  }

  resetCounts(): void {
    this.arrived.wrap = this.arrived.unwrap = this.arrived.key_version = 0;
    this.peakQueued = 0;
    this.peakInside = 0;
  }

  currentKeyVersion(signal: AbortSignal): Promise<string> {
    this.arrived.key_version++;
    return this.serve(signal, () => this.inner.currentKeyVersion(signal));
  }

  wrap(dataKey: Uint8Array, context: WrapContext, signal: AbortSignal): Promise<WrappedKey> {
    this.arrived.wrap++;
    return this.serve(signal, () => this.inner.wrap(dataKey, context, signal));
  }

  unwrap(wrapped: Uint8Array, keyVersion: string, context: WrapContext, signal: AbortSignal): Promise<Uint8Array> {
    this.arrived.unwrap++;
    return this.serve(signal, () => this.inner.unwrap(wrapped, keyVersion, context, signal));
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  private async serve<T>(signal: AbortSignal, forward: () => Promise<T>): Promise<T> {
    this.peakInside = Math.max(this.peakInside, ++this.inside);
    try {
      return await this.served(signal, forward);
    } finally {
      this.inside--;
    }
  }

  private async served<T>(signal: AbortSignal, forward: () => Promise<T>): Promise<T> {
    await this.connection(signal);
    try {
      await this.wait(signal, (resolve) => {
        const timer = setTimeout(resolve, this.serviceMs);
        return () => clearTimeout(timer);
      });
      if (!this.gateOpen) await this.wait(signal, (resolve) => this.removable(this.gateWaiters, resolve));
      return await forward();
    } finally {
      this.busy--;
      this.queue.shift()?.();
    }
  }

  /** Take a connection, waiting in FIFO order. */
  private async connection(signal: AbortSignal): Promise<void> {
    if (this.busy < this.connections && this.queue.length === 0) {
      this.busy++;
      return;
    }
    await this.wait(signal, (resolve) => {
      const leave = this.removable(this.queue, () => {
        this.busy++;
        resolve();
      });
      this.peakQueued = Math.max(this.peakQueued, this.queue.length);
      return leave;
    });
  }

  private removable(list: (() => void)[], entry: () => void): () => void {
    list.push(entry);
    return () => {
      const index = list.indexOf(entry);
      if (index >= 0) list.splice(index, 1);
    };
  }

  /** Wait for `start`'s resolve, or reject when `signal` aborts (running `start`'s undo). */
  private wait(signal: AbortSignal, start: (resolve: () => void) => () => void): Promise<void> {
    return new Promise((resolve, reject) => {
      if (signal.aborted) {
        reject(new TrousseauError('BACKEND_UNAVAILABLE', 'aborted', { cause: signal.reason }));
        return;
      }
      const onAbort = () => {
        undo();
        reject(new TrousseauError('BACKEND_UNAVAILABLE', 'aborted', { cause: signal.reason }));
      };
      const undo = start(() => {
        signal.removeEventListener('abort', onAbort);
        resolve();
      });
      signal.addEventListener('abort', onAbort, { once: true });
    });
  }
}
