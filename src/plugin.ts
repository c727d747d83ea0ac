/**
 * The plugin: configured backends behind their guards, the wrap engine, the health
 * probe and the key_id, exposed to the gRPC layer as a KmsCore. This is the only
 * place (with cli/serve.ts) that wires the parts together.
 */
import type { Logger } from 'pino';
import type { KeyBackend } from './backends/backend.ts';
import { definitionFor } from './backends/registry.ts';
import type { Config } from './config/schema.ts';
import path from 'node:path';
import { Admission } from './engine/admission.ts';
import { EscrowVerifier, type EscrowReport } from './engine/escrow-verifier.ts';
import { GuardedBackend } from './engine/guarded-backend.ts';
import { HealthProber } from './engine/health-probe.ts';
import { KeyIdTracker } from './engine/key-id.ts';
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
  private readonly config: Config;
  private readonly logger: Logger;
  private readonly metrics: Metrics;
  private started = false;
  /** Extra conditions for readiness beyond the backends (the socket still being ours). */
  private readonly readinessChecks: (() => string | undefined)[] = [];

  constructor(options: PluginOptions) {
    const { config, logger, metrics } = options;
    this.config = config;
    this.logger = logger;
    this.metrics = metrics;
    this.admission = new Admission('kms', config.overload.kms, { shed: (reason) => metrics.overloadShed.inc({ stage: 'kms', backend: '', reason }) });
    metrics.trackAdmission('kms', '', this.admission);
    const raw = options.backends ?? config.backends.map((b) => buildBackend(b, options.baseDir, logger));
    this.backends = raw.map((backend) => {
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
        decryptDeadlineMs: config.decrypt.deadlineMs,
        hedging: config.decrypt.hedging,
      },
      metrics,
      logger,
    );
    this.keyIds = new KeyIdTracker(this.backends, config.quorum, config.health.recoverAfterMs, metrics, logger);
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
    this.keyIds.current();
    this.prober.start();
    this.escrow.start();
  }

  /** Prove once, now, that each backend alone decrypts (`trousseau verify`, the admin Verify call). */
  verifyEscrow(signal?: AbortSignal, renewReference = false): Promise<EscrowReport> {
    return this.escrow.verify({ signal, renewReference });
  }

  status(): KmsStatus {
    const usable = this.backends.filter((b) => b.usable);
    if (usable.length === 0) {
      // A gRPC error, not healthz != "ok": only an error stops the apiserver's rotation logic.
      const detail = this.backends.map((b) => `${b.name}: ${b.health().lastError ?? 'unavailable'}`).join(', ');
      throw new TrousseauError('NO_COPY_UNWRAPPED', `no key-management backend is reachable (${detail})`);
    }
    return { healthz: 'ok', keyId: this.keyIds.current().keyId };
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
    if (!this.backends.some((b) => b.usable)) reasons.push('no key-management backend is reachable');
    for (const check of this.readinessChecks) {
      const reason = check();
      if (reason !== undefined) reasons.push(reason);
    }
    return { ready: reasons.length === 0, reasons };
  }

  get ready(): boolean {
    return this.readiness().ready;
  }

  describe() {
    const keyId = this.keyIds.current();
    return {
      keyId: keyId.keyId,
      partial: keyId.partial,
      missing: keyId.missing,
      quorum: this.config.quorum,
      healthy: this.ready,
      backends: this.backends.map((b) => b.health()),
      escrow: this.escrow.report(),
    };
  }

  async close(): Promise<void> {
    this.escrow.stop();
    this.prober.stop();
    await Promise.allSettled(this.backends.map((b) => b.close()));
  }
}

function buildBackend(config: Config['backends'][number], baseDir: string, logger: Logger): KeyBackend {
  const definition = definitionFor(config.type);
  try {
    if (!definition) throw new Error(`unknown backend type ${config.type}`);
    return definition.create(config, { logger: logger.child({ backend: config.name }), baseDir });
  } catch (error) {
    const reason = error instanceof TrousseauError ? error.message : 'construction failed';
    logger.error({ backend: config.name, code: errorCodeOf(error) }, 'backend could not be set up; it stays unavailable');
    return new BrokenBackend(config.name, config.type, reason);
  }
}
