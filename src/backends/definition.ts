/**
 * What a backend file exports besides its KeyBackend class: its config schema and a
 * factory. Kept apart from registry.ts so backend files never import the registry.
 *
 * The registry imports every backend file (the configuration schema lists every
 * type), so a backend file must not import its SDK at the top: only `import type`
 * there, and `await import()` in `create`. A plugin then loads only the SDKs of the
 * backend types it is configured with; the Vault, AWS and Azure SDKs together cost
 * ~90 MiB of RSS and most of the start-up time (docs/performance.md, "Memory and
 * start-up"). test/reliability/lazy-sdk.test.ts checks it.
 */
import { z } from 'zod';
import type { Logger } from 'pino';
import type { KeyBackend } from './backend.ts';

/** What every backend's config block has, whatever its type. */
export const commonBackendFields = {
  /** DNS label naming this backend instance; recorded in envelopes, so never rename a backend holding data. */
  name: z
    .string()
    .regex(/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/, 'must be a DNS label: lowercase letters, digits and "-", at most 63 characters'),
  /** Decrypt tries backends with a lower number first (default 100). */
  priority: z.number().int().min(0).max(1000).default(100),
  /** Per-call timeout in milliseconds (default 1000); must stay under the apiserver's 3 s deadline. */
  timeoutMs: z.number().int().min(10).max(2900).default(1000),
};

export interface BackendDependencies {
  logger: Logger;
  /** Folder relative paths in the configuration are resolved against. */
  baseDir: string;
  /** Where the backend reports what only it can see; absent in tools and tests that build a backend alone. */
  metrics?: BackendMetrics;
}

/**
 * Measurements only a backend can make. The engine times and counts every call around
 * the backend (engine/guarded-backend.ts); what it cannot see is how the backend sends
 * them, e.g. several data keys in one server request.
 */
export interface BackendMetrics {
  /** One request to the server carried `keys` data keys (a backend that batches: backends/coalescer.ts). */
  keysPerRequest(operation: 'wrap' | 'unwrap', keys: number): void;
}

export interface BackendDefinition<Schema extends z.ZodObject = z.ZodObject> {
  /** Value of `type:` in the configuration. */
  type: string;
  /** Zod schema of the backend's config block, including commonBackendFields and a `type` literal. */
  configSchema: Schema;
  /** Loads the backend's SDK (once per process) and builds the backend; rejects when it cannot be set up. */
  create(config: z.output<Schema>, deps: BackendDependencies): Promise<KeyBackend>;
}

