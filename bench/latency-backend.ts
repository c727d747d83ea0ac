/**
 * A KeyBackend wrapper that injects latency in front of a real backend (a local key
 * file, so envelopes are real), for the scenario benchmarks: a fixed delay with
 * jitter, a heavy tail (a share of calls that take much longer), or a blackhole
 * (the call never answers; only its AbortSignal ends it, like a server behind a
 * dropped route). It counts calls per operation and the peak number in flight.
 */
import { TrousseauError } from '../src/errors.ts';
import type { KeyBackend, WrapContext, WrappedKey } from '../src/backends/backend.ts';

export interface LatencyProfile {
  /** Delay of every call, in milliseconds. */
  ms: number;
  /** Uniform extra delay in [0, jitterMs). */
  jitterMs?: number;
  /** Share (0..1) of calls that take tailMs instead. */
  tailProbability?: number;
  tailMs?: number;
  /** Never answer: hang until aborted. */
  blackhole?: boolean;
}

export interface LatencyStats {
  calls: { wrap: number; unwrap: number; key_version: number };
  inFlight: number;
  peakInFlight: number;
  aborted: number;
}

export class LatencyBackend implements KeyBackend {
  readonly name: string;
  readonly kind: string;
  private readonly inner: KeyBackend;
  profile: LatencyProfile;
  stats: LatencyStats = LatencyBackend.emptyStats();

  constructor(inner: KeyBackend, profile: LatencyProfile = { ms: 0 }) {
    this.inner = inner;
    this.name = inner.name;
    this.kind = inner.kind;
    this.profile = profile;
  }

  static emptyStats(): LatencyStats {
    return { calls: { wrap: 0, unwrap: 0, key_version: 0 }, inFlight: 0, peakInFlight: 0, aborted: 0 };
  }

  resetStats(): void {
    this.stats = { ...LatencyBackend.emptyStats(), inFlight: this.stats.inFlight };
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

  private async run<T>(operation: keyof LatencyStats['calls'], signal: AbortSignal, forward: () => Promise<T>): Promise<T> {
    const stats = this.stats;
    stats.calls[operation]++;
    stats.inFlight++;
    stats.peakInFlight = Math.max(stats.peakInFlight, stats.inFlight);
    try {
      const { ms, jitterMs = 0, tailProbability = 0, tailMs = ms, blackhole = false } = this.profile;
      const delay = blackhole ? Infinity : Math.random() < tailProbability ? tailMs : ms + Math.random() * jitterMs;
      if (delay > 0) await wait(delay, signal);
      return await forward();
    } catch (error) {
      if (signal.aborted) stats.aborted++;
      throw error;
    } finally {
      stats.inFlight--;
      // A reset during the call started a new stats object; keep its in-flight count right too.
      if (this.stats !== stats) this.stats.inFlight = Math.max(0, this.stats.inFlight - 1);
    }
  }
}

/** A delay that rejects at once when `signal` aborts (what a well-behaved SDK does); Infinity waits for the abort. */
function wait(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const fail = () => reject(new TrousseauError('BACKEND_UNAVAILABLE', 'aborted', { cause: signal.reason }));
    if (signal.aborted) {
      fail();
      return;
    }
    const timer = Number.isFinite(ms)
      ? setTimeout(() => {
          signal.removeEventListener('abort', onAbort);
          resolve();
        }, ms)
      : undefined;
    const onAbort = () => {
      clearTimeout(timer);
      fail();
    };
    signal.addEventListener('abort', onAbort, { once: true });
  });
}
