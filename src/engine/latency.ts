/**
 * Recent latencies of one backend, kept in a fixed ring so memory never grows
 * (opossum's rolling percentiles keep every sample: we turn those off). Percentiles
 * are recomputed lazily, at most once per `RECOMPUTE_EVERY` new samples, because the
 * hedging decision reads p95 on every Decrypt.
 */
const CAPACITY = 256;
const RECOMPUTE_EVERY = 16;

export class LatencyWindow {
  private readonly samples = new Float64Array(CAPACITY);
  private count = 0;
  private next = 0;
  private sorted: Float64Array | undefined;
  private sinceSort = 0;

  record(milliseconds: number): void {
    this.samples[this.next] = milliseconds;
    this.next = (this.next + 1) % CAPACITY;
    this.count = Math.min(this.count + 1, CAPACITY);
    if (++this.sinceSort >= RECOMPUTE_EVERY || this.count < RECOMPUTE_EVERY) this.sorted = undefined;
  }

  get size(): number {
    return this.count;
  }

  /** The p-th percentile (0..100) in milliseconds, or undefined before any sample. */
  percentile(p: number): number | undefined {
    if (this.count === 0) return undefined;
    if (!this.sorted) {
      this.sorted = this.samples.slice(0, this.count).sort();
      this.sinceSort = 0;
    }
    // The sorted copy may be up to RECOMPUTE_EVERY samples stale, hence shorter than
    // `count`: index into it by its own length, or p95 reads past its end (NaN delays).
    const n = this.sorted.length;
    const index = Math.min(n - 1, Math.max(0, Math.ceil((p / 100) * n) - 1));
    return this.sorted[index];
  }
}

/**
 * Whether a backend has stopped answering: a call to it has been waiting for a while
 * and nothing it was asked since has been answered. A frozen server (a stopped
 * process, a black-holed link) keeps its connections open and answers nothing, so
 * every call waits for its timeout, and the breaker hears of it only a timeout later
 * (and, after thousands of successes in its window, not even then); LatencyWindow
 * cannot tell either, as it only hears of calls that finished. A backend that
 * answers slowly but steadily is not stalled. It stays stalled, once calls to it have
 * timed out or been abandoned, until it answers something again (a Decrypt that had
 * no other copy, a wrap, a health probe).
 *
 * GuardedBackend feeds it with every call that reaches the backend; the Decrypt
 * path reads it (wrap-engine.ts): a stalled backend's copy is tried after the
 * others, and hedging a call stuck on it is a failover, outside the hedge budget.
 */
export class StallWatch {
  /** performance.now() when the first call since the last answer started; undefined while none is waiting. */
  private silentSince: number | undefined;
  private lastAnswerAt = -Infinity;

  /** A call goes to the backend. */
  started(): void {
    this.silentSince ??= performance.now();
  }

  /** The backend answered a call: a result, or its own error (not a timeout, not an abort of ours). */
  answered(): void {
    this.lastAnswerAt = performance.now();
    this.silentSince = undefined;
  }

  /** A call has waited at least `ms`, and nothing was answered in the last `ms`. */
  stalled(ms: number, now = performance.now()): boolean {
    return this.silentSince !== undefined && now - this.silentSince >= ms && now - this.lastAnswerAt >= ms;
  }
}
