/**
 * Memory scenario (`npm run bench -- --scenario memory [--calls N] [--json] [--out FILE]`):
 * `trousseau serve --config` with 3 local key backends in its own process, as
 * bench/run.ts runs it, with `http.listen` set so /metrics exposes the process metrics.
 *
 *   idle    10 s after start-up, no calls.
 *   load    10 s of Encrypt + Decrypt pairs at concurrency 16.
 *   churn   the "hour-equivalent": --calls Encrypt + Decrypt calls (default 300,000),
 *           every pair on a fresh data key, so every envelope is distinct. An apiserver
 *           pair asks for one Encrypt per DEK rotation and one Decrypt per cache miss,
 *           a few hundred to a few thousand calls an hour even on a busy cluster;
 *           300,000 is two orders of magnitude more, squeezed into a few minutes.
 *   settle  10 s idle again.
 *
 * Sampled every second: RSS (/proc/<pid>/status) and heap used / external memory
 * (the plugin's own /metrics: trousseau_nodejs_heap_size_used_bytes,
 * trousseau_nodejs_external_memory_bytes). The heap-used metric saw-tooths with every
 * scavenge, so growth is judged on the heap *after a full GC*: the plugin is started
 * with --inspect on a loopback port chosen by the kernel, and the bench asks V8
 * (HeapProfiler.collectGarbage, then Runtime.getHeapUsage) at the end of idle, of
 * load, at each quarter of the churn and after settling. No route is added to the
 * plugin; the inspector is for this bench only.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { generateKeyFile } from '../src/backends/local.ts';
import { call, clientsFor } from '../src/cli/client.ts';
import type * as T from '../src/kms/types.ts';
import { pluginNodeArgs } from './plugin-node-args.ts';
import { cpuSeconds, freePort, loadAverage, rssMiB } from './process-stats.ts';

const root = path.resolve(import.meta.dirname, '..');
const MiB = 2 ** 20;
const round1 = (x: number) => Math.round(x * 10) / 10;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
export interface MemorySample {
  /** Seconds since the plugin was ready. */
  t: number;
  phase: 'idle' | 'load' | 'churn' | 'settle';
  /** Encrypt + Decrypt calls answered so far (all phases). */
  calls: number;
  rssMiB: number;
  heapUsedMiB: number;
  externalMiB: number;
}

export interface GcPoint {
  label: string;
  t: number;
  calls: number;
  /** V8 heap used right after a forced full GC. */
  heapMiB: number;
  rssMiB: number;
}

/** A minimal Chrome DevTools Protocol session over Node's built-in WebSocket client. */
async function inspector(url: string): Promise<{ send: (method: string) => Promise<Record<string, unknown>>; close: () => void }> {
  const ws = new WebSocket(url);
  await new Promise<void>((resolve, reject) => {
    ws.addEventListener('open', () => resolve(), { once: true });
    ws.addEventListener('error', () => reject(new Error('inspector connection failed')), { once: true });
  });
  let next = 1;
  const pending = new Map<number, (result: Record<string, unknown>) => void>();
  ws.addEventListener('message', (event: MessageEvent) => {
    const message = JSON.parse(String(event.data)) as { id?: number; result?: Record<string, unknown> };
    if (message.id !== undefined) pending.get(message.id)?.(message.result ?? {});
    if (message.id !== undefined) pending.delete(message.id);
  });
  return {
    send: (method) =>
      new Promise((resolve) => {
        const id = next++;
        pending.set(id, resolve);
        ws.send(JSON.stringify({ id, method }));
      }),
    close: () => ws.close(),
  };
}

async function startPlugin(dir: string): Promise<{ child: ChildProcess; socket: string; metricsUrl: string; inspectorUrl: string }> {
  const names = ['local-1', 'local-2', 'local-3'];
  for (const name of names) await generateKeyFile(path.join(dir, `${name}.key`));
  const socket = path.join(dir, 'kms.sock');
  const port = await freePort();
  const config = {
    socket: { path: socket },
    quorum: 2,
    backends: names.map((name) => ({ name, type: 'local', keyFile: `${name}.key` })),
    http: { listen: `127.0.0.1:${port}` },
    log: { level: 'warn' },
  };
  await writeFile(path.join(dir, 'config.yaml'), JSON.stringify(config));
  const extra = pluginNodeArgs(root);
  const child = spawn(process.execPath, [...extra, '--inspect=127.0.0.1:0', path.join(root, 'src/main.ts'), 'serve', '--config', path.join(dir, 'config.yaml')], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let inspectorUrl: string | undefined;
  let buffered = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk: string) => {
    buffered += chunk;
    let nl: number;
    while ((nl = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      const ws = /Debugger listening on (ws:\/\/\S+)/.exec(line)?.[1];
      if (ws) inspectorUrl = ws;
      else if (!/^For help, see|Debugger attached|Waiting for the debugger/.test(line)) process.stderr.write(line + '\n');
    }
  });
  const deadline = Date.now() + 20000;
  while (!existsSync(socket) || inspectorUrl === undefined) {
    if (Date.now() > deadline || child.exitCode !== null) throw new Error('plugin did not start');
    await sleep(50);
  }
  return { child, socket, metricsUrl: `http://127.0.0.1:${port}/metrics`, inspectorUrl };
}

async function processMetrics(url: string): Promise<{ heapUsedMiB: number; externalMiB: number }> {
  const text = await (await fetch(url)).text();
  const value = (name: string) => Number(new RegExp(`^${name} (\\S+)`, 'm').exec(text)?.[1] ?? NaN) / MiB;
  return { heapUsedMiB: round1(value('trousseau_nodejs_heap_size_used_bytes')), externalMiB: round1(value('trousseau_nodejs_external_memory_bytes')) };
}

export async function runMemory(options: { calls?: number | undefined } = {}): Promise<Record<string, unknown>> {
  const churnCalls = options.calls ?? 300_000;
  const concurrency = 16;
  const dir = await mkdtemp(path.join(os.tmpdir(), 'trousseau-memory-'));
  const { child, socket, metricsUrl, inspectorUrl } = await startPlugin(dir);
  const pid = child.pid!;
  const clients = clientsFor(socket);
  const v8 = await inspector(inspectorUrl);
  const started = performance.now();
  const elapsed = () => round1((performance.now() - started) / 1000);
  let phase: MemorySample['phase'] = 'idle';
  let calls = 0;
  let errors = 0;
  const samples: MemorySample[] = [];
  const gc: GcPoint[] = [];
  const result: Record<string, unknown> = { load: loadAverage(), backends: 3, quorum: 2, concurrency, churnCalls };

  const sample = async () => void samples.push({ t: elapsed(), phase, calls, rssMiB: rssMiB(pid), ...(await processMetrics(metricsUrl)) });
  let sampling = Promise.resolve();
  const sampler = setInterval(() => {
    sampling = sampling.then(sample).catch(() => undefined);
  }, 1000);
  const forcedGc = async (label: string) => {
    await v8.send('HeapProfiler.collectGarbage');
    const usage = (await v8.send('Runtime.getHeapUsage')) as { usedSize: number };
    const point: GcPoint = { label, t: elapsed(), calls, heapMiB: round1(usage.usedSize / MiB), rssMiB: rssMiB(pid) };
    gc.push(point);
    console.error(`memory ${label}: heap after GC ${point.heapMiB} MiB  RSS ${point.rssMiB} MiB  after ${calls} calls  (load ${loadAverage()})`);
  };

  /** Encrypt a fresh data key and decrypt the envelope it produced: two calls, one new envelope. */
  const pair = async (i: number) => {
    const plaintext = randomBytes(32);
    const uid = `mem-${i}`;
    const e = await call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext, uid });
    calls++;
    const d = await call<T.V2DecryptRequest, T.V2DecryptResponse>(clients.v2, 'Decrypt', { ciphertext: e.ciphertext, key_id: e.key_id, annotations: e.annotations, uid });
    calls++;
    if (!Buffer.from(d.plaintext).equals(plaintext)) throw new Error('round trip mismatch');
  };
  let issued = 0;
  const drive = async (limit: { pairs?: number; untilMs?: number; onProgress?: () => Promise<void> }) => {
    const stopAt = limit.untilMs === undefined ? Infinity : performance.now() + limit.untilMs;
    const first = issued;
    await Promise.all(
      Array.from({ length: concurrency }, async () => {
        for (;;) {
          if (limit.pairs !== undefined && issued - first >= limit.pairs) return;
          if (performance.now() >= stopAt) return;
          const i = issued++;
          try {
            await pair(i);
          } catch {
            errors++;
          }
        }
      }),
    );
  };

  try {
    await sleep(10_000);
    await forcedGc('idle');
    const rssIdle = rssMiB(pid);

    phase = 'load';
    const loadStart = calls;
    const t0 = performance.now();
    await drive({ untilMs: 10_000 });
    const loadOpsPerSec = Math.round((calls - loadStart) / ((performance.now() - t0) / 1000));
    const rssUnderLoad = rssMiB(pid);
    await forcedGc('after load');

    phase = 'churn';
    const churnStart = performance.now();
    const pairs = Math.ceil(churnCalls / 2);
    let rssEndOfChurn = NaN;
    let churnSeconds = NaN;
    for (let quarter = 1; quarter <= 4; quarter++) {
      await drive({ pairs: Math.ceil(pairs / 4) });
      // Before the forced GC, which returns memory to the OS and would flatter RSS.
      if (quarter === 4) rssEndOfChurn = rssMiB(pid);
      if (quarter === 4) churnSeconds = Math.round((performance.now() - churnStart) / 1000);
      await forcedGc(`churn ${quarter}/4`);
    }

    phase = 'settle';
    await sleep(10_000);
    await forcedGc('settled');
    clearInterval(sampler);
    await sampling;

    const churnSamples = samples.filter((s) => s.phase === 'churn');
    const quarterLen = Math.max(1, Math.floor(churnSamples.length / 4));
    // Minimum of the heap-used metric in a window ~ the heap after that window's GCs.
    const minHeap = (list: MemorySample[]) => round1(Math.min(...list.map((s) => s.heapUsedMiB)));
    const maxRss = (list: MemorySample[]) => round1(Math.max(...list.map((s) => s.rssMiB)));
    const afterLoad = gc.find((p) => p.label === 'after load')!;
    const settled = gc.find((p) => p.label === 'settled')!;
    const heapGrowth = round1(settled.heapMiB - afterLoad.heapMiB);
    const heapGrowthPer100k = round1((heapGrowth / Math.max(1, settled.calls - afterLoad.calls)) * 100_000);
    Object.assign(result, {
      rssMiB: { idle: rssIdle, underLoad: rssUnderLoad, endOfChurn: rssEndOfChurn, settled: settled.rssMiB },
      heapAfterGcMiB: Object.fromEntries(gc.map((p) => [p.label, p.heapMiB])),
      heapUsedMetricMinMiB: { firstQuarterOfChurn: minHeap(churnSamples.slice(0, quarterLen)), lastQuarterOfChurn: minHeap(churnSamples.slice(-quarterLen)) },
      rssMaxMiB: { firstQuarterOfChurn: maxRss(churnSamples.slice(0, quarterLen)), lastQuarterOfChurn: maxRss(churnSamples.slice(-quarterLen)) },
      loadOpsPerSec,
      churnSeconds,
      churnOpsPerSec: Math.round((calls - afterLoad.calls) / Math.max(1, churnSeconds)),
      calls,
      errors,
      heapGrowthAfterGcMiB: heapGrowth,
      heapGrowthPer100kCallsMiB: heapGrowthPer100k,
      // A leak of even 100 bytes per call would show as ~28 MiB over the churn; allow noise of 5 MiB.
      grows: heapGrowth > 5,
      gc,
      samples,
      loadAtEnd: loadAverage(),
    });
    console.error(
      `memory: RSS idle ${rssIdle} / under load ${rssUnderLoad} / end of churn ${rssEndOfChurn} / settled ${settled.rssMiB} MiB; heap after GC ${gc.map((p) => `${p.label} ${p.heapMiB}`).join(', ')} MiB; ${calls} calls, ${errors} errors, churn ${churnSeconds} s; grows: ${String(result.grows)}`,
    );
  } finally {
    clearInterval(sampler);
    v8.close();
    clients.close();
    child.kill('SIGTERM');
    await new Promise((r) => (child.exitCode === null ? child.once('exit', r) : r(undefined)));
    await rm(dir, { recursive: true, force: true });
  }
  return result;
}

/**
 * Footprint scenario (`npm run bench -- --scenario footprint`): RSS per configuration
 * (plugin-process.ts: dev, and one backend of each type) and per set of Node flags,
 * with a warm compile cache as in the image: after start-up, after 10 s idle, and the
 * peak while bench/goload runs 10 s of Decrypt and 10 s of Encrypt at concurrency 16,
 * beside the p99 and the plugin CPU per call of those runs. RSS is split into what is
 * mapped from the node binary (shared, clean, the same for every Node process) and
 * anonymous memory (heap, malloc, code), from /proc/<pid>/smaps_rollup and smaps.
 */
export const FOOTPRINT_VARIANTS: Record<string, { nodeArgs: string[]; env?: Record<string, string> }> = {
  image: { nodeArgs: [] },
  'optimize-for-size': { nodeArgs: ['--optimize-for-size'] },
  // The young generation stays committed (and resident) at its largest size: 2 x 8 MiB
  // with the image's flag, though an idle plugin uses under 1 MiB of it.
  'max-semi-space-size=4': { nodeArgs: ['--max-semi-space-size=4'] },
  'max-semi-space-size=2': { nodeArgs: ['--max-semi-space-size=2'] },
  // Old generation grown by 1.2x after each mark-compact instead of V8's adaptive factor
  // (up to 4x): garbage promoted under load waits less for the next one.
  'heap-growing-percent=20': { nodeArgs: ['--heap-growing-percent=20'] },
  'heap-growing-percent=50': { nodeArgs: ['--heap-growing-percent=50'] },
  'heap-growing-percent=100': { nodeArgs: ['--heap-growing-percent=100'] },
  'max-old-space-size=96': { nodeArgs: ['--max-old-space-size=96'] },
  'single-threaded-gc': { nodeArgs: ['--single-threaded-gc'] },
  'max-lazy': { nodeArgs: ['--max-lazy'] },
  'MALLOC_ARENA_MAX=2': { nodeArgs: [], env: { MALLOC_ARENA_MAX: '2' } },
};

function mappedFromBinaryMiB(pid: number): number {
  let kb = 0;
  let fromNode = false;
  for (const line of readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
    if (/^[0-9a-f]+-[0-9a-f]+ /.test(line)) fromNode = /\/node$/.test(line.trim());
    else if (fromNode && line.startsWith('Rss:')) kb += Number(/(\d+)/.exec(line)?.[1] ?? 0);
  }
  return round1(kb / 1024);
}

function anonymousMiB(pid: number): number {
  const kb = Number(/^Anonymous:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'))?.[1] ?? NaN);
  return round1(kb / 1024);
}

async function goloadRun(socket: string, op: 'decrypt' | 'encrypt', pid: number): Promise<Record<string, number>> {
  const { goloadBinary } = await import('./goload-binary.ts');
  let peak = 0;
  const sampler = setInterval(() => (peak = Math.max(peak, rssMiB(pid))), 200);
  const cpuBefore = cpuSeconds(pid);
  const output = await new Promise<string>((resolve, reject) => {
    let out = '';
    const load = spawn(goloadBinary(), ['-socket', socket, '-op', op, '-concurrency', '16', '-seconds', '10'], { stdio: ['ignore', 'pipe', 'inherit'] });
    load.stdout.on('data', (d: Buffer) => (out += d.toString()));
    load.once('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`goload exited with ${code}`))));
  });
  clearInterval(sampler);
  const r = JSON.parse(output) as { ops: number; opsPerSec: number; p99: number; errors: number };
  const cpu = cpuSeconds(pid) - cpuBefore;
  // goload's warm-up calls (4 per caller) are in the CPU time too.
  return { opsPerSec: r.opsPerSec, p99Ms: round1(r.p99), errors: r.errors, cpuUsPerCall: Math.round((cpu * 1e6) / (r.ops + 64)), rssPeakMiB: round1(peak) };
}

export async function runFootprint(options: { variants?: string[] | undefined } = {}): Promise<Record<string, unknown>> {
  const { startPluginProcess, unavailable } = await import('./plugin-process.ts');
  const variants = options.variants ?? Object.keys(FOOTPRINT_VARIANTS);
  const result: Record<string, unknown> = { load: loadAverage() };
  const cache = await mkdtemp(path.join(os.tmpdir(), 'trousseau-compile-cache-'));
  try {
    for (const configuration of ['dev', 'all'] as const) {
      const missing = unavailable(configuration);
      if (missing) {
        result[configuration] = { skipped: missing };
        console.error(`footprint ${configuration}: skipped (${missing})`);
        continue;
      }
      const rows: Record<string, unknown> = {};
      for (const name of variants) {
        const variant = FOOTPRINT_VARIANTS[name];
        if (!variant) throw new Error(`unknown footprint variant ${name}`);
        const dir = await mkdtemp(path.join(os.tmpdir(), 'trousseau-footprint-'));
        const saved = { ...process.env };
        Object.assign(process.env, variant.env ?? {});
        const nodeArgs = [...pluginNodeArgs(root), ...variant.nodeArgs];
        // The first start of a flag set fills its compile cache (V8 flags are part of the cache key).
        await (await startPluginProcess(dir, configuration, { compileCache: cache, nodeArgs })).stop();
        const plugin = await startPluginProcess(dir, configuration, { compileCache: cache, nodeArgs });
        process.env = saved;
        const pid = plugin.child.pid!;
        try {
          const afterStart = rssMiB(pid);
          await sleep(10_000);
          const metrics = await processMetrics(plugin.metricsUrl);
          const idle = { rssMiB: rssMiB(pid), fromNodeBinaryMiB: mappedFromBinaryMiB(pid), anonymousMiB: anonymousMiB(pid), ...metrics };
          const decrypt = await goloadRun(plugin.socket, 'decrypt', pid);
          const encrypt = await goloadRun(plugin.socket, 'encrypt', pid);
          const after = { rssMiB: rssMiB(pid), fromNodeBinaryMiB: mappedFromBinaryMiB(pid), anonymousMiB: anonymousMiB(pid), ...(await processMetrics(plugin.metricsUrl)) };
          rows[name] = { nodeArgs: nodeArgs.join(' '), env: variant.env ?? {}, afterStartMiB: afterStart, idle, decrypt, encrypt, afterLoad: after, load: loadAverage() };
          console.error(
            `footprint ${configuration} ${name}: RSS start ${afterStart} / idle ${idle.rssMiB} (binary ${idle.fromNodeBinaryMiB}, anon ${idle.anonymousMiB}, heap ${idle.heapUsedMiB}, external ${idle.externalMiB}) / load peak ${Math.max(decrypt.rssPeakMiB!, encrypt.rssPeakMiB!)} MiB; decrypt ${decrypt.opsPerSec}/s p99 ${decrypt.p99Ms} ms ${decrypt.cpuUsPerCall} us/call; encrypt ${encrypt.opsPerSec}/s p99 ${encrypt.p99Ms} ms ${encrypt.cpuUsPerCall} us/call (load ${loadAverage()})`,
          );
        } finally {
          await plugin.stop();
          await rm(dir, { recursive: true, force: true });
        }
      }
      result[configuration] = rows;
    }
  } finally {
    await rm(cache, { recursive: true, force: true });
  }
  result.loadAtEnd = loadAverage();
  return result;
}
