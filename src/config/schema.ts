/**
 * The configuration file's schema. Every field has a default where one is safe; all
 * durations are milliseconds. `trousseau schema` exports it as JSON Schema for editors.
 */
import { z } from 'zod';
import { backendDefinitions } from '../backends/registry.ts';

const backendSchemas = backendDefinitions.map((d) => d.configSchema);
const backendSchema = z.discriminatedUnion('type', backendSchemas as unknown as [(typeof backendSchemas)[number], ...(typeof backendSchemas)[number][]]);

const octalMode = z
  .union([z.string().regex(/^0?[0-7]{3}$/, 'must be an octal file mode such as "0600"'), z.number().int()])
  .transform((v) => (typeof v === 'number' ? v : parseInt(v, 8)))
  .refine((v) => (v & 0o007) === 0, 'must not give access to others (last octal digit 0)');

/** One admission limit (engine/admission.ts); defaults differ between the KMS layer and a backend. */
const admissionLimits = (defaults: { maxInFlight: number; maxQueued: number; maxWaitMs: number }) =>
  z
    .object({
      /** Calls running at once. */
      maxInFlight: z.number().int().min(1).max(10000).default(defaults.maxInFlight),
      /** Calls waiting for a slot; beyond it a call is refused at once (UNAVAILABLE, "overloaded"). */
      maxQueued: z.number().int().min(0).max(100000).default(defaults.maxQueued),
      /** Longest a call waits for a slot. */
      maxWaitMs: z.number().int().min(1).max(2900).default(defaults.maxWaitMs),
    })
    .strict()
    .prefault({});

const hostPort = z.string().regex(/^(\[[0-9a-fA-F:]+\]|[a-zA-Z0-9.-]+):\d{1,5}$/, 'must be host:port');

export const configSchema = z
  .object({
    socket: z
      .object({
        /** Unix socket the apiserver dials (unix://<path> in the EncryptionConfiguration). */
        path: z.string().min(1).default('/var/run/trousseau/kms.sock'),
        /** Socket file mode (default "0600"). Use "0660" with `group` to share it. */
        mode: octalMode.default(0o600),
        /** Group owning the socket (name or gid). */
        group: z.string().min(1).optional(),
      })
      .strict()
      .prefault({}),
    /** Copies an Encrypt needs before it succeeds (1..number of backends). */
    quorum: z.number().int().min(1).max(16),
    backends: z
      .array(backendSchema)
      .min(1)
      .max(16)
      .refine((list) => new Set(list.map((b) => b.name)).size === list.length, 'backend names must be unique'),
    encrypt: z
      .object({
        /** Deadline of a whole Encrypt (default 2000, under the apiserver's 3 s). */
        deadlineMs: z.number().int().min(50).max(2900).default(2000),
        /** Wait for slower backends after quorum is reached (default 150). */
        stragglerGraceMs: z.number().int().min(0).max(2000).default(150),
        /**
         * A backend still wrapping after quorum gets at least this many times its own
         * recent p95 latency (successful calls) before it is left out, so a healthy
         * but distant backend (an Azure copy is two calls) keeps its copy in every
         * envelope; 0 turns it off (default 2). Never past the Encrypt deadline.
         */
        stragglerLatencyFactor: z.number().min(0).max(10).default(2),
      })
      .strict()
      .prefault({}),
    decrypt: z
      .object({
        /** Deadline of a whole Decrypt (default 2500, under the apiserver's 3 s). */
        deadlineMs: z.number().int().min(50).max(2900).default(2500),
        hedging: z
          .object({
            enabled: z.boolean().default(true),
            /** Lower bound of the adaptive hedge delay (default 20). */
            minDelayMs: z.number().int().min(1).max(2000).default(20),
            /** Upper bound of the adaptive hedge delay (default 500). */
            maxDelayMs: z.number().int().min(1).max(2500).default(500),
            /** Share of Decrypts that may hedge in steady state (default 0.1). */
            budgetRatio: z.number().min(0).max(1).default(0.1),
            /** Hedges allowed in a burst (default 10). */
            budgetBurst: z.number().int().min(0).max(1000).default(10),
          })
          .strict()
          .prefault({}),
      })
      .strict()
      .prefault({}),
    /**
     * Admission control: bounded in-flight work with a bounded wait, refused early and
     * explicitly beyond it (docs/design/overload.md).
     */
    overload: z
      .object({
        /**
         * All KMS Encrypt and Decrypt calls together (defaults 32 / 192 / 1000). An
         * Encrypt asks every backend at once: keep kms.maxInFlight at or below
         * backend.maxInFlight, so Encrypts alone never wait for a backend slot.
         */
        kms: admissionLimits({ maxInFlight: 32, maxQueued: 192, maxWaitMs: 1000 }),
        /** Calls to each backend (defaults 32 / 256 / 1000); keep maxInFlight below an SDK's connection pool (AWS: 50). */
        backend: admissionLimits({ maxInFlight: 32, maxQueued: 256, maxWaitMs: 1000 }),
      })
      .strict()
      .prefault({}),
    breaker: z
      .object({
        errorThresholdPercentage: z.number().min(1).max(100).default(50),
        volumeThreshold: z.number().int().min(1).max(1000).default(5),
        rollingWindowMs: z.number().int().min(1000).max(600000).default(10000),
        resetTimeoutMs: z.number().int().min(100).max(600000).default(5000),
      })
      .strict()
      .prefault({}),
    health: z
      .object({
        /** Probe interval while healthy (default 10000). Also how soon a key rotation is seen. */
        probeIntervalMs: z.number().int().min(100).max(3600000).default(10000),
        /** First retry after a failed probe; doubles up to maxBackoffMs (defaults 1000 / 30000). */
        minBackoffMs: z.number().int().min(50).max(600000).default(1000),
        maxBackoffMs: z.number().int().min(50).max(3600000).default(30000),
        /** A recovered backend must stay healthy this long before the key_id returns to full (default 60000). */
        recoverAfterMs: z.number().int().min(0).max(86400000).default(60000),
      })
      .strict()
      .prefault({}),
    escrow: z
      .object({
        /** Prove on a schedule that each backend alone decrypts a canary envelope (default true). */
        enabled: z.boolean().default(true),
        /** Time between verifications (default 300000). */
        intervalMs: z.number().int().min(1000).max(86400000).default(300000),
        /** First verification after start (default 30000). */
        initialDelayMs: z.number().int().min(0).max(86400000).default(30000),
        /** Deadline of one whole verification (default 10000). */
        timeoutMs: z.number().int().min(100).max(120000).default(10000),
        /**
         * Where the reference canary envelope is kept across restarts and shared with
         * `trousseau verify --config`; relative to the configuration file. Without it
         * the reference lives in memory only.
         */
        canaryFile: z.string().min(1).optional(),
      })
      .strict()
      .prefault({}),
    http: z
      .object({
        /** host:port for /metrics, /healthz, /readyz. Loopback by default; unset disables it. */
        listen: hostPort.optional(),
        /**
         * A second listener for Prometheus off the node: /metrics only, over TLS, for a
         * caller with the bearer token (docs/operations/monitoring.md). Unset: none.
         */
        scrape: z
          .object({
            /** host:port, for example the node's address or 0.0.0.0 with hostNetwork. */
            listen: hostPort,
            /** PEM certificate chain the listener presents. */
            certFile: z.string().min(1),
            /** PEM private key (mode 0600, owned by the plugin's user or root). */
            keyFile: z.string().min(1),
            /** File with the one token a scraper must send as `Authorization: Bearer` (mode 0600). */
            bearerTokenFile: z.string().min(1),
          })
          .strict()
          .optional(),
      })
      .strict()
      .prefault({}),
    /** Connection limits of the KMS socket and the HTTP listener (docs/security.md says why). */
    connections: z
      .object({
        /** Calls open at once on one gRPC connection (default 256: above the admission bound, so a burst is refused by the plugin, not queued in the client; not above the 256 requests that may be arriving at once). */
        maxConcurrentStreams: z.number().int().min(1).max(10000).default(256),
        /**
         * A KMS call refused as overloaded holds its stream this long before the refusal
         * is answered (default 200; 0 answers at once), so that a burst on one connection
         * cannot keep the plugin refusing at CPU speed (docs/design/overload.md).
         */
        refusalHoldMs: z.number().int().min(0).max(1000).default(200),
        /** Close a gRPC connection with no call open for this long (default 300000). */
        idleTimeoutMs: z.number().int().min(1000).max(86_400_000).default(300_000),
        /** Most HTTP connections open at once (default 32; never more than 1/16 of the descriptor limit). */
        httpMaxConnections: z.number().int().min(1).max(1024).default(32),
      })
      .strict()
      .prefault({}),
    log: z
      .object({ level: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info') })
      .strict()
      .prefault({}),
    shutdown: z
      .object({
        /** How long SIGTERM waits for in-flight calls (default 5000). */
        drainTimeoutMs: z.number().int().min(0).max(60000).default(5000),
      })
      .strict()
      .prefault({}),
  })
  .strict()
  .refine((c) => c.quorum <= c.backends.length, { message: 'quorum cannot exceed the number of backends', path: ['quorum'] })
  .refine((c) => c.decrypt.hedging.minDelayMs <= c.decrypt.hedging.maxDelayMs, {
    message: 'minDelayMs must not exceed maxDelayMs',
    path: ['decrypt', 'hedging', 'minDelayMs'],
  });

export type Config = z.output<typeof configSchema>;
export type ConfigInput = z.input<typeof configSchema>;
