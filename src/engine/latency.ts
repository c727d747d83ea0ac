/**
 * Recent latencies of one backend (or of an admission queue's slot holds), kept in a
 * fixed ring so memory never grows (opossum's rolling percentiles keep every sample:
 * we turn those off).
 *
 * The same samples are also kept in ascending order, updated on every record (one
 * binary search and one move of at most CAPACITY numbers each way), so a percentile
 * is an index, always current. Why not sort a copy when asked: percentiles are read on
 * every call (admission's expected hold, the hedge delay, the straggler grace), and a
 * sorted copy of a Float64Array allocates a new ArrayBuffer each time; with three
 * backends, that and the key_id's digest were a fifth of the engine's instructions per
 * Encrypt (docs/performance.md, "The engine's cost per backend").
 */
const CAPACITY = 256;

export class LatencyWindow {
  /** Samples in arrival order; `next` is where the next one goes (the oldest, once full). */
  private readonly ring = new Float64Array(CAPACITY);
  /** The same samples, ascending; its first `count` entries are in use. */
  private readonly ascending = new Float64Array(CAPACITY);
  private count = 0;
  private next = 0;

  /** Record one latency in milliseconds; a value that is not a number is ignored. */
  record(milliseconds: number): void {
    if (Number.isNaN(milliseconds)) return;
    if (this.count === CAPACITY) {
      // The oldest sample leaves: it is in `ascending` (same value), remove one copy.
      const at = this.firstAtLeast(this.ring[this.next]!);
      this.ascending.copyWithin(at, at + 1, this.count);
      this.count--;
    }
    const at = this.firstAbove(milliseconds);
    this.ascending.copyWithin(at + 1, at, this.count);
    this.ascending[at] = milliseconds;
    this.count++;
    this.ring[this.next] = milliseconds;
    this.next = (this.next + 1) % CAPACITY;
  }

  get size(): number {
    return this.count;
  }

  /** The p-th percentile (0..100) of the recent samples in milliseconds (nearest rank), or undefined before any sample. */
  percentile(p: number): number | undefined {
    if (this.count === 0) return undefined;
    const index = Math.min(this.count - 1, Math.max(0, Math.ceil((p / 100) * this.count) - 1));
    return this.ascending[index];
  }

  /** Index of the first sample in `ascending` that is >= value. */
  private firstAtLeast(value: number): number {
    let low = 0;
    let high = this.count;
    while (low < high) {
      const mid = (low + high) >>> 1;
      if (this.ascending[mid]! < value) low = mid + 1;
      else high = mid;
    }
    return low;
  }

  /** Index of the first sample in `ascending` that is > value (a new sample goes after its equals). */
  private firstAbove(value: number): number {
    let low = 0;
    let high = this.count;
    while (low < high) {
      const mid = (low + high) >>> 1;
      if (this.ascending[mid]! <= value) low = mid + 1;
      else high = mid;
    }
    return low;
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
