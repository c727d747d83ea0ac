/**
 * Encrypt with quorum, Decrypt with failover and hedging.
 *
 * Encrypt: a fresh data key is wrapped by every usable backend in parallel under one
 * deadline. As soon as `quorum` copies exist we wait a short grace for stragglers,
 * then abandon the rest, so latency tracks the quorum-th fastest backend, never the
 * sum. Below quorum nothing is returned: Unavailable.
 *
 * Decrypt: the envelope's copies that belong to configured backends are ordered by
 * priority, health and latency. The best is started; the next is started at once if
 * it fails, or after a hedge delay (about that backend's p95) if it is slow, within
 * a hedge budget. The first key that passes the envelope's key commitment wins and
 * the other calls are aborted. A backend that has stopped answering (StallWatch:
 * calls waiting, none answered for twice its p99) is tried after the others, and
 * hedging a call stuck on it is a failover, outside the budget: with a frozen
 * preferred server, Decrypts cost about that wait, not the backend timeout.
 */
import type { Logger } from 'pino';
import { TrousseauError, errorCodeOf, type ErrorCode } from '../errors.ts';
import { EnvelopeKeys, envelopeSize, newDataKey, newEnvelopeId, openPayload, sealEnvelope } from '../envelope/crypto.ts';
import { parseEnvelope, type CopyEntry, type ParsedEnvelope } from '../envelope/format.ts';
import { V2_MAX_CIPHERTEXT_BYTES } from '../envelope/limits.ts';
import { placeCopies, type Transport, type WrappedCopy } from '../envelope/placement.ts';
import type { Metrics } from '../observability/metrics.ts';
import { OVERTAKEN_BY_HEDGE, type GuardedBackend } from './guarded-backend.ts';
import { EVENT_LOOP_LAGGED, linkedSignal, PatientTimer } from './abort.ts';
import { HedgeBudget } from './hedge-budget.ts';

export interface EngineSettings {
  /** Copies an Encrypt needs. */
  quorum: number;
  /** Whole-Encrypt deadline in milliseconds. */
  encryptDeadlineMs: number;
  /** How long to wait for the remaining backends once quorum is reached. */
  stragglerGraceMs: number;
  /** A straggler gets at least this multiple of its own recent p95 latency (0: off). */
  stragglerLatencyFactor: number;
  /** Whole-Decrypt deadline in milliseconds. */
  decryptDeadlineMs: number;
  hedging: {
    enabled: boolean;
    /** Bounds of the adaptive hedge delay in milliseconds. */
    minDelayMs: number;
    maxDelayMs: number;
    /** Steady-state hedges per Decrypt (0.1 = 10 %). */
    budgetRatio: number;
    budgetBurst: number;
  };
}

export interface EncryptResult {
  ciphertext: Buffer;
  annotations: Map<string, Uint8Array>;
  /** Backends that wrapped the key. */
  wrappedBy: string[];
  /** Configured backends whose copy is missing. */
  missing: string[];
}

export interface DecryptResult {
  plaintext: Buffer;
  /** Backend whose copy opened the envelope. */
  unwrappedBy: string;
  formatVersion: number;
}

/** The payload failed to open under a committed key: the envelope itself was altered. */
class EnvelopeAlteredError extends Error {
  readonly original: TrousseauError;

  constructor(original: TrousseauError) {
    super(original.message);
    this.original = original;
  }
}

// Abort reasons are shared: the abort is routine, and an Error per call costs a stack trace.
const ANOTHER_COPY_WON = new TrousseauError('CANCELLED', 'another copy won');
const ENCRYPT_FINISHED = new TrousseauError('CANCELLED', 'encrypt finished');
const ENCRYPT_DEADLINE = new TrousseauError('DEADLINE', 'encrypt deadline passed');
const DECRYPT_DEADLINE = new TrousseauError('DEADLINE', 'decrypt deadline passed');

const BREAKER_RANK = { closed: 0, 'half-open': 1, open: 2 } as const;

function tooLargeForV2(plaintextLength: number): TrousseauError {
  return new TrousseauError('INVALID_INPUT', `plaintext of ${plaintextLength} bytes does not fit a KMS v2 ciphertext of ${V2_MAX_CIPHERTEXT_BYTES} bytes`);
}

export class WrapEngine {
  private readonly byName: Map<string, GuardedBackend>;
  private readonly hedgeBudget: HedgeBudget;
  private readonly backends: readonly GuardedBackend[];
  private readonly settings: EngineSettings;
  private readonly metrics: Metrics;
  private readonly logger: Logger;
  /** Told of each copy refused (BACKEND_REJECTED, TAMPERED) by a Decrypt that another copy then opened. */
  onRejectedCopy: (backend: string, reason: ErrorCode) => void = () => undefined;

  constructor(
    backends: readonly GuardedBackend[],
    settings: EngineSettings,
    metrics: Metrics,
    logger: Logger) {
    this.backends = backends;
    this.settings = settings;
    this.metrics = metrics;
    this.logger = logger;
    this.byName = new Map(backends.map((b) => [b.name, b]));
    this.hedgeBudget = new HedgeBudget(settings.hedging.budgetRatio, settings.hedging.budgetBurst);
  }

  async encrypt(plaintext: Uint8Array, transport: Transport, callerSignal: AbortSignal): Promise<EncryptResult> {
    const { first, reserve } = this.encryptPlan();
    // Every backend in `first` is asked, and each copy it returns takes header space.
    const fits = transport === 'v2' ? (names: readonly string[]) => this.fitsV2(plaintext.length, names) : () => true;
    if (!fits(first.map((b) => b.name))) throw tooLargeForV2(plaintext.length);
    const dataKey = newDataKey();
    const envelopeId = newEnvelopeId();
    try {
      const { copies, notStarted } = await this.wrapWithQuorum(first, reserve, fits, dataKey, envelopeId, callerSignal);
      const wrappedBy = copies.map((c) => c.backendName);
      const missing = this.backends.filter((b) => !wrappedBy.includes(b.name));
      // A usable backend left out only because its wrap could not get a slot here: the
      // envelope would lack a copy for a reason that has nothing to do with the backend,
      // and an envelope missing a copy moves the key_id. Refuse the call instead.
      const crowdedOut = missing.filter((b) => notStarted.has(b.name) && b.usable);
      if (crowdedOut.length > 0) {
        throw new TrousseauError('OVERLOADED', `overloaded: the wrap by ${crowdedOut.map((b) => b.name).join(', ')} could not start in time; retry later`);
      }
      const placement = placeCopies(copies, plaintext.length, transport);
      const ciphertext = sealEnvelope({
        dataKey,
        envelopeId,
        quorum: this.settings.quorum,
        configuredBackends: this.backends.length,
        copies: placement.copies,
        plaintext,
      });
      // An Encrypt whose caller already left (its deadline passed under a burst) is never
      // delivered, so its envelope never reaches etcd: a copy it lacks says nothing about
      // new envelopes and must not move the key_id.
      if (!callerSignal.aborted) for (const backend of missing) if (!notStarted.has(backend.name)) backend.recordMissedWrap();
      this.metrics.encryptWraps.observe(copies.length);
      if (missing.length > 0) this.metrics.underWrapped.inc();
      return { ciphertext, annotations: placement.annotations, wrappedBy, missing: missing.map((b) => b.name) };
    } finally {
      dataKey.fill(0);
    }
  }

  /**
   * Who an Encrypt asks first: the backends not known to be down. The others (the
   * reserve) are started too, within the same deadline, as soon as the calls under way
   * can no longer reach quorum: a breaker refuses instantly, and a backend marked down
   * by one slow probe may answer.
   */
  private encryptPlan(): { first: GuardedBackend[]; reserve: GuardedBackend[] } {
    const usable = this.backends.filter((b) => b.usable);
    const first = usable.length >= this.settings.quorum ? usable : [...this.backends];
    return { first, reserve: this.backends.filter((b) => !first.includes(b)) };
  }

  /**
   * Whether a KMS v2 ciphertext with a copy from each of `names` could fit 1024 bytes
   * (all copies moved to annotations, the smallest header they can have). Checked
   * against the copies actually requested, before paying for any (billed) wrap;
   * placeCopies still makes the exact check once the copies exist.
   */
  private fitsV2(plaintextLength: number, names: readonly string[]): boolean {
    const entries = names.map((name) => ({
      backendName: name,
      keyVersion: this.byName.get(name)?.knownKeyVersion ?? 'x',
      wrapped: new Uint8Array(0),
      location: 'annotation' as const,
    }));
    return envelopeSize(entries, plaintextLength) <= V2_MAX_CIPHERTEXT_BYTES;
  }

  /**
   * Wrap with `first` (and spares from `reserve` when `first` can no longer reach
   * quorum); `fits` says whether the copies of a set of backends could be placed.
   * `notStarted`: backends whose wrap never reached them (refused by admission control
   * or still waiting for a slot when the Encrypt ended).
   */
  private wrapWithQuorum(
    first: readonly GuardedBackend[],
    spares: readonly GuardedBackend[],
    fits: (names: readonly string[]) => boolean,
    dataKey: Buffer,
    envelopeId: Buffer,
    callerSignal: AbortSignal,
  ): Promise<{ copies: WrappedCopy[]; notStarted: Set<string> }> {
    const { quorum, encryptDeadlineMs, stragglerGraceMs, stragglerLatencyFactor } = this.settings;
    const reserve = [...spares];
    const deadlineAt = Date.now() + encryptDeadlineMs;
    // Never extended for event-loop lag (latestAt = its own end): the caller's deadline is firm.
    const abandon = linkedSignal([callerSignal], encryptDeadlineMs, ENCRYPT_DEADLINE, deadlineAt);
    const signal = abandon.signal;

    return new Promise((resolve, reject) => {
      const copies: WrappedCopy[] = [];
      const errors: { backend: string; code: ErrorCode }[] = [];
      const notStarted = new Set<string>();
      /** Wraps under way (calls, backend names), and which of them still wait for a slot here. */
      const pending = new Set<Promise<unknown>>();
      const inProgress = new Set<string>();
      const waitingForSlot = new Set<string>();
      /** performance.now() at which each wrap under way got its slot here. */
      const admittedAt = new Map<string, number>();
      let started = 0;
      let settled = 0;
      let graceTimer: PatientTimer | undefined;
      let quorumAt: number | undefined;
      let done = false;

      const decide = () => {
        if (copies.length >= quorum) {
          // Header order follows the configuration, not arrival, so envelopes are comparable.
          const order = new Map(this.backends.map((b, i) => [b.name, i]));
          copies.sort((a, b) => order.get(a.backendName)! - order.get(b.backendName)!);
          resolve({ copies, notStarted });
          return;
        }
        const detail = errors.map((e) => `${e.backend}: ${e.code}`).join(', ');
        const overloaded = errors.some((e) => e.code === 'OVERLOADED');
        reject(
          new TrousseauError(
            overloaded ? 'OVERLOADED' : 'QUORUM_NOT_MET',
            `${overloaded ? 'overloaded: ' : ''}only ${copies.length} of ${quorum} required backends wrapped the key (${detail || 'none reachable'})`,
          ),
        );
      };

      const finish = (reason: TrousseauError = ENCRYPT_FINISHED) => {
        if (done) return;
        done = true;
        graceTimer?.cancel();
        abandon.abort(reason);
        // Aborted calls settle at once (GuardedBackend never waits on a backend past an
        // abort); waiting for them tells which missing copies never reached their backend.
        void Promise.allSettled(pending).then(decide);
      };

      /**
       * The straggler grace counts a backend's own time: it runs from quorum, or from
       * when a wrap still waiting for a slot here got one, whichever is later. A wrap
       * is never abandoned for time it spent in our queue (within the deadline), or the
       * envelope would lack its copy because of our own load. (With a grace of 0 a
       * wrap admitted after quorum is abandoned at once, like any straggler.)
       *
       * It also follows each backend's own pace: a wrap is given at least
       * `stragglerLatencyFactor` times that backend's recent p95 from when it got its
       * slot. A copy left out moves the key_id (a new DEK for the apiserver), so a
       * backend that is merely far away (another region, an Azure copy of two calls)
       * must not be cut off by a fixed 150 ms; one much slower than its own norm is.
       */
      const graceEndFor = (name: string, from: number): number => {
        const typical = stragglerLatencyFactor > 0 ? this.byName.get(name)?.latency.percentile(95) : undefined;
        return from + Math.max(stragglerGraceMs, typical === undefined ? 0 : stragglerLatencyFactor * typical);
      };
      // `lagged`: the grace ended so late (event-loop lag, no time left to give back)
      // that a straggler cannot be told from our own delay: it is abandoned as
      // OVERLOADED, not as a straggler, so no missed wrap is recorded (abort.ts).
      const armGrace = (lagged = false) => {
        graceTimer?.cancel();
        if (done || quorumAt === undefined || waitingForSlot.size > 0) return; // re-armed at the next admission
        let graceEnd = quorumAt + stragglerGraceMs;
        for (const name of inProgress) graceEnd = Math.max(graceEnd, graceEndFor(name, Math.max(quorumAt, admittedAt.get(name) ?? quorumAt)));
        const left = graceEnd - performance.now();
        if (left <= 0) finish(lagged ? EVENT_LOOP_LAGGED : ENCRYPT_FINISHED);
        // Patient: a straggler's answer already in the socket when the grace ends late is read first.
        else graceTimer = new PatientTimer(armGrace, left, deadlineAt);
      };
      const onAdmitted = (name: string) => {
        waitingForSlot.delete(name);
        admittedAt.set(name, performance.now());
        armGrace();
      };

      const start = (backend: GuardedBackend) => {
        started++;
        inProgress.add(backend.name);
        waitingForSlot.add(backend.name);
        const call = backend
          .wrap(dataKey, { envelopeId, backendName: backend.name }, signal, { deadlineAt, onAdmitted: () => onAdmitted(backend.name) })
          .then(
            ({ wrapped, keyVersion }) => {
              inProgress.delete(backend.name);
              if (done) return;
              copies.push({ backendName: backend.name, keyVersion, wrapped });
              if (copies.length === quorum && this.backends.length > quorum) {
                quorumAt = performance.now();
                armGrace();
              }
            },
            (error: unknown) => {
              inProgress.delete(backend.name);
              const code = errorCodeOf(error);
              if (code === 'OVERLOADED') notStarted.add(backend.name);
              if (done) return;
              errors.push({ backend: backend.name, code });
              if (copies.length + inProgress.size < quorum) startSpares();
            },
          )
          .finally(() => {
            inProgress.delete(backend.name);
            const wasWaiting = waitingForSlot.delete(backend.name);
            admittedAt.delete(backend.name);
            pending.delete(call);
            if (wasWaiting) armGrace();
            settled++;
            if (settled === started) finish();
          });
        pending.add(call);
      };

      // A spare is started only if its copy could still be placed next to every copy
      // that may yet arrive: a wrap whose copy cannot fit is a billed call for nothing.
      // One that does not fit now stays in reserve for the next failure.
      const startSpares = () => {
        const mayArrive = [...copies.map((c) => c.backendName), ...inProgress];
        for (const spare of [...reserve]) {
          if (!fits([...mayArrive, spare.name])) continue;
          reserve.splice(reserve.indexOf(spare), 1);
          mayArrive.push(spare.name);
          start(spare);
        }
      };

      signal.addEventListener('abort', () => finish(), { once: true });
      for (const backend of first) start(backend);
    });
  }


  async decrypt(ciphertext: Uint8Array, annotations: ReadonlyMap<string, Uint8Array>, callerSignal: AbortSignal): Promise<DecryptResult> {
    // Parsing checks every length and costs no backend call: malformed input ends here.
    const envelope = parseEnvelope(ciphertext, annotations);
    const candidates = this.orderCopies(envelope.copies);
    if (candidates.length === 0) {
      const ours = envelope.copies.filter((c) => this.byName.has(c.backendName));
      if (ours.length > 0) {
        const names = ours.map((c) => c.backendName).join(', ');
        throw new TrousseauError('INVALID_INPUT', `the copies for ${names} are stored in annotations that are missing or altered`);
      }
      throw new TrousseauError('INVALID_INPUT', 'no wrapped copy in this envelope belongs to a configured backend');
    }
    this.hedgeBudget.earn();
    const result = await this.raceUnwrap(envelope, candidates, callerSignal);
    this.metrics.envelopesRead.inc({ format_version: String(envelope.formatVersion) });
    return result;
  }

  /** Copies we may try, best first. Only configured backends are ever called. */
  private orderCopies(copies: readonly CopyEntry[]): { copy: CopyEntry & { wrapped: Uint8Array }; backend: GuardedBackend }[] {
    const usable = [];
    for (const copy of copies) {
      const backend = this.byName.get(copy.backendName);
      if (backend && copy.wrapped) usable.push({ copy: copy as CopyEntry & { wrapped: Uint8Array }, backend, stalled: this.isStalled(backend) });
    }
    return usable.sort((a, b) => {
      const x = a.backend;
      const y = b.backend;
      // Backends known to be down (open breaker, failed probe) only when nothing else is
      // left, whatever their priority; then those that have stopped answering (before
      // their breaker can know: timeouts take a whole timeout to count); then
      // priority, closed before half-open, latency.
      return (
        (x.usable ? 0 : 1) - (y.usable ? 0 : 1) ||
        (a.stalled ? 1 : 0) - (b.stalled ? 1 : 0) ||
        x.priority - y.priority ||
        BREAKER_RANK[x.breakerState] - BREAKER_RANK[y.breakerState] ||
        (x.latency.percentile(50) ?? Infinity) - (y.latency.percentile(50) ?? Infinity)
      );
    });
  }

  private isStalled(backend: GuardedBackend): boolean {
    const after = this.stallAfter(backend);
    return after !== undefined && backend.stall.stalled(after);
  }

  /**
   * How long a backend may go without answering, while a call waits, before it counts
   * as stalled: twice its recent p99 (a slow but steady backend, whose answers come
   * further apart than the hedge delay, is not stalled), and never less than the
   * hedge delay. Undefined (never stalled) while too few calls were measured to
   * know what is normal for it.
   */
  private stallAfter(backend: GuardedBackend): number | undefined {
    if (backend.latency.size < 20) return undefined;
    return Math.max(this.hedgeDelay(backend), 2 * backend.latency.percentile(99)!);
  }

  private hedgeDelay(backend: GuardedBackend): number {
    const { minDelayMs, maxDelayMs } = this.settings.hedging;
    const p95 = backend.latency.size >= 20 ? backend.latency.percentile(95)! : maxDelayMs;
    return Math.min(maxDelayMs, Math.max(minDelayMs, p95));
  }

  private raceUnwrap(
    envelope: ParsedEnvelope,
    candidates: readonly { copy: CopyEntry & { wrapped: Uint8Array }; backend: GuardedBackend }[],
    callerSignal: AbortSignal,
  ): Promise<DecryptResult> {
    const deadlineAt = Date.now() + this.settings.decryptDeadlineMs;
    // Never extended for event-loop lag (latestAt = its own end): the caller's deadline is firm.
    const won = linkedSignal([callerSignal], this.settings.decryptDeadlineMs, DECRYPT_DEADLINE, deadlineAt);
    const signal = won.signal;
    const failures: { backend: string; code: ErrorCode }[] = [];

    return new Promise<DecryptResult>((resolve, reject) => {
      let next = 0;
      let done = false;
      let hedgeTimer: NodeJS.Timeout | undefined;
      // Attempts still running; `overtaken` marks one that was slow enough to be hedged.
      const attemptsInFlight = new Set<{ controller: AbortController; overtaken: boolean }>();

      const settle = (outcome: { result: DecryptResult } | { error: TrousseauError }) => {
        if (done) return;
        done = true;
        clearTimeout(hedgeTimer);
        signal.removeEventListener('abort', onAbort);
        // An attempt that a later hedge beat is marked so its backend can notice it keeps
        // losing (see GuardedBackend): hedges would otherwise hide a black-holed backend.
        for (const attempt of attemptsInFlight) attempt.controller.abort(attempt.overtaken ? OVERTAKEN_BY_HEDGE : ANOTHER_COPY_WON);
        won.abort(ANOTHER_COPY_WON);
        if ('result' in outcome) for (const f of failures) if (f.code === 'BACKEND_REJECTED' || f.code === 'TAMPERED') this.onRejectedCopy(f.backend, f.code);
        if ('result' in outcome) resolve(outcome.result);
        else reject(outcome.error);
      };

      const allFailed = () => {
        const detail = failures.map((f) => `${f.backend}: ${f.code}`).join(', ');
        // Every copy refused for a reason retrying cannot fix => the envelope is the problem.
        const permanent = failures.length > 0 && failures.every((f) => f.code === 'BACKEND_REJECTED' || f.code === 'TAMPERED');
        // A copy our own admission control kept from its backend: the refusal is ours, say so.
        const overloaded = !permanent && failures.some((f) => f.code === 'OVERLOADED');
        const code: ErrorCode = permanent
          ? failures.some((f) => f.code === 'TAMPERED')
            ? 'TAMPERED'
            : 'BACKEND_REJECTED'
          : overloaded
            ? 'OVERLOADED'
            : 'NO_COPY_UNWRAPPED';
        settle({ error: new TrousseauError(code, `${overloaded ? 'overloaded: ' : ''}no wrapped copy could be unwrapped (${detail})`) });
      };

      const onAbort = () => {
        if (callerSignal.aborted) settle({ error: new TrousseauError('CANCELLED', 'client cancelled the call') });
        else {
          failures.push(...candidates.slice(next).map((c) => ({ backend: c.backend.name, code: 'DEADLINE' as const })));
          settle({ error: new TrousseauError('DEADLINE', `decrypt did not finish within ${this.settings.decryptDeadlineMs} ms (${failures.map((f) => `${f.backend}: ${f.code}`).join(', ')})`) });
        }
      };
      signal.addEventListener('abort', onAbort, { once: true });

      const launch = (reason: 'first' | 'failover' | 'hedge') => {
        if (done || next >= candidates.length) return;
        const { copy, backend } = candidates[next++]!;
        if (reason === 'failover') this.metrics.decryptFailovers.inc();
        const isHedge = reason === 'hedge';
        const attempt = { controller: new AbortController(), overtaken: false };
        attemptsInFlight.add(attempt);
        const attemptSignal = attempt.controller.signal;
        clearTimeout(hedgeTimer);
        // Schedule a hedge behind this attempt if there is another copy to try. Without a
        // budget token it is looked at again (half a delay later) while the call waits: the
        // backend may stop answering meanwhile, and a hedge of a call stuck on a stalled
        // backend is a failover, which no budget limits. It adds no load to the stalled
        // backend (Decrypts go elsewhere first) and one call to the next, as a failover
        // at the timeout would.
        const armHedge = (delay: number) => {
          hedgeTimer = setTimeout(() => {
            if (done) return;
            if (this.isStalled(backend) || this.hedgeBudget.trySpend()) {
              this.metrics.decryptHedges.inc();
              attempt.overtaken = true;
              launch('hedge');
            } else armHedge(Math.max(this.settings.hedging.minDelayMs, delay / 2));
          }, delay);
          hedgeTimer.unref();
        };
        if (this.settings.hedging.enabled && next < candidates.length) armHedge(this.hedgeDelay(backend));
        const onRaceAbort = () => attempt.controller.abort(signal.reason);
        signal.addEventListener('abort', onRaceAbort, { once: true });
        this.attempt(envelope, copy, backend, attemptSignal, deadlineAt).finally(() => {
          attemptsInFlight.delete(attempt);
          signal.removeEventListener('abort', onRaceAbort);
        }).then(
          (plaintext) => {
            if (isHedge && !done) this.metrics.decryptHedgesWon.inc();
            settle({ result: { plaintext, unwrappedBy: backend.name, formatVersion: envelope.formatVersion } });
          },
          (error: unknown) => {
            if (done) return;
            const code = errorCodeOf(error);
            if (error instanceof EnvelopeAlteredError) {
              // The key was right (commitment passed) but the payload does not open: no copy can help.
              settle({ error: error.original });
              return;
            }
            failures.push({ backend: backend.name, code });
            if (next < candidates.length) launch('failover');
            else if (attemptsInFlight.size === 0) allFailed();
          },
        );
      };
      launch('first');
    });
  }

  /** Unwrap one copy, check the commitment in constant time, then open the payload. */
  private async attempt(
    envelope: ParsedEnvelope,
    copy: CopyEntry & { wrapped: Uint8Array },
    backend: GuardedBackend,
    signal: AbortSignal,
    deadlineAt?: number,
  ): Promise<Buffer> {
    const dataKey = await backend.unwrap(copy.wrapped, copy.keyVersion, { envelopeId: envelope.envelopeId, backendName: backend.name }, signal, { deadlineAt });
    // The guard checked it is exactly 32 bytes; one HKDF extract serves both derivations.
    const keys = new EnvelopeKeys(dataKey, envelope.envelopeId);
    try {
      if (!keys.matches(envelope.commitment)) {
        this.metrics.commitmentMismatches.inc({ backend: backend.name });
        this.logger.warn({ backend: backend.name }, 'unwrapped key does not match the envelope commitment: copy tampered with');
        throw new TrousseauError('TAMPERED', `copy from ${backend.name} wraps a different key`);
      }
      try {
        return openPayload(envelope, keys);
      } catch (error) {
        throw new EnvelopeAlteredError(error as TrousseauError);
      }
    } finally {
      keys.wipe();
      dataKey.fill(0);
    }
  }

  /**
   * Seal `plaintext` with a copy from every configured backend, waiting for each one
   * (no straggler grace, down backends tried too): the escrow canary and `rewrap`
   * need every copy they can get, not the fastest quorum. Serving metrics and health
   * are left alone: this is not an Encrypt the apiserver asked for. `encrypted` is
   * undefined when fewer than `minCopies` (at least 1) backends wrapped the key.
   */
  async encryptWithEvery(
    plaintext: Uint8Array,
    transport: Transport,
    signal: AbortSignal,
    minCopies = this.settings.quorum,
  ): Promise<{ encrypted: EncryptResult | undefined; failures: Map<string, ErrorCode> }> {
    if (transport === 'v2' && !this.fitsV2(plaintext.length, this.backends.map((b) => b.name))) throw tooLargeForV2(plaintext.length);
    const dataKey = newDataKey();
    const envelopeId = newEnvelopeId();
    try {
      const settled = await Promise.allSettled(this.backends.map((b) => b.wrap(dataKey, { envelopeId, backendName: b.name }, signal)));
      const copies: WrappedCopy[] = [];
      const failures = new Map<string, ErrorCode>();
      settled.forEach((outcome, i) => {
        const backend = this.backends[i]!;
        if (outcome.status === 'fulfilled') copies.push({ backendName: backend.name, keyVersion: outcome.value.keyVersion, wrapped: outcome.value.wrapped });
        else failures.set(backend.name, errorCodeOf(outcome.reason));
      });
      if (copies.length < Math.max(1, minCopies)) return { encrypted: undefined, failures };
      const placement = placeCopies(copies, plaintext.length, transport);
      const ciphertext = sealEnvelope({
        dataKey,
        envelopeId,
        quorum: Math.min(this.settings.quorum, copies.length),
        configuredBackends: this.backends.length,
        copies: placement.copies,
        plaintext,
      });
      const wrappedBy = copies.map((c) => c.backendName);
      return { encrypted: { ciphertext, annotations: placement.annotations, wrappedBy, missing: [...failures.keys()] }, failures };
    } finally {
      dataKey.fill(0);
    }
  }

  /**
   * Open an envelope with one backend's copy only, never failing over to another:
   * the proof that this backend alone can recover the data (escrow verification).
   */
  async decryptWithOnly(backendName: string, ciphertext: Uint8Array, annotations: ReadonlyMap<string, Uint8Array>, signal: AbortSignal): Promise<DecryptResult> {
    const envelope = parseEnvelope(ciphertext, annotations);
    const backend = this.byName.get(backendName);
    const copy = envelope.copies.find((c) => c.backendName === backendName);
    if (!backend) throw new TrousseauError('INVALID_INPUT', `backend ${backendName} is not configured`);
    if (!copy?.wrapped) throw new TrousseauError('INVALID_INPUT', `the envelope holds no copy from backend ${backendName}`);
    try {
      const plaintext = await this.attempt(envelope, copy as CopyEntry & { wrapped: Uint8Array }, backend, signal);
      return { plaintext, unwrappedBy: backend.name, formatVersion: envelope.formatVersion };
    } catch (error) {
      throw error instanceof EnvelopeAlteredError ? error.original : error;
    }
  }
}
