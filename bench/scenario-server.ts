/**
 * The plugin side of bench/scenarios.ts, in its own process as beside a real
 * apiserver: a real Plugin and KmsServer on a unix socket, with local key backends
 * behind LatencyBackend wrappers. Driven over the Node IPC channel: set a backend's
 * latency profile, read and reset its call counts, read the breaker transitions.
 *
 *   spawned by bench/scenarios.ts; not meant to be run by hand
 */
import path from 'node:path';
import { LocalKeyBackend, generateKeyFile } from '../src/backends/local.ts';
import { parseConfig } from '../src/config/load.ts';
import { KmsServer } from '../src/kms/server.ts';
import { createLogger } from '../src/observability/logger.ts';
import { Metrics } from '../src/observability/metrics.ts';
import { Plugin } from '../src/plugin.ts';
import { LatencyBackend, type LatencyProfile } from './latency-backend.ts';

export interface ServerSpec {
  dir: string;
  socket: string;
  quorum: number;
  backends: { name: string; priority?: number; timeoutMs?: number; profile?: LatencyProfile }[];
  /** The rest of the configuration (encrypt, decrypt, breaker, health). */
  config?: Record<string, unknown>;
}

export type Request =
  | { id: number; cmd: 'start'; spec: ServerSpec }
  | { id: number; cmd: 'profile'; name: string; profile: LatencyProfile }
  | { id: number; cmd: 'stats' }
  | { id: number; cmd: 'reset' }
  | { id: number; cmd: 'stop' };

export interface BackendReport {
  name: string;
  calls: { wrap: number; unwrap: number; key_version: number };
  peakInFlight: number;
  aborted: number;
  breaker: string;
  /** Breaker state changes since start or the last reset, with Date.now() times. */
  transitions: { at: number; state: string }[];
}

let plugin: Plugin | undefined;
let server: KmsServer | undefined;
const wrappers = new Map<string, LatencyBackend>();
const transitions = new Map<string, { at: number; state: string }[]>();
let watcher: NodeJS.Timeout | undefined;

async function start(spec: ServerSpec): Promise<void> {
  for (const b of spec.backends) await generateKeyFile(path.join(spec.dir, `${b.name}.key`));
  const config = parseConfig({
    socket: { path: spec.socket },
    quorum: spec.quorum,
    backends: spec.backends.map((b) => ({
      name: b.name,
      type: 'local',
      keyFile: `${b.name}.key`,
      ...(b.priority === undefined ? {} : { priority: b.priority }),
      ...(b.timeoutMs === undefined ? {} : { timeoutMs: b.timeoutMs }),
    })),
    log: { level: 'error' },
    ...spec.config,
  });
  for (const b of spec.backends) wrappers.set(b.name, new LatencyBackend(new LocalKeyBackend(b.name, path.join(spec.dir, `${b.name}.key`)), b.profile));
  const metrics = new Metrics();
  const logger = createLogger('error');
  plugin = new Plugin({ config, baseDir: spec.dir, logger, metrics, backends: [...wrappers.values()] });
  server = new KmsServer(plugin, { path: spec.socket, mode: config.socket.mode }, metrics, logger);
  await plugin.start();
  await server.start();
  const last = new Map<string, string>();
  // The breaker's state is polled (its events are private to GuardedBackend): 5 ms resolution is plenty here.
  watcher = setInterval(() => {
    for (const b of plugin!.backends) {
      if (last.get(b.name) !== b.breakerState) {
        last.set(b.name, b.breakerState);
        const list = transitions.get(b.name) ?? [];
        list.push({ at: Date.now(), state: b.breakerState });
        transitions.set(b.name, list);
      }
    }
  }, 5);
}

function stats(): BackendReport[] {
  return plugin!.backends.map((b) => {
    const w = wrappers.get(b.name)!;
    return {
      name: b.name,
      calls: { ...w.stats.calls },
      peakInFlight: w.stats.peakInFlight,
      aborted: w.stats.aborted,
      breaker: b.breakerState,
      transitions: transitions.get(b.name) ?? [],
    };
  });
}

process.on('message', (message: Request) => {
  const reply = (result: unknown) => process.send!({ id: message.id, result });
  const fail = (error: unknown) => process.send!({ id: message.id, error: String(error) });
  const run = async (): Promise<unknown> => {
    switch (message.cmd) {
      case 'start':
        return start(message.spec);
      case 'profile':
        wrappers.get(message.name)!.profile = message.profile;
        return undefined;
      case 'stats':
        return stats();
      case 'reset':
        for (const w of wrappers.values()) w.resetStats();
        for (const list of transitions.values()) list.splice(0, list.length - 1);
        return undefined;
      case 'stop':
        clearInterval(watcher);
        await server?.stop(1000);
        await plugin?.close();
        return undefined;
    }
  };
  run().then(reply, fail);
});
process.on('disconnect', () => process.exit(0));
