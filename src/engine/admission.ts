/**
 * Admission control: a bounded semaphore with a bounded FIFO wait queue that refuses
 * early and explicitly instead of letting work pile up.
 *
 * One instance guards all KMS calls (kms/services.ts) and one guards each backend
 * (GuardedBackend), so in-flight work is bounded in total and per backend. A call
 * either gets a slot at once, waits its turn in FIFO order, or is refused with an
 * OVERLOADED error (gRPC UNAVAILABLE, "overloaded: ...") when:
 *
 * - the queue is full (`queue_full`), at once;
 * - it could not start in time to finish before its deadline (`deadline`): at once
 *   when the wait the queue ahead of it implies already passes that point, or when
 *   that point passes while it waits;
 * - it waited `maxWaitMs` (`wait_timeout`).
 *
 * "In time" uses what the guarded work has recently taken (p90 of the slot hold
 * times), so a call is never started that the caller will have given up on before
 * it can finish. Refused calls cost a few comparisons: no backend call, no crypto.
 * The time a call spends waiting here is not part of any backend's timeout, breaker
 * or latency: those clocks start once the slot is granted.
 */
import { TrousseauError } from '../errors.ts';
import { LatencyWindow } from './latency.ts';

export interface AdmissionLimits {
  /** Calls running at once. */
  maxInFlight: number;
  /** Calls waiting for a slot; one more is refused at once. */
  maxQueued: number;
  /** Longest a call waits for a slot, in milliseconds. */
  maxWaitMs: number;
}

/** How one Admission decides beyond its limits. */
export interface AdmissionPolicy {
  /**
   * At a free slot, refuse a call that recent hold times say cannot finish before its
   * deadline, while other calls run (see `admit`). For the KMS gate, where such a call
   * is a whole Encrypt or Decrypt answered after the client gave up. Not for a backend:
   * there the caller is the engine, and a failover tried with less time left than the
   * backend's p90 may still save a Decrypt.
   */
  refuseLateAtFreeSlot?: boolean;
}

export type ShedReason = 'queue_full' | 'deadline' | 'wait_timeout';

export interface AdmissionObserver {
  /** A call was refused (depths are read from `inFlight` / `queued` when needed). */
  shed(reason: ShedReason): void;
}

/** A granted slot; `release()` once the work is over (idempotent). */
export interface Slot {
  release(): void;
}

/** Time left for answering the refusal itself once a call is known not to make it. */
const ANSWER_RESERVE_MS = 50;
/** Hold times needed before the p90 is trusted for the deadline check. */
const MIN_SAMPLES = 16;

/** What `admit` decided: a slot now, a place in the queue, or a refusal. */
export type Admitted = { kind: 'granted'; slot: Slot } | { kind: 'waiting'; slot: Promise<Slot>; leave: (reason?: unknown) => void } | Refused;

export interface Refused {
  kind: 'refused';
  reason: ShedReason;
  /** `overloaded (<name>): N calls in flight, M waiting; <why>, retry later`. */
  message: string;
}

interface Waiter {
  grant: (slot: Slot) => void;
  refuse: (reason: ShedReason) => void;
  /** performance.now() after which the call cannot finish in time. */
  latestStart: number;
}

export class Admission {
  /** What the refusals name: "kms" or the backend's name. */
  readonly name: string;
  private readonly limits: AdmissionLimits;
  private readonly observer: AdmissionObserver | undefined;
  private readonly refuseLateAtFreeSlot: boolean;
  private readonly holdTimes = new LatencyWindow();
  private running = 0;
  private readonly queue: Waiter[] = [];

  constructor(name: string, limits: AdmissionLimits, observer?: AdmissionObserver, policy: AdmissionPolicy = {}) {
    this.name = name;
    this.limits = limits;
    this.observer = observer;
    this.refuseLateAtFreeSlot = policy.refuseLateAtFreeSlot ?? false;
  }

  get inFlight(): number {
    return this.running;
  }

  get queued(): number {
    return this.queue.length;
  }

  /** Recent time a slot is held (p90, ms); 0 until enough calls finished. */
  get expectedHoldMs(): number {
    return this.holdTimes.size >= MIN_SAMPLES ? this.holdTimes.percentile(90)! : 0;
  }

  /**
   * A slot, or an OVERLOADED refusal. `deadlineAt` (Date.now() time, optional) is when
   * the caller stops waiting for the whole call; `signal` ends the wait early (the
   * caller left), which also rejects with OVERLOADED: the work never started.
   */
  acquire(signal?: AbortSignal, deadlineAt?: number): Promise<Slot> {
    if (signal?.aborted) return Promise.reject(this.abandoned(signal.reason));
    const decision = this.admit(deadlineAt);
    if (decision.kind === 'granted') return Promise.resolve(decision.slot);
    if (decision.kind === 'refused') return Promise.reject(new TrousseauError('OVERLOADED', decision.message));
    if (signal) {
      const onAbort = () => decision.leave(signal.reason);
      signal.addEventListener('abort', onAbort, { once: true });
      void decision.slot.then(
        () => signal.removeEventListener('abort', onAbort),
        () => signal.removeEventListener('abort', onAbort),
      );
    }
    return decision.slot;
  }

  /**
   * The same decision as `acquire`, answered synchronously and without building an
   * Error when the call is refused at once: the gRPC layer asks this for every
   * Encrypt and Decrypt as soon as its headers arrive (kms/admission-gate.ts), and
   * under a burst most of them are refused, so a refusal must cost next to nothing.
   * A waiting call's `slot` settles later; `leave()` takes it out of the queue (its
   * promise then rejects with OVERLOADED).
   */
  admit(deadlineAt?: number): Admitted {
    const now = performance.now();
    const answerBy = deadlineAt === undefined ? Infinity : now + (deadlineAt - Date.now()) - ANSWER_RESERVE_MS;
    const latestStart = answerBy - this.expectedHoldMs;
    if (answerBy <= now) return this.refusal('deadline');
    if (this.running < this.limits.maxInFlight && this.queue.length === 0) {
      // A free slot is taken, unless (refuseLateAtFreeSlot) calls are running and the
      // estimate they keep fresh says this one cannot finish in time: at the end of a
      // burst the queue has been refused and slots free up while the client still sends
      // calls with a few milliseconds left, and a whole round of them was started only
      // to be answered after the client's deadline. With nothing running, the slot is
      // always taken (unless the caller is as good as gone): were calls refused on the
      // estimate alone then, no call would ever finish to bring a stale estimate down.
      if (this.refuseLateAtFreeSlot && this.running > 0 && latestStart <= now) return this.refusal('deadline');
      return { kind: 'granted', slot: this.grant() };
    }
    if (latestStart <= now) return this.refusal('deadline');
    if (this.queue.length >= this.limits.maxQueued) return this.refusal('queue_full');
    // The wait the calls ahead imply: each round of maxInFlight calls holds its slots about expectedHoldMs.
    const expectedWait = Math.ceil((this.queue.length + 1) / this.limits.maxInFlight) * this.expectedHoldMs;
    if (now + expectedWait > latestStart) return this.refusal('deadline');
    return this.enqueue(now, latestStart);
  }

  private enqueue(now: number, latestStart: number): Admitted {
    let leave: (reason?: unknown) => void = () => undefined;
    const slot = new Promise<Slot>((resolve, reject) => {
      const giveUpAt = Math.min(latestStart, now + this.limits.maxWaitMs);
      const out = () => {
        clearTimeout(timer);
        const index = this.queue.indexOf(waiter);
        if (index >= 0) this.queue.splice(index, 1);
      };
      const waiter: Waiter = {
        latestStart,
        grant: (granted) => {
          out();
          resolve(granted);
        },
        refuse: (reason) => {
          out();
          reject(new TrousseauError('OVERLOADED', this.refusal(reason).message));
        },
      };
      const timer = setTimeout(() => waiter.refuse(giveUpAt === latestStart ? 'deadline' : 'wait_timeout'), giveUpAt - now);
      leave = (reason) => {
        if (this.queue.indexOf(waiter) < 0) return;
        out();
        reject(this.abandoned(reason));
      };
      this.queue.push(waiter);
    });
    return { kind: 'waiting', slot, leave };
  }

  private grant(): Slot {
    this.running++;
    const granted = performance.now();
    let released = false;
    return {
      release: () => {
        if (released) return;
        released = true;
        this.running--;
        this.holdTimes.record(performance.now() - granted);
        this.next();
      },
    };
  }

  /** Hand freed slots to the oldest waiters that can still finish in time. */
  private next(): void {
    while (this.running < this.limits.maxInFlight && this.queue.length > 0) {
      const waiter = this.queue[0]!;
      if (performance.now() > waiter.latestStart) waiter.refuse('deadline');
      else waiter.grant(this.grant());
    }
  }

  /** A refusal, counted, with the message the caller gets; no Error is built here. */
  private refusal(reason: ShedReason): Refused {
    this.observer?.shed(reason);
    const load = `${this.running} calls in flight, ${this.queue.length} waiting`;
    const why =
      reason === 'queue_full'
        ? 'the wait queue is full'
        : reason === 'deadline'
          ? 'the call could not finish before its deadline'
          : `no slot within ${this.limits.maxWaitMs} ms`;
    return { kind: 'refused', reason, message: `overloaded (${this.name}): ${load}; ${why}, retry later` };
  }

  private abandoned(reason: unknown): TrousseauError {
    return new TrousseauError('OVERLOADED', `call left the ${this.name} wait queue before it started`, { cause: reason });
  }
}
