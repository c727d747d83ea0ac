/**
 * `npm run bench`: Encrypt and Decrypt through the plugin's unix socket, with 1, 3
 * and 5 local key backends, at concurrency 1, 16 and 64. The plugin runs in its own
 * process (as beside a real apiserver); this process is the client. Reports ops/s,
 * p50 / p99 / p99.9 latency and the plugin's resident memory.
 *
 *   npm run bench                    full matrix, table on stdout
 *   npm run bench -- --quick --json  3 backends, concurrency 16, one JSON line
 *   npm run bench -- --client node   load from this Node process instead of the Go client
 *   npm run bench -- --scenario fanout|failover|hedging|storm|all [--json]
 *                                    injected-latency scenarios (bench/scenarios.ts)
 *   npm run bench -- --scenario memory
 *                                    RSS and heap idle, under load, across churn (bench/memory.ts)
 *   npm run bench -- --scenario footprint [--variant image ...]
 *                                    RSS after start, idle and under load per configuration (dev,
 *                                    one backend of each type) and Node flag set (bench/memory.ts)
 *   npm run bench -- --scenario startup [--runs N]
 *                                    spawn to Status answering, median and max (bench/startup.ts;
 *                                    both need test/servers/up.sh openbao local-kms lowkey-vault)
 *   npm run bench -- --scenario overload
 *                                    5,000-call bursts against the real test servers (bench/overload.ts;
 *                                    needs test/servers/up.sh openbao local-kms; not part of "all")
 *   npm run bench -- --scenario kms-plugin
 *                                    wraps/unwraps through aws-encryption-provider, direct vs the kms-plugin
 *                                    backend (bench/kms-plugin.ts; needs local-kms and aws-encryption-provider)
 *   npm run bench -- --scenario peers [--rounds 3] [--seconds 5]
 *                                    Trousseau beside aws-encryption-provider and vault-kubernetes-kms
 *                                    on the same servers, interleaved, plus an outage round (bench/peers.ts;
 *                                    needs test/servers/up.sh openbao local-kms; not part of "all")
 *   npm run bench -- --scenario vault-batch [--rounds 3] [--calls 6000]
 *                                    Vault transit calls batched vs one request per key, CPU of both ends
 *                                    (bench/vault-batch.ts; needs test/servers/up.sh openbao; not part of "all")
 *   ... --out bench/results.jsonl    append the run's JSON line (stamped with commit, date,
 *                                    node, cpus, load: bench/record.ts) to a file
 *   node bench/charts.ts             redraw docs/charts/*.svg from bench/results.jsonl
 *
 * The default client is bench/goload (grpc-go and the k8s.io/kms types, as
 * kube-apiserver). A Node client on the same 2 cores costs about as much CPU as the
 * plugin, and its own event-loop delays (reported as "client loop p99") end up in the
 * latencies it measures; without a Go toolchain the bench falls back to it.
 *
 * The plugin runs with the Node options the Dockerfile sets (plugin-node-args.ts);
 * BENCH_PLUGIN_NODE_ARGS adds more (e.g. --cpu-prof).
 *
 * Results are recorded in docs/performance.md.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os, { tmpdir } from 'node:os';
import path from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { generateKeyFile } from '../src/backends/local.ts';
import { call, clientsFor } from '../src/cli/client.ts';
import type * as T from '../src/kms/types.ts';
import { emit } from './record.ts';
import { pluginNodeArgs } from './plugin-node-args.ts';
import { cpuSeconds, rssMiB } from './process-stats.ts';

const { values: args } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
    seconds: { type: 'string' },
    scenario: { type: 'string', multiple: true },
    /** go (default: bench/goload, grpc-go and k8s.io/kms, as kube-apiserver) or node (this process). */
    client: { type: 'string', default: 'go' },
    /** Kept for older command lines: same as --client go. */
    'go-client': { type: 'boolean', default: false },
    /** Append the run's stamped JSON line to this file (one line per scenario with --scenario). */
    out: { type: 'string' },
    /** memory scenario: Encrypt + Decrypt calls in the churn phase. */
    calls: { type: 'string' },
    /** peers scenario: interleaved rounds. */
    rounds: { type: 'string' },
    /** startup scenario: starts per configuration and cache state. */
    runs: { type: 'string' },
    /** footprint scenario: Node flag sets to compare (bench/memory.ts FOOTPRINT_VARIANTS; default all). */
    variant: { type: 'string', multiple: true },
  },
});

if (args.scenario?.length) {
  const { runScenarios } = await import('./scenarios.ts');
  const numberArg = (value: string | undefined) => (value === undefined ? undefined : Number(value));
  // Scenarios with a runner of their own (each module loaded only when asked for);
  // the others are the engine scenarios of bench/scenarios.ts.
  const runners: Record<string, () => Promise<unknown>> = {
    memory: async () => (await import('./memory.ts')).runMemory({ calls: numberArg(args.calls) }),
    overload: async () => (await import('./overload.ts')).runOverload({ client: args.client }),
    'kms-plugin': async () => (await import('./kms-plugin.ts')).runKmsPlugin({ seconds: numberArg(args.seconds) }),
    peers: async () => (await import('./peers.ts')).runPeers({ rounds: numberArg(args.rounds), seconds: numberArg(args.seconds) }),
    startup: async () => (await import('./startup.ts')).runStartup({ runs: numberArg(args.runs) }),
    footprint: async () => (await import('./memory.ts')).runFootprint({ variants: args.variant }),
    'vault-batch': async () => {
      const { printVaultBatch, runVaultBatch } = await import('./vault-batch.ts');
      const rows = await runVaultBatch({ rounds: numberArg(args.rounds) ?? 3, calls: numberArg(args.calls) ?? 6000, concurrencies: [1, 4, 16, 64] });
      printVaultBatch(rows);
      return { rows };
    },
  };
  const names = args.scenario.includes('all') ? ['fanout', 'failover', 'hedging', 'storm', 'memory'] : args.scenario;
  const results: Record<string, unknown> = {};
  for (const name of names) {
    const runner = runners[name];
    results[name] = runner ? await runner() : (await runScenarios([name]))[name];
    // One line per scenario, so bench/results.jsonl stays one comparable record per line.
    if (args.out) emit(`scenario:${name}`, results[name] as Record<string, unknown>, { json: false, out: args.out });
  }
  if (args.json) emit(`scenario:${names.join(',')}`, results, { json: true });
  else console.log(JSON.stringify(results, null, 2));
  process.exit(0);
}

const root = path.resolve(import.meta.dirname, '..');
if (args.client !== 'go' && args.client !== 'node') throw new Error(`--client must be go or node, not ${args.client}`);
const useGo = (args['go-client'] || args.client === 'go') && goAvailable();

function goAvailable(): boolean {
  try {
    execFileSync('go', ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    console.error('bench: no Go toolchain found; measuring with the Node client instead (see --client)');
    return false;
  }
}
const seconds = Number(args.seconds ?? (args.quick ? 3 : 5));
const backendCounts = args.quick ? [3] : [1, 3, 5];
const concurrencies = args.quick ? [16] : [1, 16, 64];

interface Result {
  backends: number;
  concurrency: number;
  operation: 'encrypt' | 'decrypt';
  ops: number;
  opsPerSec: number;
  p50: number;
  p99: number;
  p999: number;
  errors: number;
  rssMiB: number;
  /** Plugin process CPU time (user + system) per operation, in microseconds: what the plugin costs, whatever else runs on the machine. */
  cpuUsPerOp: number;
  /** Node client only: p99 of the client's own event-loop delay (ms), part of what it measures as latency. */
  clientLoopP99Ms?: number;
  /** Machine load average (1 / 5 / 15 min) when the cell started: the machine may be shared. */
  load: string;
}

function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
}

async function startPlugin(dir: string, backends: number): Promise<{ child: ChildProcess; socket: string }> {
  const names = Array.from({ length: backends }, (_, i) => `local-${i + 1}`);
  for (const name of names) await generateKeyFile(path.join(dir, `${name}.key`));
  const socket = path.join(dir, 'kms.sock');
  const config = {
    socket: { path: socket },
    quorum: Math.min(2, backends),
    backends: names.map((name) => ({ name, type: 'local', keyFile: `${name}.key` })),
    log: { level: 'warn' },
  };
  await writeFile(path.join(dir, 'config.yaml'), JSON.stringify(config));
  const extra = pluginNodeArgs(root);
  const child = spawn(process.execPath, [...extra, path.join(root, 'src/main.ts'), 'serve', '--config', path.join(dir, 'config.yaml')], {
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  const deadline = Date.now() + 15000;
  while (!existsSync(socket)) {
    if (Date.now() > deadline || child.exitCode !== null) throw new Error('plugin did not start');
    await new Promise((r) => setTimeout(r, 50));
  }
  return { child, socket };
}

async function measure(
  operation: Result['operation'],
  concurrency: number,
  fire: () => Promise<unknown>,
): Promise<Measured> {
  const latencies: number[] = [];
  let errors = 0;
  // This process's own event-loop delay: time a response waited here before its
  // latency could be recorded, which the plugin is not responsible for.
  const loopDelay = monitorEventLoopDelay({ resolution: 1 });
  // Warm up connections, JIT and the backends' latency windows.
  await Promise.all(Array.from({ length: concurrency }, () => fire().catch(() => undefined)));
  const started = performance.now();
  const stopAt = started + seconds * 1000;
  loopDelay.enable();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < stopAt) {
        const t0 = performance.now();
        try {
          await fire();
          latencies.push(performance.now() - t0);
        } catch {
          errors++;
        }
      }
    }),
  );
  loopDelay.disable();
  const elapsed = (performance.now() - started) / 1000;
  const clientLoopP99Ms = loopDelay.percentile(99) / 1e6;
  return { ops: latencies.length, latencies: Float64Array.from(latencies).sort(), errors, elapsed, clientLoopP99Ms };
}

interface Measured {
  ops: number;
  elapsed: number;
  errors: number;
  latencies: Float64Array;
  /** Node client only: p99 of its own event-loop delay, in ms. */
  clientLoopP99Ms?: number;
  /** Percentiles computed by the Go client. */
  go?: { p50: number; p99: number; p999: number };
}

/** Build (once, cached by Go) and run bench/goload. */
async function measureWithGo(socket: string, operation: Result['operation'], concurrency: number): Promise<Measured> {
  const binary = path.join(root, '.servers', 'bin', 'goload');
  if (!existsSync(binary)) {
    execFileSync('go', ['build', '-o', binary, '.'], { cwd: path.join(root, 'bench', 'goload'), stdio: 'inherit' });
  }
  const output = execFileSync(binary, ['-socket', socket, '-op', operation, '-concurrency', String(concurrency), '-seconds', String(seconds)], {
    encoding: 'utf8',
  });
  const r = JSON.parse(output) as { ops: number; opsPerSec: number; p50: number; p99: number; p999: number; errors: number };
  // measure()'s shape: latencies are only needed for percentiles, which Go computed.
  return { ops: r.ops, elapsed: r.ops / Math.max(1, r.opsPerSec), errors: r.errors, latencies: Float64Array.from([r.p50, r.p99, r.p999]), go: r };
}

async function benchBackends(backends: number): Promise<Result[]> {
  const dir = await mkdtemp(path.join(tmpdir(), 'trousseau-bench-'));
  const { child, socket } = await startPlugin(dir, backends);
  const clients = clientsFor(socket);
  const results: Result[] = [];
  try {
    const seed = Buffer.alloc(32, 7);
    const sample = await call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext: seed, uid: 'bench' });
    const decryptRequest: T.V2DecryptRequest = { ciphertext: sample.ciphertext, uid: 'bench', key_id: sample.key_id, annotations: sample.annotations };
    for (const concurrency of concurrencies) {
      for (const operation of ['encrypt', 'decrypt'] as const) {
        const fire =
          operation === 'encrypt'
            ? () => call(clients.v2, 'Encrypt', { plaintext: seed, uid: 'bench' })
            : () => call(clients.v2, 'Decrypt', decryptRequest);
        const load = os.loadavg().map((x) => x.toFixed(2)).join(' / ');
        const cpuBefore = cpuSeconds(child.pid!);
        const run: Measured = useGo ? await measureWithGo(socket, operation, concurrency) : await measure(operation, concurrency, fire);
        // Includes the warm-up calls measure() makes; they are a small share of a cell.
        const cpuUsPerOp = Math.round(((cpuSeconds(child.pid!) - cpuBefore) * 1e6) / Math.max(1, run.ops + concurrency));
        results.push({
          backends,
          concurrency,
          operation,
          ops: run.ops,
          opsPerSec: Math.round(run.ops / run.elapsed),
          p50: round(run.go ? run.go.p50 : percentile(run.latencies, 50)),
          p99: round(run.go ? run.go.p99 : percentile(run.latencies, 99)),
          p999: round(run.go ? run.go.p999 : percentile(run.latencies, 99.9)),
          errors: run.errors,
          rssMiB: rssMiB(child.pid!),
          cpuUsPerOp,
          ...(run.clientLoopP99Ms === undefined ? {} : { clientLoopP99Ms: round(run.clientLoopP99Ms) }),
          load,
        });
      }
    }
  } finally {
    clients.close();
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
    await rm(dir, { recursive: true, force: true });
  }
  return results;
}

function round(ms: number): number {
  return Math.round(ms * 100) / 100;
}

const all: Result[] = [];
for (const count of backendCounts) all.push(...(await benchBackends(count)));

const pick = (operation: Result['operation']) => all.find((r) => r.operation === operation && r.backends === 3 && r.concurrency === 16) ?? all.find((r) => r.operation === operation)!;
const record = { client: useGo ? 'go' : 'node', seconds, encrypt: pick('encrypt'), decrypt: pick('decrypt'), results: all };
if (args.json || args.out) emit(args.quick ? 'matrix-quick' : 'matrix', record, { json: args.json, out: args.out });
if (!args.json) {
  console.log(`Node ${process.version}, ${os.availableParallelism()} CPUs, ${seconds} s per cell, local key backends, quorum min(2, n), ${useGo ? 'Go' : 'Node'} client\n`);
  console.log(`backends  conc  op       ops/s   p50 ms  p99 ms  p99.9 ms  errors  plugin RSS MiB  plugin CPU µs/op  ${useGo ? '' : 'client loop p99  '}load 1/5/15 min`);
  for (const r of all) {
    console.log(
      `${String(r.backends).padStart(8)}  ${String(r.concurrency).padStart(4)}  ${r.operation.padEnd(7)}  ${String(r.opsPerSec).padStart(6)}  ${r.p50.toFixed(2).padStart(6)}  ${r.p99.toFixed(2).padStart(6)}  ${r.p999.toFixed(2).padStart(8)}  ${String(r.errors).padStart(6)}  ${String(r.rssMiB).padStart(14)}  ${String(r.cpuUsPerOp).padStart(16)}  ${useGo ? '' : `${(r.clientLoopP99Ms ?? NaN).toFixed(2).padStart(15)}  `}${r.load}`,
    );
  }
}
