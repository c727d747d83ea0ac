/**
 * A real Plugin behind a real KmsServer on a unix socket, whose local key backends sit
 * behind PooledBackend (a bounded connection pool, as an SDK has). Only defaults of
 * the configuration are used unless a test passes more, so the rig runs unchanged on
 * code that predates a setting.
 */
import path from 'node:path';
import type { ExecutionContext } from 'ava';
import { status } from '@grpc/grpc-js';
import { LocalKeyBackend, generateKeyFile } from '../../src/backends/local.ts';
import { call, clientsFor } from '../../src/cli/client.ts';
import { parseConfig } from '../../src/config/load.ts';
import { KmsServer } from '../../src/kms/server.ts';
import type * as T from '../../src/kms/types.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { Metrics } from '../../src/observability/metrics.ts';
import { Plugin } from '../../src/plugin.ts';
import { tempDir } from '../helpers/plugin-harness.ts';
import { PooledBackend } from './pooled-backend.ts';

export interface Rig {
  plugin: Plugin;
  metrics: Metrics;
  backends: PooledBackend[];
  clients: ReturnType<typeof clientsFor>;
  /** The plugin's socket, for raw HTTP/2 clients. */
  socketPath: string;
  status(): Promise<T.V2StatusResponse>;
  /** Admin status: key_id, partial, breakers. */
  admin(): Promise<{ keyId: string; partial: boolean; missing: string[]; backends: { name: string; breaker: string; probeOk?: boolean }[] }>;
  /** Sum of a counter's values, optionally only those whose labels match. */
  counter(name: string, labels?: Record<string, string>): Promise<number>;
}

export async function startRig(
  t: ExecutionContext,
  options: { names?: string[]; connections: number; serviceMs: number; timeoutMs?: number; config?: Record<string, unknown> },
): Promise<Rig> {
  const dir = await tempDir(t);
  const names = options.names ?? ['a', 'b', 'c'];
  const socketPath = path.join(dir, 'kms.sock');
  for (const name of names) await generateKeyFile(path.join(dir, `${name}.key`));
  const config = parseConfig(
    {
      socket: { path: socketPath },
      quorum: 2,
      backends: names.map((name) => ({ name, type: 'local', keyFile: path.join(dir, `${name}.key`), ...(options.timeoutMs ? { timeoutMs: options.timeoutMs } : {}) })),
      health: { probeIntervalMs: 3_600_000 },
      escrow: { enabled: false },
      ...options.config,
    },
    'test configuration',
  );
  const backends = names.map((name) => new PooledBackend(new LocalKeyBackend(name, path.join(dir, `${name}.key`)), options));
  const metrics = new Metrics();
  const logger = silentLogger();
  const plugin = new Plugin({ config, baseDir: dir, logger, metrics, backends });
  const server = new KmsServer(plugin, { path: socketPath, mode: config.socket.mode }, metrics, logger, {
    maxConcurrentStreams: config.connections.maxConcurrentStreams,
    idleTimeoutMs: config.connections.idleTimeoutMs,
    refusalHoldMs: config.connections.refusalHoldMs,
  });
  await plugin.start();
  await server.start();
  const clients = clientsFor(socketPath);
  t.teardown(async () => {
    for (const b of backends) b.open();
    clients.close();
    await server.stop(1000);
    await plugin.close();
  });
  for (const b of backends) b.resetCounts();
  return {
    plugin,
    metrics,
    backends,
    clients,
    socketPath,
    status: () => call<object, T.V2StatusResponse>(clients.v2, 'Status', {}),
    admin: async () => JSON.parse((await call<object, T.AdminStatusResponse>(clients.admin, 'Status', {})).status_json) as Awaited<ReturnType<Rig['admin']>>,
    async counter(name, labels = {}) {
      const metric = (await metrics.registry.getMetricsAsJSON()).find((m) => m.name === name);
      const values = (metric?.values ?? []) as { value: number; labels: Record<string, string | number> }[];
      return values.filter((v) => Object.entries(labels).every(([k, x]) => String(v.labels[k]) === x)).reduce((sum, v) => sum + v.value, 0);
    },
  };
}

export interface Outcome {
  code: status;
  details: string;
}

/** Settle a gRPC call into { code: 0 } or its status code and details. */
export function outcome(promise: Promise<unknown>): Promise<Outcome> {
  return promise.then(
    () => ({ code: status.OK, details: '' }),
    (error: { code: status; details: string }) => ({ code: error.code, details: error.details }),
  );
}
