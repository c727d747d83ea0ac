/**
 * Coalesces concurrent calls into batch requests, for backends whose server takes many
 * data keys in one request (Vault transit's `batch_input`).
 *
 * "Natural" batching: a call is sent in the same turn of the event loop in which it
 * arrived, together with every call that arrived in that turn, as long as fewer than
 * `maxRequests` batch requests are in flight. While that many are, new calls wait, and
 * go together in the next request as soon as one returns. So a lightly loaded plugin
 * sends one request per call, as it would without this class, and adds no delay; a
 * loaded one pays the per-request cost (HTTP, JSON, the server's token check and audit
 * entry) once per batch instead of once per data key. Measured against OpenBao with 16
 * calls in flight: one request per key cost the plugin 109-118 µs and the server 203-208
 * µs of CPU per key; batched, 19 and 35-38 µs (docs/performance.md).
 *
 * Each call keeps its own AbortSignal: a call aborted while it waits is never sent; one
 * aborted while its batch is in flight is answered at once, and the batch request itself
 * is aborted only when every call in it has been. The number of waiting calls is not
 * bounded here: the engine's per-backend admission control (engine/admission.ts) bounds
 * the calls in flight to a backend, and so the calls that can wait here.
 */

export interface CoalescerLimits {
  /** Calls in one batch request at most. */
  maxItems: number;
  /** Batch requests in flight at once; further calls wait for one to return. */
  maxRequests: number;
}

/**
 * Sends one batch. Resolves with one entry per item, in the items' order: a result, or
 * the Error for that item alone (the server refused that item). Rejects when the request
 * as a whole failed; every call in it then gets that error.
 */
export type SendBatch<Item, Result> = (items: readonly Item[], signal: AbortSignal) => Promise<ReadonlyArray<Result | Error>>;

interface Pending<Item, Result> {
  readonly item: Item;
  readonly signal: AbortSignal;
  readonly resolve: (result: Result) => void;
  readonly reject: (error: unknown) => void;
  settled: boolean;
  /** The batch this call was sent in, once it was. */
  batch: Batch | undefined;
  onAbort: (() => void) | undefined;
}

interface Batch {
  readonly controller: AbortController;
  /** Calls in the batch that still wait for its answer. */
  waiting: number;
}

export class Coalescer<Item, Result> {
  private readonly send: SendBatch<Item, Result>;
  private readonly limits: CoalescerLimits;
  /** Called with a result that arrived for a call that no longer waits (to wipe a data key). */
  private readonly discard: ((result: Result) => void) | undefined;
  private queue: Array<Pending<Item, Result>> = [];
  private inFlight = 0;
  private scheduled = false;

  constructor(send: SendBatch<Item, Result>, limits: CoalescerLimits, discard?: (result: Result) => void) {
    if (!Number.isInteger(limits.maxItems) || limits.maxItems < 1) throw new RangeError('maxItems must be a positive integer');
    if (!(limits.maxRequests >= 1)) throw new RangeError('maxRequests must be at least 1');
    this.send = send;
    this.limits = limits;
    this.discard = discard;
  }

  /** Calls waiting to be sent (for tests and status). */
  get waiting(): number {
    return this.queue.length;
  }

  /** Batch requests in flight now. */
  get requestsInFlight(): number {
    return this.inFlight;
  }

  submit(item: Item, signal: AbortSignal): Promise<Result> {
    if (signal.aborted) return Promise.reject(signal.reason as Error);
    return new Promise<Result>((resolve, reject) => {
      const pending: Pending<Item, Result> = { item, signal, resolve, reject, settled: false, batch: undefined, onAbort: undefined };
      pending.onAbort = () => this.abandon(pending);
      signal.addEventListener('abort', pending.onAbort, { once: true });
      this.queue.push(pending);
      if (!this.scheduled) {
        this.scheduled = true;
        // setImmediate, not a microtask: every request that arrived in this turn's I/O
        // callbacks reaches submit() before the check phase runs.
        setImmediate(() => {
          this.scheduled = false;
          this.pump();
        });
      }
    });
  }

  /** Reject every call that has not been answered (the backend is closing). */
  failAll(error: Error): void {
    const queued = this.queue;
    this.queue = [];
    for (const pending of queued) this.settle(pending, () => pending.reject(error));
  }

  private abandon(pending: Pending<Item, Result>): void {
    if (pending.settled) return;
    this.settle(pending, () => pending.reject(pending.signal.reason as Error));
    const batch = pending.batch;
    if (!batch) {
      // Out of the queue at once: a server that holds every request for long must not
      // let the calls that timed out meanwhile pile up here.
      const index = this.queue.indexOf(pending);
      if (index >= 0) this.queue.splice(index, 1);
      return;
    }
    // The request goes on for the others in it; it is aborted once nobody waits for it.
    if (--batch.waiting === 0) batch.controller.abort(pending.signal.reason);
  }

  private settle(pending: Pending<Item, Result>, answer: () => void): void {
    if (pending.settled) return;
    pending.settled = true;
    if (pending.onAbort) pending.signal.removeEventListener('abort', pending.onAbort);
    answer();
  }

  private pump(): void {
    while (this.inFlight < this.limits.maxRequests) {
      const items = this.queue.splice(0, this.limits.maxItems);
      if (items.length === 0) return;
      void this.dispatch(items);
    }
  }

  private async dispatch(calls: Array<Pending<Item, Result>>): Promise<void> {
    const batch: Batch = { controller: new AbortController(), waiting: calls.length };
    for (const call of calls) call.batch = batch;
    this.inFlight++;
    try {
      const results = await this.send(
        calls.map((c) => c.item),
        batch.controller.signal,
      );
      if (results.length !== calls.length) throw new Error(`batch answer has ${results.length} results for ${calls.length} items`);
      calls.forEach((call, index) => {
        const result = results[index]!;
        if (result instanceof Error) this.settle(call, () => call.reject(result));
        else if (call.settled) this.discard?.(result);
        else this.settle(call, () => call.resolve(result));
      });
    } catch (error) {
      for (const call of calls) this.settle(call, () => call.reject(error));
    } finally {
      this.inFlight--;
      // Calls that waited for this slot go now, without another turn of the loop.
      this.pump();
    }
  }
}
