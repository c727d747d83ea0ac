/**
 * The plugin: configured backends behind their guards, the wrap engine, the health
 * probe and the key_id, exposed to the gRPC layer as a KmsCore. This is the only
 * place (with cli/serve.ts) that wires the parts together.
 */
import type { Logger } from 'pino';
import type { KeyBackend } from './backends/backend.ts';
import type { BackendMetrics } from './backends/definition.ts';
import { definitionFor } from './backends/registry.ts';
import type { Config } from './config/schema.ts';
import path from 'node:path';
import { Admission } from './engine/admission.ts';
import { EscrowVerifier, type EscrowReport } from './engine/escrow-verifier.ts';
import { GuardedBackend } from './engine/guarded-backend.ts';
import { HealthProber } from './engine/health-probe.ts';
import { KeyIdTracker } from './engine/key-id.ts';
import { RejectedCopyTracker } from './engine/rejected-copies.ts';
import { WrapEngine } from './engine/wrap-engine.ts';
import { TrousseauError, errorCodeOf } from './errors.ts';
import type { Transport } from './envelope/placement.ts';
import type { KmsCore, KmsEncrypted, KmsStatus } from './kms/core.ts';
import type { Metrics } from './observability/metrics.ts';

/** Stands in for a backend whose construction failed, so the plugin still starts. */
class BrokenBackend implements KeyBackend {
  readonly name: string;
  readonly kind: string;
  private readonly reason: string;

  constructor(name: string, kind: string, reason: string) {
    this.name = name;
    this.kind = kind;
    this.reason = reason;
  }

  private failure(): TrousseauError {
    return new TrousseauError('BACKEND_UNAVAILABLE', `backend ${this.name} could not be set up: ${this.reason}`);
  }
  currentKeyVersion(): Promise<string> {
    return Promise.reject(this.failure());
  }
  wrap(): Promise<never> {
    return Promise.reject(this.failure());
  }
  unwrap(): Promise<never> {
    return Promise.reject(this.failure());
  }
  async close(): Promise<void> {}
}

export interface Readiness {
  ready: boolean;
  /** Short reasons while not ready; empty when ready. */
  reasons: string[];
}

export interface PluginOptions {
  config: Config;
  baseDir: string;
  logger: Logger;
  metrics: Metrics;
  /** Backends to use instead of building them from the config (tests, benchmarks). */
  backends?: KeyBackend[];
}

export class Plugin implements KmsCore {
  readonly backends: GuardedBackend[];
  readonly engine: WrapEngine;
  readonly prober: HealthProber;
  readonly escrow: EscrowVerifier;
  /** Every KMS Encrypt and Decrypt waits here (kms/services.ts); see engine/admission.ts. */
  readonly admission: Admission;
  private readonly keyIds: KeyIdTracker;
  private readonly rejectedCopies: RejectedCopyTracker;
  private readonly config: Config;
  private readonly logger: Logger;
  private readonly metrics: Metrics;
  private started = false;
  /** Extra conditions for readiness beyond the backends (the socket still being ours). */
  private readonly readinessChecks: (() => string | undefined)[] = [];

  /** The plugin with its backends built from the configuration (each loads its SDK: definition.ts). */
  static async create(options: PluginOptions): Promise<Plugin> {
    const backends = options.backends ?? (await Promise.all(options.config.backends.map((b) => buildBackend(b, options.baseDir, options.logger, options.metrics))));
    return new Plugin({ ...options, backends });
  }

  /** Built from `backends` as given; Plugin.create builds them from the configuration. */
  constructor(options: PluginOptions & { backends: KeyBackend[] }) {
    const { config, logger, metrics } = options;
    this.config = config;
    this.logger = logger;
    this.metrics = metrics;
    this.admission = new Admission('kms', config.overload.kms, { shed: (reason) => metrics.overloadShed.inc({ stage: 'kms', backend: '', reason }) }, { refuseLateAtFreeSlot: true });
    metrics.trackAdmission('kms', '', this.admission);
    this.backends = options.backends.map((backend) => {
      const settings = config.backends.find((b) => b.name === backend.name);
      return new GuardedBackend(
        backend,
        { timeoutMs: settings?.timeoutMs ?? 1000, priority: settings?.priority ?? 100, breaker: config.breaker, admission: config.overload.backend },
        metrics,
        logger,
      );
    });
    this.engine = new WrapEngine(
      this.backends,
      {
        quorum: config.quorum,
        encryptDeadlineMs: config.encrypt.deadlineMs,
        stragglerGraceMs: config.encrypt.stragglerGraceMs,
        stragglerLatencyFactor: config.encrypt.stragglerLatencyFactor,
        decryptDeadlineMs: config.decrypt.deadlineMs,
        hedging: config.decrypt.hedging,
      },
      metrics,
      logger,
    );
    this.keyIds = new KeyIdTracker(this.backends, config.quorum, config.health.recoverAfterMs, metrics, logger);
    this.rejectedCopies = new RejectedCopyTracker(logger);
    this.engine.onRejectedCopy = (backend, reason) => this.rejectedCopies.record(backend, reason);
    this.prober = new HealthProber(
      this.backends,
      { intervalMs: config.health.probeIntervalMs, minBackoffMs: config.health.minBackoffMs, maxBackoffMs: config.health.maxBackoffMs },
      logger,
      // Recompute after every background probe so key_id changes are logged and counted when they happen.
      () => {
        if (this.started) this.keyIds.current();
      },
    );
    for (const backend of this.backends) backend.onSuspect = () => this.prober.probeSoon(backend);
    const { canaryFile, ...escrow } = config.escrow;
    this.escrow = new EscrowVerifier(
      this.engine,
      this.backends,
      { ...escrow, canaryFile: canaryFile === undefined ? undefined : path.resolve(options.baseDir, canaryFile) },
      metrics,
      logger,
    );
    metrics.configuredBackends.set(this.backends.length);
    metrics.quorum.set(config.quorum);
  }

  /** Probe every backend once (so the first Status already knows health and key versions), then keep probing. */
  async start(): Promise<void> {
    const results = await this.prober.probeAll();
    const up = results.filter((r) => r.ok).map((r) => r.backend);
    const down = results.filter((r) => !r.ok).map((r) => `${r.backend} (${errorCodeOf(r.error)})`);
    this.logger.info({ up, down, quorum: this.config.quorum }, down.length ? 'started with backends unavailable' : 'all backends healthy');
    this.started = true;
    if (!this.keyIds.current()) this.logger.warn({ up, quorum: this.config.quorum }, 'below quorum: no key_id announced until an Encrypt can succeed');
    this.prober.start();
    this.escrow.start();
  }

  /** Prove once, now, that each backend alone decrypts (`trousseau verify`, the admin Verify call). */
  verifyEscrow(signal?: AbortSignal, renewReference = false): Promise<EscrowReport> {
    return this.escrow.verify({ signal, renewReference });
  }

  /**
   * KMS v2 Status (docs/design/key-id-and-health.md, "Health"):
   * - no backend usable: a gRPC error, so the apiserver stops its rotation logic;
   * - below quorum since this process started: a gRPC error too, because there is no
   *   key_id yet that the apiserver could keep (see key-id.ts);
   * - below quorum: healthz names the shortfall, with the frozen key_id. The apiserver
   *   reports the plugin unhealthy but, the key_id being its current one, keeps writing
   *   with its current DEK instead of calling an Encrypt that would fail;
   * - otherwise healthz "ok".
   */
  status(): KmsStatus {
    const usable = this.backends.filter((b) => b.usable);
    if (usable.length === 0) {
      // A gRPC error, not healthz != "ok": only an error stops the apiserver's rotation logic.
      const detail = this.backends.map((b) => `${b.name}: ${b.health().lastError ?? 'unavailable'}`).join(', ');
      throw new TrousseauError('NO_COPY_UNWRAPPED', `no key-management backend is reachable (${detail})`);
    }
    const state = this.keyIds.current();
    if (state === undefined) {
      throw new TrousseauError('QUORUM_NOT_MET', `${this.shortfall(usable.length)}; no key_id is announced until an Encrypt can succeed`);
    }
    return { healthz: usable.length < this.config.quorum ? this.shortfall(usable.length) : 'ok', keyId: state.keyId };
  }

  /** "below quorum: 1 of 2 required backends usable (down: b, c, d)": the apiserver logs it; backend names are the operator's. */
  private shortfall(usable: number): string {
    const down = this.backends.filter((b) => !b.usable).map((b) => b.name);
    return `below quorum: ${usable} of ${this.config.quorum} required backends usable (down: ${down.join(', ')})`;
  }

  async encrypt(plaintext: Buffer, transport: Transport, signal: AbortSignal, uid?: string): Promise<KmsEncrypted> {
    const result = await this.engine.encrypt(plaintext, transport, signal);
    if (result.missing.length > 0) this.logger.warn({ uid, missing: result.missing, wrappedBy: result.wrappedBy }, 'encrypt reached quorum without every backend');
    // Read the key_id after the wrap: a missed backend has just moved it to a partial
    // one, and the envelope must never carry a key_id that claims more copies than it has.
    return { ciphertext: result.ciphertext, annotations: result.annotations, keyId: this.keyIds.forEnvelope(result.wrappedBy).keyId };
  }

  async decrypt(ciphertext: Buffer, annotations: ReadonlyMap<string, Uint8Array>, signal: AbortSignal, uid?: string): Promise<Buffer> {
    const result = await this.engine.decrypt(ciphertext, annotations, signal);
    this.logger.debug({ uid, backend: result.unwrappedBy }, 'decrypted');
    return result.plaintext;
  }

  /**
   * Add a condition the plugin must meet to be ready: `check` returns a short reason
   * (no identifiers, no values: /readyz shows it to any local user) while unmet.
   */
  addReadinessCheck(check: () => string | undefined): void {
    this.readinessChecks.push(check);
  }

  /** Ready or not, with the reasons why not. */
  readiness(): Readiness {
    const reasons: string[] = [];
    const usable = this.backends.filter((b) => b.usable).length;
    if (usable === 0) reasons.push('no key-management backend is reachable');
    else if (usable < this.config.quorum) reasons.push(`below quorum: ${usable} of ${this.config.quorum} required backends usable; Encrypt fails`);
    for (const check of this.readinessChecks) {
      const reason = check();
      if (reason !== undefined) reasons.push(reason);
    }
    return { ready: reasons.length === 0, reasons };
  }

  get ready(): boolean {
    return this.readiness().ready;
  }

  /** The full status for `trousseau status` (the admin socket only: it names keys and error classes). */
  describe() {
    const keyId = this.keyIds.current();
    const { ready, reasons } = this.readiness();
    return {
      /** Undefined while none is announced (below quorum since start). */
      keyId: keyId?.keyId,
      partial: keyId?.partial ?? false,
      /** Every backend whose copy new envelopes may lack now (never frozen). */
      missing: this.keyIds.lacking(),
      quorum: this.config.quorum,
      usable: this.backends.filter((b) => b.usable).length,
      healthy: ready,
      reasons,
      backends: this.backends.map((b) => b.health()),
      rejectedCopies: this.rejectedCopies.report(),
      escrow: this.escrow.report(),
    };
  }

  async close(): Promise<void> {
    this.escrow.stop();
    this.prober.stop();
    await Promise.allSettled(this.backends.map((b) => b.close()));
  }
}

async function buildBackend(config: Config['backends'][number], baseDir: string, logger: Logger, metrics: Metrics): Promise<KeyBackend> {
  const definition = definitionFor(config.type);
  const backendMetrics: BackendMetrics = {
    keysPerRequest: (operation, keys) => metrics.backendKeysPerRequest.observe({ backend: config.name, operation }, keys),
  };
  try {
    if (!definition) throw new Error(`unknown backend type ${config.type}`);
    return await definition.create(config, { logger: logger.child({ backend: config.name }), baseDir, metrics: backendMetrics });
  } catch (error) {
    const reason = error instanceof TrousseauError ? error.message : 'construction failed';
    // Our messages name paths and reasons, never values, so the reason is logged too (a refused credential file says which and why).
    logger.error({ backend: config.name, code: errorCodeOf(error), reason }, 'backend could not be set up; it stays unavailable');
    return new BrokenBackend(config.name, config.type, reason);
  }
}
