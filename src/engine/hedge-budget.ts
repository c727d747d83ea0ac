/**
 * Token bucket that limits speculative (hedged) backend calls to a share of
 * Decrypts. KMS calls are billed and rate-limited, so "The Tail at Scale" hedging
 * needs a cap: each Decrypt earns `ratio` of a token, each hedge spends one. The
 * burst allowance lets a short latency spike be hedged in full. Failover after an
 * error is never budgeted: it is not speculative.
 */
export class HedgeBudget {
  private tokens: number;
  /** Hedges allowed per Decrypt in steady state, e.g. 0.1 for 10 %. */
  private readonly ratio: number;
  /** Largest number of hedges that may be spent at once after a quiet period. */
  private readonly burst: number;

  constructor(ratio: number, burst: number) {
    this.ratio = ratio;
    this.burst = burst;
    this.tokens = burst;
  }

  /** Called once per Decrypt. */
  earn(): void {
    this.tokens = Math.min(this.burst, this.tokens + this.ratio);
  }

  /** Takes a token if one is available. */
  trySpend(): boolean {
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }
}
