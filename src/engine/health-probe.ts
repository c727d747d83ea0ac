/**
 * Background health probe, one loop per backend: a real wrap and unwrap of a random
 * canary key, plus a fresh read of the backend's current key version (which is how
 * a key rotation reaches the key_id). It goes through GuardedBackend like any call,
 * so it is also the half-open trial that closes a breaker when a backend returns,
 * and an idle plugin still knows every backend's health.
 *
 * Interval `intervalMs` while healthy; after a failure it retries sooner and backs
 * off exponentially up to `maxBackoffMs`, so a dead backend is not hammered.
 */
import { randomBytes, timingSafeEqual } from 'node:crypto';
import type { Logger } from 'pino';
import { TrousseauError, errorCodeOf, isTrousseauError } from '../errors.ts';
import type { GuardedBackend } from './guarded-backend.ts';

export interface ProbeSettings {
  intervalMs: number;
  minBackoffMs: number;
  maxBackoffMs: number;
}

export interface ProbeResult {
  backend: string;
  ok: boolean;
  error?: unknown;
}

/** One probe of one backend: key version, wrap, unwrap, compare. */
export async function probeBackend(backend: GuardedBackend, signal: AbortSignal): Promise<ProbeResult> {
  const canary = randomBytes(32);
  const context = { envelopeId: randomBytes(16), backendName: backend.name };
  try {
    await backend.currentKeyVersion(signal);
    const { wrapped, keyVersion } = await backend.wrap(canary, context, signal);
    const unwrapped = await backend.unwrap(wrapped, keyVersion, context, signal);
    if (!timingSafeEqual(Buffer.from(unwrapped), canary)) {
      throw new TrousseauError('BACKEND_UNAVAILABLE', `backend ${backend.name} unwrapped the canary to a different key`);
    }
    return { backend: backend.name, ok: true };
  } catch (error) {
    return { backend: backend.name, ok: false, error };
  } finally {
    canary.fill(0);
  }
}

export class HealthProber {
  private readonly timers = new Map<string, NodeJS.Timeout>();
  private readonly failures = new Map<string, number>();
  private readonly probing = new Set<string>();
  private readonly lastProbeAt = new Map<string, number>();
  private readonly controller = new AbortController();
  private stopped = false;
  private readonly backends: readonly GuardedBackend[];
  private readonly settings: ProbeSettings;
  private readonly logger: Logger;
  private readonly onProbed: () => void;

  constructor(
    backends: readonly GuardedBackend[],
    settings: ProbeSettings,
    logger: Logger,
    onProbed: () => void = () => undefined,
  ) {
    this.backends = backends;
    this.settings = settings;
    this.logger = logger;
    this.onProbed = onProbed;
  }

  /** Probe every backend once, in parallel, and record the results. */
  async probeAll(): Promise<ProbeResult[]> {
    return Promise.all(this.backends.map((b) => this.probeOnce(b)));
  }

  /** Start the background loops (after an initial probeAll). */
  start(): void {
    for (const backend of this.backends) this.schedule(backend);
  }

  stop(): void {
    this.stopped = true;
    this.controller.abort(new TrousseauError('SHUTTING_DOWN', 'plugin is shutting down'));
    for (const timer of this.timers.values()) clearTimeout(timer);
    this.timers.clear();
  }

  private async probeOnce(backend: GuardedBackend): Promise<ProbeResult> {
    this.probing.add(backend.name);
    this.lastProbeAt.set(backend.name, Date.now());
    const result = await probeBackend(backend, this.controller.signal).finally(() => this.probing.delete(backend.name));
    if (this.stopped) return result;
    const before = backend.usable;
    backend.recordProbe(result.ok, result.error);
    const failures = result.ok ? 0 : (this.failures.get(backend.name) ?? 0) + 1;
    this.failures.set(backend.name, failures);
    if (result.ok !== before || (!result.ok && failures === 1)) {
      const level = result.ok ? 'info' : 'warn';
      // Our messages are written to be shown (never an SDK's raw text) and are the only
      // place that says why: "key file ... readable by others; chmod 600 it".
      const reason = !result.ok && isTrousseauError(result.error) ? result.error.message : undefined;
      this.logger[level]({ backend: backend.name, ok: result.ok, code: result.ok ? undefined : errorCodeOf(result.error), reason }, 'backend health probe');
    }
    this.onProbed();
    return result;
  }

  /**
   * Probe `backend` now instead of at its next turn: the engine suspects it (it keeps
   * losing to hedges). A slow backend passes and stays in use; a black-holed one fails
   * the probe within its timeout and moves behind the others, instead of costing every
   * Decrypt a hedge delay until the next scheduled probe. At most one probe at a time
   * per backend, and none sooner than minBackoffMs after the last.
   */
  probeSoon(backend: GuardedBackend): void {
    if (this.stopped || !this.timers.has(backend.name) || this.probing.has(backend.name)) return;
    if (Date.now() - (this.lastProbeAt.get(backend.name) ?? 0) < this.settings.minBackoffMs) return;
    clearTimeout(this.timers.get(backend.name));
    this.timers.delete(backend.name);
    void this.probeOnce(backend).finally(() => this.schedule(backend));
  }

  private schedule(backend: GuardedBackend): void {
    if (this.stopped) return;
    const failures = this.failures.get(backend.name) ?? 0;
    const delay =
      failures === 0 ? this.settings.intervalMs : Math.min(this.settings.maxBackoffMs, this.settings.minBackoffMs * 2 ** (failures - 1));
    const timer = setTimeout(() => {
      void this.probeOnce(backend).finally(() => this.schedule(backend));
    }, delay);
    timer.unref();
    this.timers.set(backend.name, timer);
  }
}
