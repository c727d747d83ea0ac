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
