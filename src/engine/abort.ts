import { TrousseauError } from '../errors.ts';

/**
 * Timeouts that hold only the work's own time against it, not the event loop's lag.
 *
 * libuv runs due timers before it reads sockets. When the loop was busy past a
 * timeout (a burst of thousands of gRPC streams, a long GC, a starved CPU), the timer
 * fires first, and an answer that has been waiting in the socket all along would be
 * counted as a backend timeout: a breaker failure, a failed health probe, a missed
 * wrap and a moved key_id, for time the plugin spent, not the backend (issue 10,
 * item 6). So when a PatientTimer fires:
 *
 * 1. it waits for the end of this loop turn (setImmediate runs after the poll phase),
 *    so whatever already arrived is read and settles the work first;
 * 2. if it fired late (by at least LAG_TOLERANCE_MS), it extends once by that
 *    lateness, capped by its own duration and by `latestAt`: the work may have been
 *    sent late too, and it gets the time the loop took from it. Never past `latestAt`
 *    (the caller's deadline), so no caller waits longer for it than it allowed.
 *
 * Only then does `onExpire` run. On time and with nothing to read, that costs one
 * loop turn. `onExpire(true)` says the verdict is inconclusive: the timer fired late
 * and there was no room left before `latestAt` to give the work back the lost time.
 * Such a timeout says the plugin was overloaded, not that the work was slow.
 */
/**
 * Lateness below this is ordinary scheduling noise on a busy machine: the deferral
 * alone reads what has arrived, and a hanging backend's timeout is not stretched.
 */
const LAG_TOLERANCE_MS = 50;

/**
 * Abort reason of a LinkedSignal whose timeout was inconclusive (see PatientTimer).
 * OVERLOADED, like a refusal by admission control: never held against a backend.
 */
export const EVENT_LOOP_LAGGED = new TrousseauError('OVERLOADED', 'overloaded: the plugin was too busy to wait for the answer before the deadline, retry later');

export class PatientTimer {
  private timer: NodeJS.Timeout | undefined;
  private immediate: NodeJS.Immediate | undefined;
  private dueAt = 0;
  private extended = false;
  private cancelled = false;
  private readonly onExpire: (inconclusive: boolean) => void;
  private readonly ms: number;
  private readonly latestAt: number | undefined;
  private readonly unref: boolean;

  /** `latestAt`: Date.now() time no extension goes past; `unref`: do not keep the process alive. */
  constructor(onExpire: (inconclusive: boolean) => void, ms: number, latestAt?: number, unref = false) {
    this.onExpire = onExpire;
    this.ms = ms;
    this.latestAt = latestAt;
    this.unref = unref;
    this.arm(ms);
  }

  cancel(): void {
    this.cancelled = true;
    if (this.timer) clearTimeout(this.timer);
    if (this.immediate) clearImmediate(this.immediate);
  }

  private arm(ms: number): void {
    this.dueAt = performance.now() + ms;
    // Static callbacks with the timer as argument: no closure per timer (this runs per backend call).
    this.timer = setTimeout(PatientTimer.fired, ms, this);
    if (this.unref) this.timer.unref();
  }

  private static fired(this: void, self: PatientTimer): void {
    self.timer = undefined;
    self.immediate = setImmediate(PatientTimer.verdict, self, performance.now() - self.dueAt);
    if (self.unref) self.immediate.unref();
  }

  private static verdict(this: void, self: PatientTimer, late: number): void {
    self.immediate = undefined;
    if (self.cancelled) return;
    if (!self.extended && late >= LAG_TOLERANCE_MS) {
      const room = self.latestAt === undefined ? Infinity : self.latestAt - Date.now();
      const extra = Math.min(late, self.ms, room);
      if (extra >= LAG_TOLERANCE_MS) {
        self.extended = true;
        self.arm(extra);
        return;
      }
      self.onExpire(true);
      return;
    }
    self.onExpire(false);
  }
}

/**
 * A cheap linked AbortSignal: aborts when any parent aborts or when `timeoutMs`
 * passes, measured by a PatientTimer (the event loop's lag is not held against the
 * work). AbortSignal.any + AbortSignal.timeout do the same, but cost about 20x more
 * per call (weak references, composite-signal bookkeeping), and this runs several
 * times per Decrypt. `dispose()` must be called when the work is done.
 *
 * A class rather than an object literal with a `get timedOut()` accessor. Measured
 * on Node 24: a literal with an accessor, built once per call, made ~30 % of all
 * allocation survive the young-generation GC (V8 builds such literals on a slow
 * path; we measured the effect, not the mechanism) and halved the throughput of
 * this function; under load, scavenge pauses grew to 20 ms. A class
 * with a prototype getter costs nothing of the kind (eslint forbids the literal form).
 */
export class LinkedSignal {
  private readonly controller = new AbortController();
  private readonly parents: readonly AbortSignal[];
  private readonly timer: PatientTimer;
  private expired = false;
  private inconclusive = false;

  /**
   * `latestAt` (Date.now() time): the timeout is never extended for lag past it; a
   * timeout that fired late with no room left aborts with EVENT_LOOP_LAGGED instead of
   * `timeoutReason`, and `timedOut` stays false.
   */
  constructor(parents: readonly AbortSignal[], timeoutMs: number, timeoutReason: unknown, latestAt?: number) {
    this.parents = parents;
    this.timer = new PatientTimer(
      (inconclusive) => {
        this.expired = !inconclusive;
        this.inconclusive = inconclusive;
        this.controller.abort(inconclusive ? EVENT_LOOP_LAGGED : timeoutReason);
      },
      timeoutMs,
      latestAt,
      true,
    );
    for (const parent of parents) {
      if (parent.aborted) {
        this.controller.abort(parent.reason);
        break;
      }
      parent.addEventListener('abort', this.onParentAbort, { once: true });
    }
    this.controller.signal.addEventListener('abort', this.dispose, { once: true });
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** True when the timeout, not a parent, aborted the signal. */
  get timedOut(): boolean {
    return this.expired;
  }

  /** True when the timeout fired so late (event-loop lag) that it proves nothing about the work. */
  get lagged(): boolean {
    return this.inconclusive;
  }

  abort(reason: unknown): void {
    this.controller.abort(reason);
  }

  readonly dispose = (): void => {
    this.timer.cancel();
    for (const parent of this.parents) parent.removeEventListener('abort', this.onParentAbort);
  };

  private readonly onParentAbort = (event: Event): void => {
    this.controller.abort((event.target as AbortSignal).reason);
  };
}

export function linkedSignal(parents: readonly AbortSignal[], timeoutMs: number, timeoutReason: unknown, latestAt?: number): LinkedSignal {
  return new LinkedSignal(parents, timeoutMs, timeoutReason, latestAt);
}
