/**
 * The one enforcement point around every backend call.
 *
 * Whatever a backend does, a call through GuardedBackend:
 * - is refused at once while the backend's circuit breaker is open;
 * - is aborted when its timeout passes or the caller gives up (the AbortSignal
 *   reaches the SDK, so abandoned calls do not pile up);
 * - has its result checked (non-empty, sizes within the envelope's limits);
 * - is classified: caller errors (the backend rejected the key or the request) do not
 *   count against the breaker; timeouts, connection errors, 5xx and throttling do;
 * - records latency, outcome and health for metrics, hedging and the key_id.
 *
 * Breakers are opossum with volumeThreshold set (so one failure in a quiet window
 * does not open it), rolling percentiles off (they grow without bound; LatencyWindow
 * measures instead) and its own timeout off (ours aborts the call; opossum's would
 * only stop waiting).
 */
import CircuitBreaker from 'opossum';
import type { Logger } from 'pino';
import type { KeyBackend, WrapContext, WrappedKey } from '../backends/backend.ts';
import { TrousseauError, errorCodeOf, isTrousseauError, type ErrorCode } from '../errors.ts';
import { DATA_KEY_BYTES, MAX_KEY_VERSION_BYTES, MAX_WRAPPED_BYTES } from '../envelope/limits.ts';
import type { BackendOperation, BackendOutcome, Metrics } from '../observability/metrics.ts';
import { linkedSignal } from './abort.ts';
import { Admission, type AdmissionLimits, type Slot } from './admission.ts';
import { LatencyWindow, StallWatch } from './latency.ts';

export interface BreakerSettings {
  /** Failure percentage in the rolling window that opens the breaker (default 50). */
  errorThresholdPercentage: number;
  /** Calls needed in the window before the breaker may open (default 5). */
  volumeThreshold: number;
  /** Rolling window length in milliseconds (default 10000). */
  rollingWindowMs: number;
  /** Milliseconds an open breaker waits before letting one trial call through (default 5000). */
  resetTimeoutMs: number;
}

export interface GuardSettings {
  timeoutMs: number;
  priority: number;
  breaker: BreakerSettings;
  /** Bound on this backend's calls in flight and waiting (config `overload.backend`). */
  admission: AdmissionLimits;
}

export type BreakerState = 'closed' | 'half-open' | 'open';

/** How a caller of wrap / unwrap takes part in admission control. */
export interface CallOptions {
  /** When the caller stops waiting (Date.now() time): a call that could not finish by then is refused, not started. */
  deadlineAt?: number;
  /** Called once the call got its slot and goes to the backend. */
  onAdmitted?: () => void;
}

/** What status, metrics and the key_id know of one backend's health. */
export interface BackendHealth {
  name: string;
  kind: string;
  priority: number;
  breaker: BreakerState;
  /** Result of the last health probe; undefined before the first one finished. */
  probeOk: boolean | undefined;
  /** Error class of the last failed call or probe. */
  lastError: ErrorCode | undefined;
  /**
   * What that failure was, in the plugin's own words (the message its log line has:
   * a timeout, an HTTP status, a key file problem). Never a secret; it may name a key
   * version read from an envelope (printable ASCII, bounded), so it is data to show,
   * not to trust.
   */
  lastErrorCause?: string | undefined;
  lastErrorAt: number | undefined;
  lastSuccessAt: number | undefined;
  /** Since when the backend has been healthy without interruption (undefined while unhealthy). */
  healthySince: number | undefined;
  keyVersion: string | undefined;
  latencyMs: { p50: number | undefined; p95: number | undefined; p99: number | undefined };
}

const MAX_CAUSE_CHARS = 300;

const OUTCOME_BY_CODE: Partial<Record<ErrorCode, BackendOutcome>> = {
  BACKEND_REJECTED: 'rejected',
  BACKEND_UNAVAILABLE: 'unavailable',
  DEADLINE: 'timeout',
  BREAKER_OPEN: 'breaker_open',
  CANCELLED: 'cancelled',
  OVERLOADED: 'shed',
};

/**
 * Errors that say nothing about the backend's availability. OVERLOADED: a call the
 * plugin itself could not wait for (its event loop was late past the caller's deadline).
 */
function isCallerError(error: unknown): boolean {
  const code = errorCodeOf(error);
  return code === 'BACKEND_REJECTED' || code === 'CANCELLED' || code === 'OVERLOADED';
}

/** A call that ended before the backend could prove anything either way. */
function isUnjudged(error: unknown): boolean {
  const code = errorCodeOf(error);
  return code === 'CANCELLED' || code === 'OVERLOADED';
}

type Action = (signal: AbortSignal) => Promise<unknown>;

export class GuardedBackend {
  readonly name: string;
  readonly kind: string;
  readonly priority: number;
  readonly latency = new LatencyWindow();
  /** Whether the backend has stopped answering (read by the Decrypt path's ordering and hedging). */
  readonly stall = new StallWatch();
  /** Calls wait here, not in an SDK's connection pool, so waiting never counts as the backend's time. */
  readonly admission: Admission;
  private readonly breaker: CircuitBreaker<[Action, AbortSignal], unknown>;
  private probeOk: boolean | undefined;
  private lastError: ErrorCode | undefined;
  private lastErrorCause: string | undefined;
  private lastErrorAt: number | undefined;
  private lastSuccessAt: number | undefined;
  private healthySince: number | undefined;
  private everUnhealthy = false;
  private overtakenInARow = 0;
  /** Called when the backend keeps losing to hedges; the plugin asks for a probe. */
  onSuspect: () => void = () => undefined;
  private keyVersion: string | undefined;
  readonly backend: KeyBackend;
  private readonly settings: GuardSettings;
  private readonly metrics: Metrics;
  private readonly logger: Logger;
  private readonly now: () => number;

  constructor(
    backend: KeyBackend,
    settings: GuardSettings,
    metrics: Metrics,
    logger: Logger,
    now: () => number = Date.now,
  ) {
    this.backend = backend;
    this.settings = settings;
    this.metrics = metrics;
    this.logger = logger;
    this.now = now;
    this.name = backend.name;
    this.kind = backend.kind;
    this.priority = settings.priority;
    this.healthySince = now();
    this.admission = new Admission(backend.name, settings.admission, {
      shed: (reason) => metrics.overloadShed.inc({ stage: 'backend', backend: backend.name, reason }),
    });
    metrics.trackAdmission('backend', backend.name, this.admission);
    this.breaker = new CircuitBreaker((action: Action, signal: AbortSignal) => action(signal), {
      timeout: false,
      resetTimeout: settings.breaker.resetTimeoutMs,
      errorThresholdPercentage: settings.breaker.errorThresholdPercentage,
      volumeThreshold: settings.breaker.volumeThreshold,
      rollingCountTimeout: settings.breaker.rollingWindowMs,
      rollingCountBuckets: 10,
      rollingPercentilesEnabled: false,
      // A filtered error counts as a success, and a success closes a half-open breaker:
      // a trial that was cancelled (a hedge won, the client left) or abandoned for our
      // own overload proved nothing, so it
      // counts as a failure there and the breaker waits another resetTimeout.
      errorFilter: (error: unknown) => isCallerError(error) && !(isUnjudged(error) && this.breaker.halfOpen),
      name: backend.name,
    });
    const setState = (state: BreakerState) => {
      metrics.breakerState.set({ backend: this.name }, state === 'closed' ? 0 : state === 'half-open' ? 1 : 2);
      logger.info({ backend: this.name, breaker: state }, 'circuit breaker state changed');
    };
    this.breaker.on('open', () => {
      setState('open');
      this.markUnhealthy(this.lastError ?? 'BACKEND_UNAVAILABLE');
    });
    this.breaker.on('halfOpen', () => setState('half-open'));
    this.breaker.on('close', () => setState('closed'));
    metrics.breakerState.set({ backend: this.name }, 0);
  }

  get breakerState(): BreakerState {
    if (this.breaker.opened) return 'open';
    return this.breaker.halfOpen ? 'half-open' : 'closed';
  }

  /** Worth calling: breaker not open and the last probe did not fail. */
  get usable(): boolean {
    return this.breakerState !== 'open' && this.probeOk !== false;
  }

  /** Healthy without interruption for at least `holdMs` (hysteresis for the key_id). */
  settledHealthy(holdMs: number): boolean {
    if (!this.usable || this.healthySince === undefined) return false;
    return this.everUnhealthy === false || this.now() - this.healthySince >= holdMs;
  }

  health(): BackendHealth {
    return {
      name: this.name,
      kind: this.kind,
      priority: this.priority,
      breaker: this.breakerState,
      probeOk: this.probeOk,
      lastError: this.lastError,
      lastErrorCause: this.lastErrorCause,
      lastErrorAt: this.lastErrorAt,
      lastSuccessAt: this.lastSuccessAt,
      healthySince: this.healthySince,
      keyVersion: this.keyVersion,
      latencyMs: { p50: this.latency.percentile(50), p95: this.latency.percentile(95), p99: this.latency.percentile(99) },
    };
  }

  /** The key version last reported by the backend (refreshed by the health probe). */
  get knownKeyVersion(): string | undefined {
    return this.keyVersion;
  }

  /** Refused with OVERLOADED, before the backend is called, when admission control says so. */
  async wrap(dataKey: Uint8Array, context: WrapContext, signal: AbortSignal, options?: CallOptions): Promise<WrappedKey> {
    const result = await this.call('wrap', (s) => this.backend.wrap(dataKey, context, s), signal, (r) => {
      if (!(r.wrapped instanceof Uint8Array) || r.wrapped.length < 1 || r.wrapped.length > MAX_WRAPPED_BYTES) return 'wrapped key empty or too large';
      if (!isValidKeyVersion(r.keyVersion)) return 'key version empty, too long or not printable';
      return undefined;
    }, options);
    this.keyVersion = result.keyVersion;
    return result;
  }

  async unwrap(wrapped: Uint8Array, keyVersion: string, context: WrapContext, signal: AbortSignal, options?: CallOptions): Promise<Uint8Array> {
    return this.call(
      'unwrap',
      (s) => this.backend.unwrap(wrapped, keyVersion, context, s),
      signal,
      (r) => (r instanceof Uint8Array && r.length === DATA_KEY_BYTES ? undefined : 'unwrapped key has the wrong size'),
      options,
    );
  }

  async currentKeyVersion(signal: AbortSignal): Promise<string> {
    const version = await this.call('key_version', (s) => this.backend.currentKeyVersion(s), signal, (v) =>
      isValidKeyVersion(v) ? undefined : 'key version empty, too long or not printable',
    );
    this.keyVersion = version;
    return version;
  }

  /**
   * Record a health probe's result (the calls it made were recorded already). A probe
   * our own admission control refused proved nothing about the backend: ignored.
   */
  recordProbe(ok: boolean, error?: unknown): void {
    if (!ok && errorCodeOf(error) === 'OVERLOADED') return;
    this.probeOk = ok;
    if (ok) this.markHealthy();
    else this.markUnhealthy(errorCodeOf(error));
    this.metrics.backendUp.set({ backend: this.name }, ok ? 1 : 0);
  }

  /**
   * An Encrypt went out without this backend's copy: new envelopes lack it. The engine
   * never calls this for a wrap that our admission control refused or that was still
   * waiting for a slot: local overload says nothing about the backend.
   */
  recordMissedWrap(): void {
    this.markUnhealthy(this.lastError ?? 'BACKEND_UNAVAILABLE');
  }

  async close(): Promise<void> {
    this.breaker.shutdown();
    await this.backend.close();
  }

  private markHealthy(): void {
    this.healthySince ??= this.now();
  }

  /**
   * Only evidence that new envelopes would lack this backend's copy (breaker open,
   * failed probe, missed wrap) makes it unhealthy; one failed call does not, so a
   * transient error cannot move the key_id.
   */
  private markUnhealthy(code: ErrorCode): void {
    this.healthySince = undefined;
    this.everUnhealthy = true;
    this.lastError = code;
    this.lastErrorAt = this.now();
  }

  private async call<T>(
    operation: BackendOperation,
    fn: (signal: AbortSignal) => Promise<T>,
    callerSignal: AbortSignal,
    check: (result: T) => string | undefined,
    options: CallOptions = {},
  ): Promise<T> {
    let slot: Slot;
    try {
      slot = await this.admission.acquire(callerSignal, options.deadlineAt);
    } catch (error) {
      // Refused before the backend was called: not the backend's failure, so neither the
      // breaker, nor lastError, nor the latency window hears of it.
      this.metrics.backendRequests.inc({ backend: this.name, operation, outcome: 'shed' });
      throw error;
    }
    try {
      options.onAdmitted?.();
      return await this.callAdmitted(operation, fn, callerSignal, check, options.deadlineAt);
    } finally {
      slot.release();
    }
  }

  /**
   * The call itself, once admitted: its timeout, breaker and latency clocks start here.
   * The timeout does not count the event loop's lag (abort.ts, PatientTimer): an
   * answer already in the socket when the timer fires is read first, and a timer that
   * fired late extends once, never past the caller's `deadlineAt`.
   */
  private async callAdmitted<T>(
    operation: BackendOperation,
    fn: (signal: AbortSignal) => Promise<T>,
    callerSignal: AbortSignal,
    check: (result: T) => string | undefined,
    deadlineAt: number | undefined,
  ): Promise<T> {
    const started = performance.now();
    const linked = linkedSignal([callerSignal], this.settings.timeoutMs, CALL_TIMED_OUT, deadlineAt);
    const signal = linked.signal;
    const action: Action = async (s) => {
      let result: T;
      this.stall.started(); // here, not before the breaker: a refusal of its own never reached the backend
      try {
        result = await abortable(fn(s), s);
      } catch (error) {
        // The breaker must see what classify() will report: a call the caller abandoned
        // (client gone, hedge lost, quorum reached) says nothing about the backend,
        // whatever reason the caller's signal carried.
        if (callerSignal.aborted && !linked.timedOut && errorCodeOf(error) !== 'BACKEND_REJECTED') {
          throw this.abandoned(callerSignal, error);
        }
        throw error;
      }
      const problem = check(result);
      if (problem) throw new TrousseauError('BACKEND_UNAVAILABLE', `backend ${this.name} returned an invalid result: ${problem}`);
      return result;
    };
    try {
      const result = (await this.breaker.fire(action, signal).finally(() => linked.dispose())) as T;
      this.stall.answered();
      const elapsed = performance.now() - started;
      this.latency.record(elapsed);
      this.metrics.backendLatency.observe({ backend: this.name, operation }, elapsed / 1000);
      this.metrics.backendRequests.inc({ backend: this.name, operation, outcome: 'success' });
      this.lastSuccessAt = this.now();
      this.overtakenInARow = 0;
      this.metrics.lastSuccess.set({ backend: this.name }, this.lastSuccessAt / 1000);
      return result;
    } catch (raw) {
      const error = this.classify(raw, callerSignal, linked);
      // Its own refusal or error is an answer; a timeout or an abort of ours is not.
      if (error.code === 'BACKEND_REJECTED' || error.code === 'BACKEND_UNAVAILABLE') this.stall.answered();
      const outcome = OUTCOME_BY_CODE[error.code] ?? 'unavailable';
      this.metrics.backendRequests.inc({ backend: this.name, operation, outcome });
      const notTheBackends = outcome === 'breaker_open' || outcome === 'cancelled' || outcome === 'shed';
      if (!notTheBackends) {
        this.metrics.backendLatency.observe({ backend: this.name, operation }, (performance.now() - started) / 1000);
      }
      if (!notTheBackends) {
        this.lastError = error.code;
        // Bounded: a status document must stay small whatever a message grows to.
        this.lastErrorCause = error.message.slice(0, MAX_CAUSE_CHARS);
        this.lastErrorAt = this.now();
      }
      this.logger.debug({ backend: this.name, operation, outcome, code: error.code }, 'backend call failed');
      throw error;
    }
  }

  /**
   * A call the caller gave up on. Usually that says nothing about the backend (client
   * gone, quorum reached, another copy won) and is CANCELLED. But when the caller gave
   * up because this backend was too slow (a deadline of the whole operation, or a
   * hedge that overtook it), it is a DEADLINE and counts against the breaker.
   */
  private abandoned(callerSignal: AbortSignal, cause: unknown): TrousseauError {
    const reason: unknown = callerSignal.reason;
    if (isTrousseauError(reason) && reason.code === 'OVERLOADED') {
      // The caller's own deadline fired too late to judge (event-loop lag): local overload.
      return new TrousseauError('OVERLOADED', `call to backend ${this.name} was abandoned: ${reason.message}`, { cause });
    }
    if (reason === OVERTAKEN_BY_HEDGE && ++this.overtakenInARow % SUSPECT_AFTER_OVERTAKEN === 0) this.onSuspect();
    if (isTrousseauError(reason) && reason.code === 'DEADLINE') {
      return new TrousseauError('DEADLINE', `backend ${this.name} was too slow: ${reason.message}`, { cause });
    }
    return new TrousseauError('CANCELLED', `call to backend ${this.name} was abandoned`, { cause });
  }

  /** Turn whatever the call threw into a TrousseauError with a safe message. */
  private classify(raw: unknown, callerSignal: AbortSignal, call: { readonly timedOut: boolean; readonly lagged: boolean }): TrousseauError {
    if ((raw as { code?: unknown }).code === 'EOPENBREAKER') {
      return new TrousseauError('BREAKER_OPEN', `backend ${this.name} is failing; its circuit breaker is open`);
    }
    if (callerSignal.aborted) {
      // Already classified inside the action (see there); anything else was abandoned too.
      if (isTrousseauError(raw) && (raw.code === 'CANCELLED' || raw.code === 'DEADLINE' || raw.code === 'OVERLOADED')) return raw;
      return this.abandoned(callerSignal, raw);
    }
    if (call.lagged) {
      return new TrousseauError('OVERLOADED', `call to backend ${this.name} was abandoned: the plugin's event loop was too late to judge its timeout`, { cause: raw });
    }
    if (call.timedOut) {
      return new TrousseauError('DEADLINE', `backend ${this.name} did not answer within ${this.settings.timeoutMs} ms`, { cause: raw });
    }
    const code = errorCodeOf(raw);
    if (code === 'BACKEND_REJECTED' || code === 'BACKEND_UNAVAILABLE') return raw as TrousseauError;
    // A backend let an unexpected error escape: treat as an outage, keep the raw error out of the message.
    return new TrousseauError('BACKEND_UNAVAILABLE', `backend ${this.name} failed unexpectedly`, { cause: raw });
  }
}

/**
 * Abort reason for an unwrap that a hedge started after it answered first. Like any
 * abandoned call it does not count against the breaker (a slow answer is not a
 * failure), but several in a row make the backend suspect: `onSuspect` then asks for
 * a health probe, which tells a slow backend from a dead one.
 */
export const OVERTAKEN_BY_HEDGE = new TrousseauError('CANCELLED', 'overtaken by a hedged copy');
const SUSPECT_AFTER_OVERTAKEN = 3;

const CALL_TIMED_OUT = new TrousseauError('DEADLINE', 'backend call timed out');

function isValidKeyVersion(v: unknown): v is string {
  return typeof v === 'string' && v.length >= 1 && v.length <= MAX_KEY_VERSION_BYTES && /^[\x21-\x7e]+$/.test(v);
}

/**
 * Settle as soon as `signal` aborts, even if the backend ignores it: the breaker and
 * the caller must never wait on a backend past its timeout.
 */
function abortable<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) {
    promise.catch(() => undefined);
    return Promise.reject(signal.reason as Error);
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason as Error);
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener('abort', onAbort);
        resolve(value);
      },
      (error: Error) => {
        signal.removeEventListener('abort', onAbort);
        reject(error);
      },
    );
  });
}
