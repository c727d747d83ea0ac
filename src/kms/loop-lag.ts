/**
 * How late the event loop has recently been: an estimate of how long a call's headers
 * may have waited in the socket before the plugin read them.
 *
 * grpc-js turns a call's `grpc-timeout` into a deadline when it parses the headers. The
 * client started that clock when it sent them; while the loop is busy with a burst (or
 * the CPU is shared with the apiserver and etcd), the headers sit unread for up to a
 * loop turn, and the plugin's idea of the deadline is that much later than the
 * client's. Admission control subtracts this estimate, so that a call it admits can
 * still be answered before the client gives up on it (docs/design/overload.md).
 *
 * The estimate is the longest loop delay of the last one to two windows, from Node's
 * own `monitorEventLoopDelay` (a native timer every 10 ms, nothing run in JavaScript).
 * Two histograms take turns being cleared: a histogram drops the first sample after it
 * is cleared, so with one alone a long stall that ended just as it was cleared would
 * be missed; the other one still has it.
 */
import { monitorEventLoopDelay } from 'node:perf_hooks';

const RESOLUTION_MS = 10;
const WINDOW_MS = 1000;

type Histogram = ReturnType<typeof monitorEventLoopDelay>;

export class LoopLag {
  private readonly histograms: [Histogram, Histogram];
  private readonly timer: NodeJS.Timeout;
  private next = 0;

  constructor(windowMs = WINDOW_MS) {
    this.histograms = [monitorEventLoopDelay({ resolution: RESOLUTION_MS }), monitorEventLoopDelay({ resolution: RESOLUTION_MS })];
    for (const histogram of this.histograms) histogram.enable();
    this.timer = setInterval(() => {
      this.histograms[this.next]!.reset();
      this.next = 1 - this.next;
    }, windowMs);
    this.timer.unref();
  }

  /**
   * Recent worst loop delay, ms: 0 on an idle loop. A histogram records the time
   * between its samples, 10 ms when the loop is idle, so that period is taken off.
   */
  recentMs(): number {
    let worst = 0;
    for (const histogram of this.histograms) if (histogram.count > 0) worst = Math.max(worst, histogram.max / 1e6);
    return Math.max(0, worst - RESOLUTION_MS);
  }

  close(): void {
    clearInterval(this.timer);
    for (const histogram of this.histograms) histogram.disable();
  }
}
