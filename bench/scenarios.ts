/**
 * Scenario benchmarks (`npm run bench -- --scenario <name>`, or `all`): the plugin
 * runs in its own process (bench/scenario-server.ts) with local key backends behind
 * injected latency (bench/latency-backend.ts); this process is the gRPC client on the
 * unix socket, as the apiserver is.
 *
 *   fanout    Encrypt, three backends at 20 / 50 / 200 ms, quorum 2, straggler grace
 *             0 and 150 ms, against calling the three one after another.
 *   failover  Decrypt with the preferred backend blackholed, before and after its
 *             breaker opens.
 *   hedging   Decrypt with a heavy-tailed preferred backend (2 % of calls 2 s, the
 *             rest 5 ms), hedging on and off, and the backend calls it costs.
 *   storm     2,000 distinct envelopes decrypted at once after an apiserver restart,
 *             backends at 40 ms, concurrency 64 and 256.
 *
 * Every result carries the machine's load average (1 / 5 / 15 min) at its start.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { LocalKeyBackend, generateKeyFile } from '../src/backends/local.ts';
import { call, clientsFor } from '../src/cli/client.ts';
import { parseEnvelope } from '../src/envelope/format.ts';
import type * as T from '../src/kms/types.ts';
import { LatencyBackend, type LatencyProfile } from './latency-backend.ts';
import type { BackendReport, Request, ServerSpec } from './scenario-server.ts';
import { pluginNodeArgs } from './plugin-node-args.ts';

export const SCENARIOS = ['fanout', 'failover', 'hedging', 'storm'] as const;
export type ScenarioName = (typeof SCENARIOS)[number];

const root = path.resolve(import.meta.dirname, '..');

export interface Summary {
  n: number;
  p50: number;
  p90: number;
  p99: number;
  p999: number;
  max: number;
  mean: number;
}

export function summarize(latencies: readonly number[]): Summary {
  const sorted = Float64Array.from(latencies).sort();
  const at = (p: number) => (sorted.length === 0 ? NaN : sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!);
  const r = (x: number) => Math.round(x * 10) / 10;
  const mean = sorted.reduce((s, x) => s + x, 0) / Math.max(1, sorted.length);
  return { n: sorted.length, p50: r(at(50)), p90: r(at(90)), p99: r(at(99)), p999: r(at(99.9)), max: r(sorted[sorted.length - 1] ?? NaN), mean: r(mean) };
}

export function loadAverage(): string {
  return os
    .loadavg()
    .map((x) => x.toFixed(2))
    .join(' / ');
}

const fmt = (s: Summary) => `n=${s.n}  p50 ${s.p50} ms  p99 ${s.p99} ms  p99.9 ${s.p999} ms  max ${s.max} ms`;

/** The plugin in a child process, driven over IPC. */
interface Server {
  socket: string;
  clients: ReturnType<typeof clientsFor>;
  profile(name: string, profile: LatencyProfile): Promise<void>;
  stats(): Promise<BackendReport[]>;
  reset(): Promise<void>;
  encrypt(plaintext: Buffer): Promise<T.V2EncryptResponse>;
  decrypt(e: T.V2EncryptResponse): Promise<Buffer>;
  stop(): Promise<void>;
}

async function startServer(spec: Omit<ServerSpec, 'dir' | 'socket'>): Promise<Server> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'trs-bench-'));
  const socket = path.join(dir, 'kms.sock');
  const extra = pluginNodeArgs(root);
  const child: ChildProcess = spawn(process.execPath, [...extra, path.join(root, 'bench/scenario-server.ts')], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  let next = 0;
  const pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  child.on('message', (m: { id: number; result?: unknown; error?: string }) => {
    const p = pending.get(m.id);
    pending.delete(m.id);
    if (m.error !== undefined) p?.reject(new Error(m.error));
    else p?.resolve(m.result);
  });
  const rpc = <R>(request: Request extends infer U ? (U extends Request ? Omit<U, 'id'> : never) : never): Promise<R> =>
    new Promise((resolve, reject) => {
      const id = next++;
      pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      child.send({ ...request, id });
    });
  await rpc({ cmd: 'start', spec: { ...spec, dir, socket } });
  const clients = clientsFor(socket);
  return {
    socket,
    clients,
    profile: (name, profile) => rpc({ cmd: 'profile', name, profile }),
    stats: () => rpc({ cmd: 'stats' }),
    reset: () => rpc({ cmd: 'reset' }),
    encrypt: (plaintext) => call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext, uid: 'bench' }),
    decrypt: async (e) =>
      (
        await call<T.V2DecryptRequest, T.V2DecryptResponse>(clients.v2, 'Decrypt', {
          ciphertext: e.ciphertext,
          key_id: e.key_id,
          annotations: e.annotations,
          uid: 'bench',
        })
      ).plaintext,
    async stop() {
      clients.close();
      await rpc({ cmd: 'stop' }).catch(() => undefined);
      child.disconnect();
      await new Promise((r) => (child.exitCode === null ? child.once('exit', r) : r(undefined)));
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** Run `fire` with `concurrency` workers for `count` calls or until `untilMs`; latencies and start times in ms. */
async function drive(
  concurrency: number,
  fire: (i: number) => Promise<unknown>,
  limit: { count?: number; untilMs?: number },
): Promise<{ samples: { start: number; ms: number }[]; errors: number; elapsedMs: number }> {
  const samples: { start: number; ms: number }[] = [];
  let errors = 0;
  let issued = 0;
  const started = performance.now();
  const stopAt = limit.untilMs === undefined ? Infinity : started + limit.untilMs;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      for (;;) {
        if (limit.count !== undefined && issued >= limit.count) return;
        if (performance.now() >= stopAt) return;
        const i = issued++;
        const t0 = performance.now();
        const wall = Date.now();
        try {
          await fire(i);
          samples.push({ start: wall, ms: performance.now() - t0 });
        } catch {
          errors++;
        }
      }
    }),
  );
  return { samples, errors, elapsedMs: performance.now() - started };
}

const seed = () => randomBytes(32);
const unwraps = (reports: BackendReport[]) => Object.fromEntries(reports.map((r) => [r.name, r.calls.unwrap]));

// ---------------------------------------------------------------- a. fan-out

async function fanout(): Promise<unknown> {
  const profiles: Record<string, LatencyProfile> = { a: { ms: 20 }, b: { ms: 50 }, c: { ms: 200 } };
  const result: Record<string, unknown> = { load: loadAverage(), latenciesMs: { a: 20, b: 50, c: 200 }, quorum: 2 };
  for (const grace of [0, 150]) {
    const server = await startServer({
      quorum: 2,
      backends: Object.entries(profiles).map(([name, profile]) => ({ name, profile })),
      config: { encrypt: { stragglerGraceMs: grace }, health: { probeIntervalMs: 3_600_000 }, escrow: { enabled: false } },
    });
    try {
      await drive(4, () => server.encrypt(seed()), { count: 8 });
      const copies: number[] = [];
      const run = await drive(8, async () => {
        const e = await server.encrypt(seed());
        copies.push(parseEnvelope(e.ciphertext, new Map(Object.entries(e.annotations))).copies.length);
      }, { count: 160 });
      const summary = summarize(run.samples.map((s) => s.ms));
      const meanCopies = Math.round((copies.reduce((s, x) => s + x, 0) / copies.length) * 100) / 100;
      result[`grace${grace}`] = { ...summary, errors: run.errors, copiesPerEnvelope: meanCopies };
      console.error(`fanout grace ${grace} ms: ${fmt(summary)}  copies/envelope ${meanCopies}  errors ${run.errors}  (load ${loadAverage()})`);
    } finally {
      await server.stop();
    }
  }
  // The serial baseline: the same three backends, called one after another.
  const dir = await mkdtemp(path.join(os.tmpdir(), 'trs-bench-'));
  try {
    const backends: LatencyBackend[] = [];
    for (const [name, profile] of Object.entries(profiles)) {
      await generateKeyFile(path.join(dir, `${name}.key`));
      backends.push(new LatencyBackend(new LocalKeyBackend(name, path.join(dir, `${name}.key`)), profile));
    }
    const latencies: number[] = [];
    const signal = new AbortController().signal;
    for (let i = 0; i < 20; i++) {
      const t0 = performance.now();
      for (const b of backends) await b.wrap(seed(), { envelopeId: randomBytes(16), backendName: b.name }, signal);
      latencies.push(performance.now() - t0);
    }
    result.serial = summarize(latencies);
    console.error(`fanout serial baseline: ${fmt(result.serial as Summary)}`);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  return result;
}

// ---------------------------------------------------------------- b. failover

async function failover(): Promise<unknown> {
  const server = await startServer({
    quorum: 2,
    backends: [
      { name: 'a', priority: 1, profile: { ms: 2 } },
      { name: 'b', profile: { ms: 2 } },
      { name: 'c', profile: { ms: 2 } },
    ],
    config: { escrow: { enabled: false } },
  });
  const result: Record<string, unknown> = { load: loadAverage(), backendLatencyMs: 2, timeoutMs: 1000, breaker: 'defaults (5 calls, 50 %, reset 5 s)' };
  try {
    const envelopes = await Promise.all(Array.from({ length: 16 }, () => server.encrypt(seed())));
    const healthy = await drive(4, (i) => server.decrypt(envelopes[i % envelopes.length]!), { untilMs: 2000 });
    result.healthy = summarize(healthy.samples.map((s) => s.ms));
    await server.reset();
    await server.profile('a', { ms: 0, blackhole: true });
    const blackholedAt = Date.now();
    const run = await drive(4, (i) => server.decrypt(envelopes[i % envelopes.length]!), { untilMs: 12_000 });
    const a = (await server.stats()).find((r) => r.name === 'a')!;
    const opened = a.transitions.find((t) => t.state === 'open' && t.at >= blackholedAt)?.at ?? Infinity;
    const before = run.samples.filter((s) => s.start < opened).map((s) => s.ms);
    const after = run.samples.filter((s) => s.start >= opened).map((s) => s.ms);
    result.breakerOpenedAfterMs = Number.isFinite(opened) ? opened - blackholedAt : null;
    result.beforeOpen = summarize(before);
    result.afterOpen = summarize(after);
    result.errors = run.errors;
    result.transitions = a.transitions.filter((t) => t.at >= blackholedAt).map((t) => `${t.state}@${t.at - blackholedAt}ms`);
    result.callsToBlackholed = a.calls;
    console.error(`failover healthy: ${fmt(result.healthy as Summary)}`);
    console.error(
      Number.isFinite(opened)
        ? `failover before breaker opens (${result.breakerOpenedAfterMs as number} ms): ${fmt(result.beforeOpen as Summary)}`
        : `failover blackholed, breaker never opened: ${fmt(result.beforeOpen as Summary)}  unwrap calls to the blackholed backend ${a.calls.unwrap}`,
    );
    console.error(`failover after breaker opened: ${fmt(result.afterOpen as Summary)}  errors ${run.errors}  transitions ${(result.transitions as string[]).join(' ')}  (load ${loadAverage()})`);
  } finally {
    await server.stop();
  }
  return result;
}

// ---------------------------------------------------------------- c. hedging

async function hedging(): Promise<unknown> {
  const result: Record<string, unknown> = { load: loadAverage(), profile: 'a (preferred): 2 % of calls 2000 ms, others 5 ms; b, c: 5 ms; timeoutMs 1000' };
  for (const enabled of [true, false]) {
    const server = await startServer({
      quorum: 2,
      backends: [{ name: 'a', priority: 1 }, { name: 'b' }, { name: 'c' }],
      config: { decrypt: { hedging: { enabled } }, escrow: { enabled: false } },
    });
    try {
      const envelopes = await Promise.all(Array.from({ length: 64 }, () => server.encrypt(seed())));
      await server.profile('a', { ms: 5, tailProbability: 0.02, tailMs: 2000 });
      await server.profile('b', { ms: 5 });
      await server.profile('c', { ms: 5 });
      await drive(16, (i) => server.decrypt(envelopes[i % 64]!), { untilMs: 1000 }); // fill the latency windows
      await server.reset();
      const run = await drive(16, (i) => server.decrypt(envelopes[i % 64]!), { untilMs: 10_000 });
      const calls = unwraps(await server.stats());
      const total = Object.values(calls).reduce((s, x) => s + x, 0);
      const decrypts = run.samples.length + run.errors;
      const summary = summarize(run.samples.map((s) => s.ms));
      const extra = Math.round(((total - decrypts) / decrypts) * 1000) / 10;
      result[enabled ? 'hedgingOn' : 'hedgingOff'] = { ...summary, errors: run.errors, unwrapCalls: calls, extraCallsPercent: extra };
      console.error(`hedging ${enabled ? 'on ' : 'off'}: ${fmt(summary)}  errors ${run.errors}  unwrap calls ${JSON.stringify(calls)}  extra ${extra} %  (load ${loadAverage()})`);
    } finally {
      await server.stop();
    }
  }
  return result;
}

// ---------------------------------------------------------------- d. restart storm

async function storm(): Promise<unknown> {
  const count = 2000;
  const server = await startServer({ quorum: 2, backends: [{ name: 'a' }, { name: 'b' }, { name: 'c' }], config: { escrow: { enabled: false } } });
  const result: Record<string, unknown> = { load: loadAverage(), envelopes: count, backendLatencyMs: 40, serialWouldTakeS: (count * 40) / 1000 };
  try {
    const envelopes: T.V2EncryptResponse[] = [];
    await drive(32, async () => envelopes.push(await server.encrypt(seed())), { count });
    for (const name of ['a', 'b', 'c']) await server.profile(name, { ms: 40, jitterMs: 4 });
    for (const concurrency of [64, 256]) {
      await server.reset();
      const run = await drive(concurrency, (i) => server.decrypt(envelopes[i]!), { count });
      const reports = await server.stats();
      const summary = summarize(run.samples.map((s) => s.ms));
      const entry = {
        concurrency,
        drainS: Math.round(run.elapsedMs) / 1000,
        perSecond: Math.round((count / run.elapsedMs) * 1000),
        ...summary,
        errors: run.errors,
        unwrapCalls: unwraps(reports),
        peakInFlight: Object.fromEntries(reports.map((r) => [r.name, r.peakInFlight])),
        load: loadAverage(),
      };
      result[`c${concurrency}`] = entry;
      console.error(
        `storm concurrency ${concurrency}: drained ${count} in ${entry.drainS} s (${entry.perSecond}/s)  ${fmt(summary)}  errors ${run.errors}  unwrap calls ${JSON.stringify(entry.unwrapCalls)}  peak in flight ${JSON.stringify(entry.peakInFlight)}  (load ${entry.load})`,
      );
    }
  } finally {
    await server.stop();
  }
  return result;
}

const RUNNERS: Record<ScenarioName, () => Promise<unknown>> = { fanout, failover, hedging, storm };

export async function runScenarios(names: readonly string[]): Promise<Record<string, unknown>> {
  const selected = names.includes('all') ? [...SCENARIOS] : names;
  const results: Record<string, unknown> = {};
  for (const name of selected) {
    const runner = RUNNERS[name as ScenarioName] as (() => Promise<unknown>) | undefined;
    if (!runner) throw new Error(`unknown scenario ${name}; choose from ${SCENARIOS.join(', ')}, all`);
    results[name] = await runner();
  }
  return results;
}
