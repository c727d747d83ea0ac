/**
 * Prometheus metrics. Every metric lives in a registry owned by one plugin instance
 * (tests run several). Labels carry only bounded values: backend names from the
 * configuration, fixed operation and outcome words, gRPC code names, error classes.
 * Never error text, key ids, key versions, key names, ARNs or account ids, or anything
 * from a request: /metrics is readable by every local user, while those details stay
 * behind the 0600 admin socket (test/security/readyz-metrics-exposure.test.ts checks).
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { buildInfo } from '../build-info.ts';

export type BackendOperation = 'wrap' | 'unwrap' | 'key_version';
export type BackendOutcome = 'success' | 'rejected' | 'unavailable' | 'timeout' | 'breaker_open' | 'cancelled' | 'invalid_result' | 'shed';

export type AdmissionStage = 'kms' | 'backend';

/** What the admission gauges read at scrape time (engine/admission.ts). */
export interface AdmissionSource {
  readonly inFlight: number;
  readonly queued: number;
}

export class Metrics {
  readonly registry = new Registry();

  readonly backendRequests = new Counter({
    name: 'trousseau_backend_requests_total',
    help: 'Calls to key-management backends by operation and outcome.',
    labelNames: ['backend', 'operation', 'outcome'] as const,
    registers: [this.registry],
  });

  readonly backendLatency = new Histogram({
    name: 'trousseau_backend_request_duration_seconds',
    help: 'Latency of backend calls that reached the backend.',
    labelNames: ['backend', 'operation'] as const,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
    registers: [this.registry],
  });

  readonly breakerState = new Gauge({
    name: 'trousseau_backend_breaker_state',
    help: 'Circuit breaker state per backend: 0 closed, 1 half-open, 2 open.',
    labelNames: ['backend'] as const,
    registers: [this.registry],
  });

  readonly backendUp = new Gauge({
    name: 'trousseau_backend_up',
    help: '1 when the backend\'s last health probe (wrap and unwrap of a canary) succeeded.',
    labelNames: ['backend'] as const,
    registers: [this.registry],
  });

  readonly lastSuccess = new Gauge({
    name: 'trousseau_backend_last_success_timestamp_seconds',
    help: 'Unix time of the backend\'s last successful call.',
    labelNames: ['backend'] as const,
    registers: [this.registry],
  });

  readonly kmsRequests = new Counter({
    name: 'trousseau_kms_requests_total',
    help: 'KMS gRPC calls by API, method and gRPC status code.',
    labelNames: ['api', 'method', 'code'] as const,
    registers: [this.registry],
  });

  readonly kmsLatency = new Histogram({
    name: 'trousseau_kms_request_duration_seconds',
    help: 'Latency of KMS gRPC calls as the apiserver sees them.',
    labelNames: ['api', 'method'] as const,
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
    registers: [this.registry],
  });

  readonly encryptWraps = new Histogram({
    name: 'trousseau_encrypt_wrapped_copies',
    help: 'Wrapped copies written per successful Encrypt.',
    buckets: [1, 2, 3, 4, 5, 6, 8, 12, 16],
    registers: [this.registry],
  });

  readonly underWrapped = new Counter({
    name: 'trousseau_encrypt_under_wrapped_total',
    help: 'Successful Encrypts that reached quorum but lack a copy from at least one configured backend.',
    registers: [this.registry],
  });

  readonly configuredBackends = new Gauge({
    name: 'trousseau_configured_backends',
    help: 'Backends in the configuration.',
    registers: [this.registry],
  });

  readonly quorum = new Gauge({
    name: 'trousseau_encrypt_quorum',
    help: 'Wrapped copies an Encrypt needs to succeed.',
    registers: [this.registry],
  });

  readonly decryptFailovers = new Counter({
    name: 'trousseau_decrypt_failovers_total',
    help: 'Decrypts that needed another copy after the first choice failed.',
    registers: [this.registry],
  });

  readonly decryptHedges = new Counter({
    name: 'trousseau_decrypt_hedges_total',
    help: 'Speculative unwraps started because the copy being tried was slow.',
    registers: [this.registry],
  });

  readonly decryptHedgesWon = new Counter({
    name: 'trousseau_decrypt_hedges_won_total',
    help: 'Speculative unwraps that answered first.',
    registers: [this.registry],
  });

  readonly commitmentMismatches = new Counter({
    name: 'trousseau_decrypt_commitment_mismatches_total',
    help: 'Unwrapped keys that failed the envelope\'s key commitment (tampering).',
    labelNames: ['backend'] as const,
    registers: [this.registry],
  });

  readonly keyIdChanges = new Counter({
    name: 'trousseau_key_id_changes_total',
    help: 'Changes of the key_id reported in Status.',
    registers: [this.registry],
  });

  readonly keyIdDegraded = new Gauge({
    name: 'trousseau_key_id_partial',
    help: '1 while the key_id names a partial backend set (new envelopes lack some backends).',
    registers: [this.registry],
  });

  readonly envelopesRead = new Counter({
    name: 'trousseau_envelopes_decrypted_total',
    help: 'Envelopes decrypted, by envelope format version.',
    labelNames: ['format_version'] as const,
    registers: [this.registry],
  });

  readonly escrowVerified = new Gauge({
    name: 'trousseau_backend_escrow_verified',
    help: '1 when the last escrow verification proved this backend alone decrypts a canary envelope, 0 when it did not.',
    labelNames: ['backend'] as const,
    registers: [this.registry],
  });

  readonly escrowLastVerified = new Gauge({
    name: 'trousseau_backend_escrow_last_verified_timestamp_seconds',
    help: 'Unix time of the last escrow verification this backend passed.',
    labelNames: ['backend'] as const,
    registers: [this.registry],
  });

  readonly escrowFailures = new Counter({
    name: 'trousseau_backend_escrow_failures_total',
    help: 'Failed escrow verifications per backend, by the step that failed and the error class.',
    labelNames: ['backend', 'stage', 'code'] as const,
    registers: [this.registry],
  });

  readonly escrowRuns = new Counter({
    name: 'trousseau_escrow_verifications_total',
    help: 'Escrow verification runs; result "pass" when every backend alone could decrypt.',
    labelNames: ['result'] as const,
    registers: [this.registry],
  });

  readonly escrowLastRun = new Gauge({
    name: 'trousseau_escrow_last_run_timestamp_seconds',
    help: 'Unix time the last escrow verification finished.',
    registers: [this.registry],
  });

  /** Observed by backends that send several data keys in one request (the Vault backend's batches). */
  readonly backendKeysPerRequest = new Histogram({
    name: 'trousseau_backend_keys_per_request',
    help: 'Data keys carried by each request to a backend that batches them (1 = not batched), by operation.',
    labelNames: ['backend', 'operation'] as const,
    buckets: [1, 2, 4, 8, 16, 32, 64, 128, 256],
    registers: [this.registry],
  });

  readonly credentialExpiry = new Gauge({
    name: 'trousseau_backend_credential_expiry_timestamp_seconds',
    help: 'Unix time the backend\'s current token or credential expires, for backends that know it.',
    labelNames: ['backend'] as const,
    registers: [this.registry],
  });

  /**
   * Admission queues: stage "kms" (every Encrypt and Decrypt; backend label empty) or
   * "backend" (calls to one backend, by its configured name).
   */
  private readonly admissionSources = new Map<string, { stage: AdmissionStage; backend: string; source: AdmissionSource }>();

  readonly overloadShed = new Counter({
    name: 'trousseau_overload_shed_total',
    help: 'Calls refused by admission control before any work, by stage (kms, backend), backend and reason (queue_full, deadline, wait_timeout).',
    labelNames: ['stage', 'backend', 'reason'] as const,
    registers: [this.registry],
  });

  readonly admissionQueued = new Gauge({
    name: 'trousseau_admission_queued',
    help: 'Calls waiting for an admission slot, by stage (kms, backend) and backend.',
    labelNames: ['stage', 'backend'] as const,
    registers: [this.registry],
    collect: () => this.readAdmission('queued'),
  });

  readonly admissionInFlight = new Gauge({
    name: 'trousseau_admission_in_flight',
    help: 'Calls holding an admission slot, by stage (kms, backend) and backend.',
    labelNames: ['stage', 'backend'] as const,
    registers: [this.registry],
    collect: () => this.readAdmission('inFlight'),
  });

  /** Report `source`'s depths at every scrape (nothing is recorded per call). */
  trackAdmission(stage: AdmissionStage, backend: string, source: AdmissionSource): void {
    this.admissionSources.set(`${stage}/${backend}`, { stage, backend, source });
  }

  private readAdmission(field: 'queued' | 'inFlight'): void {
    const gauge = field === 'queued' ? this.admissionQueued : this.admissionInFlight;
    for (const { stage, backend, source } of this.admissionSources.values()) gauge.set({ stage, backend }, source[field]);
  }

  /** 1, labelled with the running build (the Prometheus convention for build facts). */
  readonly buildInfo = new Gauge({
    name: 'trousseau_build_info',
    help: 'Always 1; the labels name the running build (version and commit).',
    labelNames: ['version', 'commit'] as const,
    registers: [this.registry],
  });

  constructor(options: { processMetrics?: boolean } = {}) {
    if (options.processMetrics) collectDefaultMetrics({ register: this.registry, prefix: 'trousseau_' });
    const build = buildInfo();
    this.buildInfo.set({ version: build.version, commit: build.commit }, 1);
  }
}
