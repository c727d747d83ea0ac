/**
 * Escrow verification: proof that each backend ALONE can recover the data.
 *
 * Wrapping with several clouds is only worth it if any one of them can decrypt
 * without the others. The health probe shows that a backend wraps and unwraps its
 * own canary; it does not show that an envelope, as the plugin writes it, opens with
 * that backend's copy only. So, on a schedule and on demand, one run:
 *
 * 1. asks every backend for its current key version (this also makes a local key
 *    backend notice a removed or replaced key file);
 * 2. seals one fresh canary envelope with a copy from every backend (no quorum
 *    shortcut: a backend that cannot wrap has no copy and fails);
 * 3. opens it once per backend using only that backend's copy (through the same
 *    guarded unwrap, commitment check and payload authentication as a Decrypt);
 * 4. opens the reference canary, an envelope sealed by an earlier run, the same way:
 *    a backend whose key was replaced or whose old key versions are gone still
 *    wraps fresh canaries, but no longer decrypts what was written before.
 *
 * The reference is kept in memory, and in `canaryFile` when configured, so that it
 * survives restarts and `trousseau verify --config` shares it with the running
 * plugin. It is replaced only when every backend passed and it lacks one of them,
 * or when an operator renews it (after deliberately retiring an old key version).
 * A canary is random bytes, not a secret.
 */
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { open, readFile, rename } from 'node:fs/promises';
import type { Logger } from 'pino';
import { TrousseauError, errorCodeOf, type ErrorCode } from '../errors.ts';
import { parseEnvelope } from '../envelope/format.ts';
import type { Metrics } from '../observability/metrics.ts';
import type { GuardedBackend } from './guarded-backend.ts';
import type { WrapEngine } from './wrap-engine.ts';

export type EscrowStage = 'key_version' | 'wrap' | 'unwrap' | 'retained';

export interface EscrowSettings {
  enabled: boolean;
  intervalMs: number;
  initialDelayMs: number;
  timeoutMs: number;
  /** Absolute path of the reference canary file, if any. */
  canaryFile?: string | undefined;
}

/** One backend's escrow state, as status, /readyz and `trousseau verify` show it. */
export interface BackendEscrow {
  backend: string;
  /** Could this backend alone decrypt at the last run? undefined before the first run. */
  verified: boolean | undefined;
  /** Since when `verified` has had its current value (ms since the epoch). */
  since: number | undefined;
  checkedAt: number | undefined;
  /** Step that failed at the last run (undefined while verified). */
  stage: EscrowStage | undefined;
  /** Error class of the last failure, kept after recovery like a backend's lastError. */
  lastError: ErrorCode | undefined;
  lastErrorAt: number | undefined;
  /** Key version that wrapped the fresh canary. */
  keyVersion: string | undefined;
  /** The reference canary covers this backend and opened with its copy alone. */
  retained: boolean | undefined;
}

export interface EscrowReport {
  enabled: boolean;
  /** Every backend verified at the last run. */
  ok: boolean;
  lastRunAt: number | undefined;
  durationMs: number | undefined;
  referenceCreatedAt: number | undefined;
  backends: BackendEscrow[];
}

interface Reference {
  canary: Buffer;
  ciphertext: Buffer;
  annotations: Map<string, Uint8Array>;
  createdAt: number;
  /** Backends whose copy the reference holds. */
  copies: Set<string>;
}

interface ReferenceFile {
  kind: 'trousseau-escrow-canary';
  createdAt: string;
  canary: string;
  ciphertext: string;
  annotations: Record<string, string>;
}

type Outcome = { ok: true; keyVersion: string | undefined; retained: boolean } | { ok: false; stage: EscrowStage; code: ErrorCode; keyVersion: string | undefined };

/** Optional capability of a backend that knows when its credential expires (ms since the epoch). */
interface CredentialExpiry {
  credentialExpiresAt?: () => number | undefined;
}

export class EscrowVerifier {
  private readonly engine: WrapEngine;
  private readonly backends: readonly GuardedBackend[];
  private readonly settings: EscrowSettings;
  private readonly metrics: Metrics;
  private readonly logger: Logger;
  private readonly now: () => number;
  private readonly states: Map<string, BackendEscrow>;
  private readonly controller = new AbortController();
  private reference: Reference | undefined;
  private referenceLoaded = false;
  private running: Promise<EscrowReport> | undefined;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private lastRunAt: number | undefined;
  private durationMs: number | undefined;

  constructor(
    engine: WrapEngine,
    backends: readonly GuardedBackend[],
    settings: EscrowSettings,
    metrics: Metrics,
    logger: Logger,
    now: () => number = Date.now,
  ) {
    this.engine = engine;
    this.backends = backends;
    this.settings = settings;
    this.metrics = metrics;
    this.logger = logger;
    this.now = now;
    this.states = new Map(
      backends.map((b) => [
        b.name,
        { backend: b.name, verified: undefined, since: undefined, checkedAt: undefined, stage: undefined, lastError: undefined, lastErrorAt: undefined, keyVersion: undefined, retained: undefined },
      ]),
    );
  }

  /** Schedule verifications (when enabled). Timers are unref'd: they never keep the process alive. */
  start(): void {
    if (!this.settings.enabled || this.stopped) return;
    this.schedule(this.settings.initialDelayMs);
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
    this.controller.abort(new TrousseauError('SHUTTING_DOWN', 'plugin is shutting down'));
  }

  report(): EscrowReport {
    const backends = [...this.states.values()].map((s) => ({ ...s }));
    return {
      enabled: this.settings.enabled,
      ok: backends.length > 0 && backends.every((b) => b.verified === true),
      lastRunAt: this.lastRunAt,
      durationMs: this.durationMs,
      referenceCreatedAt: this.reference?.createdAt,
      backends,
    };
  }

  /**
   * Run one verification now (a run already in progress is shared). `renewReference`
   * drops the reference canary first, so this run's canary becomes the new one.
   */
  verify(options: { signal?: AbortSignal; renewReference?: boolean } = {}): Promise<EscrowReport> {
    if (this.running && !options.renewReference) return this.running;
    const previous = this.running ?? Promise.resolve();
    const run = previous.catch(() => undefined).then(() => this.runOnce(options));
    this.running = run;
    void run.finally(() => {
      if (this.running === run) this.running = undefined;
    }).catch(() => undefined);
    return run;
  }

  private schedule(delayMs: number): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => {
      this.verify().then(
        () => this.schedule(this.settings.intervalMs),
        (error: unknown) => {
          this.logger.warn({ code: errorCodeOf(error) }, 'escrow verification could not run');
          this.schedule(this.settings.intervalMs);
        },
      );
    }, delayMs);
    this.timer.unref();
  }

  private async runOnce(options: { signal?: AbortSignal; renewReference?: boolean }): Promise<EscrowReport> {
    const started = this.now();
    const signals = [this.controller.signal, AbortSignal.timeout(this.settings.timeoutMs)];
    if (options.signal) signals.push(options.signal);
    const signal = AbortSignal.any(signals);

    if (options.renewReference) {
      this.reference = undefined;
      this.referenceLoaded = true;
    } else {
      await this.loadReference();
    }

    const versionFailures = new Map<string, ErrorCode>();
    const versions = new Map<string, string>();
    await Promise.all(
      this.backends.map((b) =>
        b.currentKeyVersion(signal).then(
          (v) => versions.set(b.name, v),
          (error: unknown) => versionFailures.set(b.name, errorCodeOf(error)),
        ),
      ),
    );

    const canary = randomBytes(32);
    const { encrypted, failures } = await this.engine.encryptWithEvery(canary, 'v2', signal, 1);
    const copyVersions = new Map<string, string>();
    if (encrypted) {
      // The header records which key version made each copy: report that one.
      for (const name of encrypted.wrappedBy) {
        const b = this.backends.find((x) => x.name === name);
        if (b?.knownKeyVersion) copyVersions.set(name, b.knownKeyVersion);
      }
    }
    const reference = this.reference;

    const outcomes = await Promise.all(
      this.backends.map(async (b): Promise<Outcome> => {
        const keyVersion = copyVersions.get(b.name) ?? versions.get(b.name);
        const fail = (stage: EscrowStage, code: ErrorCode): Outcome => ({ ok: false, stage, code, keyVersion });
        const versionFailure = versionFailures.get(b.name);
        if (versionFailure) return fail('key_version', versionFailure);
        const wrapFailure = failures.get(b.name);
        if (wrapFailure || !encrypted) return fail('wrap', wrapFailure ?? 'INTERNAL');
        const fresh = await this.openAlone(b.name, encrypted.ciphertext, encrypted.annotations, canary, signal);
        if (fresh) return fail('unwrap', fresh);
        if (!reference || !this.covers(reference, b.name)) return { ok: true, keyVersion, retained: false };
        const old = await this.openAlone(b.name, reference.ciphertext, reference.annotations, reference.canary, signal);
        if (old) return fail('retained', old);
        return { ok: true, keyVersion, retained: true };
      }),
    );
    if (this.stopped) throw new TrousseauError('SHUTTING_DOWN', 'plugin is shutting down');

    const finished = this.now();
    this.backends.forEach((b, i) => this.record(b, outcomes[i]!, finished));
    const allOk = outcomes.every((o) => o.ok);
    const coversAll = (r: Reference) => this.backends.every((b) => this.covers(r, b.name));
    if (encrypted && (!reference || (allOk && !coversAll(reference) && encrypted.missing.length === 0))) {
      await this.adopt(makeReference(canary, encrypted.ciphertext, encrypted.annotations, finished));
    }
    this.lastRunAt = finished;
    this.durationMs = finished - started;
    this.metrics.escrowRuns.inc({ result: allOk ? 'pass' : 'fail' });
    this.metrics.escrowLastRun.set(finished / 1000);
    return this.report();
  }

  /** Decrypt with one backend's copy; undefined on success, else the error class. */
  private async openAlone(
    backend: string,
    ciphertext: Uint8Array,
    annotations: ReadonlyMap<string, Uint8Array>,
    expected: Buffer,
    signal: AbortSignal,
  ): Promise<ErrorCode | undefined> {
    try {
      const { plaintext } = await this.engine.decryptWithOnly(backend, ciphertext, annotations, signal);
      return plaintext.length === expected.length && timingSafeEqual(plaintext, expected) ? undefined : 'TAMPERED';
    } catch (error) {
      return errorCodeOf(error);
    }
  }

  private covers(reference: Reference, backend: string): boolean {
    return reference.copies.has(backend);
  }

  private record(backend: GuardedBackend, outcome: Outcome, at: number): void {
    const state = this.states.get(backend.name)!;
    const labels = { backend: backend.name };
    if (state.verified !== outcome.ok) {
      state.since = at;
      if (state.verified !== undefined || !outcome.ok) {
        const level = outcome.ok ? 'info' : 'warn';
        this.logger[level](
          { backend: backend.name, verified: outcome.ok, ...(outcome.ok ? {} : { stage: outcome.stage, code: outcome.code }) },
          outcome.ok ? 'escrow verification passes again: this backend alone decrypts' : 'escrow verification failed: this backend alone cannot decrypt',
        );
      }
    }
    state.verified = outcome.ok;
    state.checkedAt = at;
    state.keyVersion = outcome.keyVersion;
    if (outcome.ok) {
      state.stage = undefined;
      state.retained = outcome.retained;
      this.metrics.escrowLastVerified.set(labels, at / 1000);
    } else {
      state.stage = outcome.stage;
      state.retained = outcome.stage === 'retained' ? false : state.retained;
      state.lastError = outcome.code;
      state.lastErrorAt = at;
      this.metrics.escrowFailures.inc({ backend: backend.name, stage: outcome.stage, code: outcome.code });
    }
    this.metrics.escrowVerified.set(labels, outcome.ok ? 1 : 0);
    const expiresAt = (backend.backend as CredentialExpiry).credentialExpiresAt?.();
    if (typeof expiresAt === 'number' && Number.isFinite(expiresAt)) this.metrics.credentialExpiry.set(labels, expiresAt / 1000);
  }

  private async loadReference(): Promise<void> {
    if (this.referenceLoaded) return;
    this.referenceLoaded = true;
    const file = this.settings.canaryFile;
    if (!file) return;
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') {
        this.logger.warn({ file, code: (error as NodeJS.ErrnoException).code }, 'escrow canary file cannot be read; a new one will be written');
      }
      return;
    }
    try {
      const doc = JSON.parse(text) as ReferenceFile;
      if (doc.kind !== 'trousseau-escrow-canary' || typeof doc.ciphertext !== 'string' || typeof doc.canary !== 'string') throw new Error('not a canary file');
      this.reference = makeReference(
        Buffer.from(doc.canary, 'base64'),
        Buffer.from(doc.ciphertext, 'base64'),
        new Map(Object.entries(doc.annotations ?? {}).map(([k, v]) => [k, Buffer.from(v, 'base64')])),
        Date.parse(doc.createdAt) || 0,
      );
    } catch {
      this.logger.warn({ file }, 'escrow canary file is not a canary envelope; a new one will be written');
    }
  }

  private async adopt(reference: Reference): Promise<void> {
    this.reference = reference;
    const file = this.settings.canaryFile;
    if (!file) return;
    const doc: ReferenceFile = {
      kind: 'trousseau-escrow-canary',
      createdAt: new Date(reference.createdAt).toISOString(),
      canary: reference.canary.toString('base64'),
      ciphertext: reference.ciphertext.toString('base64'),
      annotations: Object.fromEntries([...reference.annotations].map(([k, v]) => [k, Buffer.from(v).toString('base64')])),
    };
    // Temporary file and rename: a reader (another plugin instance, `verify`) sees the old or the new file, never half.
    const temporary = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
    try {
      const handle = await open(temporary, 'wx', 0o600);
      try {
        await handle.writeFile(`${JSON.stringify(doc)}\n`);
      } finally {
        await handle.close();
      }
      await rename(temporary, file);
    } catch (error) {
      this.logger.warn({ file, code: (error as NodeJS.ErrnoException).code }, 'escrow canary file cannot be written; the reference lives in memory only');
    }
  }
}

/** A reference canary; which backends it covers is read from its (bounds-checked) header. */
function makeReference(canary: Buffer, ciphertext: Buffer, annotations: Map<string, Uint8Array>, createdAt: number): Reference {
  const copies = new Set(parseEnvelope(ciphertext, annotations).copies.filter((c) => c.wrapped !== undefined).map((c) => c.backendName));
  return { canary, ciphertext, annotations, createdAt, copies };
}
