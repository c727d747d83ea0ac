/**
 * Overload scenario (`npm run bench -- --scenario overload [--json] [--out FILE]`):
 * `trousseau serve --config` in its own process against the real test servers of
 * test/servers/up.sh — OpenBao transit (vault), local-kms (aws) and a local key file,
 * quorum 2 (test/servers/trousseau.yaml without Azure: lowkey-vault, which
 * `up.sh openbao local-kms moto` does not start, would measure the emulator's RSA work).
 *
 *   peak      the plugin's best throughput in this run: closed-loop Encrypt, then
 *             Decrypt, 5 s each (OK/s); with the Go client at 32 callers and at 224
 *             (the default admission bound, 32 in flight + 192 waiting), the better of
 *             the two: the plugin does more per second with more calls in flight (more
 *             backend calls overlap), so 32 callers alone understate its peak and
 *             flatter a burst's goodput.
 *   encrypt   5,000 Encrypts sent at once, 3 s deadline each.
 *   decrypt   5,000 Decrypts of 5,000 distinct envelopes sent at once, 3 s deadline
 *             (cold: every one needs a real unwrap; the plugin caches nothing).
 *   settle    10 s idle.
 *
 * Per burst: OK, refused ("overloaded" UNAVAILABLE), DEADLINE_EXCEEDED and other
 * errors; goodput = OK / (time from the first send to the last OK answer), against the
 * peak of the same operation; latency of OK answers and of refusals; backend calls made
 * (from the plugin's /metrics); the plugin's RSS before, at its peak (sampled every
 * 100 ms) and after settling; breaker states and the key_id before and after (admin
 * Status over the socket).
 *
 * The client is bench/goload by default (grpc-go and the k8s.io/kms types on one
 * connection, as kube-apiserver): `--client node` measures peak and bursts from this
 * Node process instead (one channel). The envelopes for the Decrypt burst are made by
 * this process either way. Each target gets a PASS / FAIL line at the end.
 *
 * BENCH_OVERLOAD_BURST=<n> sets the burst size (default 5000); BENCH_OVERLOAD_STREAMS=<n>
 * the plugin's per-connection stream bound (default: the plugin's own default, 256);
 * BENCH_OVERLOAD_HOLD=<ms> how long a refusal holds its stream (connections.refusalHoldMs;
 * default: the plugin's own default, 200; 0 answers refusals at once, as before).
 * BENCH_PLUGIN_ROOT=<folder> runs the plugin from another checkout (e.g. the code
 * before admission control, for the comparison in docs/performance.md).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { status as grpcStatus } from '@grpc/grpc-js';
import { generateKeyFile } from '../src/backends/local.ts';
import { call, clientsFor } from '../src/cli/client.ts';
import type * as T from '../src/kms/types.ts';
import { goAvailable, goloadBinary } from './goload-binary.ts';
import { pluginNodeArgs } from './plugin-node-args.ts';
import { cpuSeconds, freePort, loadAverage, rssMiB, serverEnv } from './process-stats.ts';

const root = path.resolve(import.meta.dirname, '..');
const pluginRoot = process.env.BENCH_PLUGIN_ROOT ? path.resolve(process.env.BENCH_PLUGIN_ROOT) : root;
const BURST = Number(process.env.BENCH_OVERLOAD_BURST ?? 5000);
/** Per-connection stream bound for the plugin (connections.maxConcurrentStreams); default: the plugin's own default. */
const STREAMS = process.env.BENCH_OVERLOAD_STREAMS ? Number(process.env.BENCH_OVERLOAD_STREAMS) : undefined;
/** How long a refusal holds its stream (connections.refusalHoldMs); default: the plugin's own default. */
const HOLD = process.env.BENCH_OVERLOAD_HOLD ? Number(process.env.BENCH_OVERLOAD_HOLD) : undefined;
const DEADLINE_MS = 3000;
const PEAK_CALLERS = 32;
/** A peak measurement; with the Go client, one run per number of callers. */
interface PeakResult {
  okPerSecond: number;
  errors: number;
  runs?: { callers: number; okPerSecond: number; errors: number; clientCpuSeconds?: number }[];
}
/** Closed-loop callers the Go client's peak is measured with; the best counts. */
const GO_PEAK_CALLERS = [32, 224];
const PEAK_SECONDS = 5;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const round1 = (x: number) => Math.round(x * 10) / 10;
async function startPlugin(dir: string): Promise<{ child: ChildProcess; socket: string; metricsUrl: string }> {
  const vault = serverEnv('openbao');
  const kms = serverEnv('local-kms');
  await generateKeyFile(path.join(dir, 'local.key'));
  const socket = path.join(dir, 'kms.sock');
  const port = await freePort();
  // test/servers/trousseau.yaml, minus Azure (see the header).
  const config = {
    socket: { path: socket },
    quorum: 2,
    backends: [
      {
        name: 'vault',
        type: 'vault',
        priority: 10,
        timeoutMs: 1000,
        address: vault.VAULT_ADDR,
        keyName: vault.VAULT_KEY_NAME,
        auth: { method: 'approle', roleIdFile: vault.VAULT_APPROLE_ROLE_ID_FILE, secretIdFile: vault.VAULT_APPROLE_SECRET_ID_FILE },
      },
      { name: 'aws', type: 'aws', priority: 20, timeoutMs: 1000, keyId: kms.LOCAL_KMS_KEY_ARN, region: kms.LOCAL_KMS_REGION, endpoint: kms.LOCAL_KMS_ENDPOINT },
      { name: 'local', type: 'local', priority: 90, keyFile: 'local.key' },
    ],
    health: { probeIntervalMs: 1000, minBackoffMs: 500, maxBackoffMs: 2000 },
    http: { listen: `127.0.0.1:${port}` },
    log: { level: 'error' },
    connections: { ...(STREAMS === undefined ? {} : { maxConcurrentStreams: STREAMS }), ...(HOLD === undefined ? {} : { refusalHoldMs: HOLD }) },
  };
  await writeFile(path.join(dir, 'config.yaml'), JSON.stringify(config));
  const child = spawn(process.execPath, [...pluginNodeArgs(root), path.join(pluginRoot, 'src/main.ts'), 'serve', '--config', path.join(dir, 'config.yaml')], {
    stdio: ['ignore', 'ignore', 'inherit'],
    env: {
      ...process.env,
      AWS_ACCESS_KEY_ID: kms.LOCAL_KMS_ACCESS_KEY_ID,
      AWS_SECRET_ACCESS_KEY: kms.LOCAL_KMS_SECRET_ACCESS_KEY,
      AWS_EC2_METADATA_DISABLED: 'true',
    },
  });
  const deadline = Date.now() + 30_000;
  while (!existsSync(socket)) {
    if (Date.now() > deadline || child.exitCode !== null) throw new Error('plugin did not start');
    await sleep(50);
  }
  return { child, socket, metricsUrl: `http://127.0.0.1:${port}/metrics` };
}

/** Sum of a metric's samples whose labels contain every `labels` pair. */
async function metricSum(url: string, name: string, labels: Record<string, string> = {}): Promise<number> {
  const text = await (await fetch(url)).text();
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    if (Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`))) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return sum;
}

interface AdminView {
  keyId: string;
  partial: boolean;
  missing?: string[];
  backends: { name: string; breaker: string; probeOk?: boolean; lastError?: string }[];
}

/** What the report keeps of an admin view: key_id, what it lacks, breakers, each backend's last error. */
function snapshot(view: AdminView) {
  return {
    keyId: view.keyId,
    partial: view.partial,
    missing: view.missing ?? [],
    breakers: Object.fromEntries(view.backends.map((b) => [b.name, b.breaker])),
    lastErrors: Object.fromEntries(view.backends.map((b) => [b.name, b.lastError ?? null])),
  };
}

type Clients = ReturnType<typeof clientsFor>;

async function adminView(clients: Clients): Promise<AdminView> {
  return JSON.parse((await call<object, T.AdminStatusResponse>(clients.admin, 'Status', {}, 10_000)).status_json) as AdminView;
}

const pct = (sorted: number[], p: number) => (sorted.length === 0 ? null : round1(sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!));

/** Closed loop: `callers` callers for `seconds`; OK answers per second. */
async function peak(callers: number, seconds: number, fire: (i: number) => Promise<unknown>): Promise<{ okPerSecond: number; errors: number }> {
  let ok = 0;
  let errors = 0;
  let i = 0;
  const stopAt = performance.now() + seconds * 1000;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: callers }, async () => {
      while (performance.now() < stopAt) {
        try {
          await fire(i++);
          ok++;
        } catch {
          errors++;
        }
      }
    }),
  );
  return { okPerSecond: Math.round(ok / ((performance.now() - started) / 1000)), errors };
}

/** What the client saw of one burst. */
interface BurstClientResult {
  ok: number;
  refusedOverloaded: number;
  deadlineExceeded: number;
  otherErrors: number;
  otherExamples: string[];
  /** OK answers / (first send to last OK answer). */
  goodputPerSecond: number;
  okLatencyMs: { p50: number | null; p99: number | null; max: number | null };
  refusalLatencyMs: { p50: number | null; p99: number | null; max: number | null };
  /** Time from the first send to the last answer of any kind. */
  drainMs: number;
  /** The Go client's own CPU during the burst (absent with the Node client, which runs in this process). */
  clientCpuSeconds?: number;
}

interface BurstResult extends BurstClientResult {
  calls: number;
  client: 'go' | 'node';
  /** Goodput as a share of the same operation's peak, in percent. */
  goodputOfPeakPercent: number;
  backendCalls: Record<string, number>;
  shed: number;
  /** What the plugin itself answered, by gRPC code (its request metrics). */
  pluginAnswered: Record<string, number>;
  rssPeakMiB: number;
  /** The plugin's CPU time during the burst, and per call of the burst (each refusal costs gRPC work too). */
  pluginCpuSeconds: number;
  pluginCpuUsPerCall: number;
  load: string;
}

/** Node client: `BURST` calls at once on one channel, each with a 3 s deadline. */
async function nodeBurst(fire: (i: number) => Promise<unknown>): Promise<BurstClientResult> {
  const okLatencies: number[] = [];
  const refusalLatencies: number[] = [];
  let deadlineExceeded = 0;
  const other: string[] = [];
  let lastOkAt = 0;
  let lastAnswerAt = 0;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: BURST }, async (_, i) => {
      const t0 = performance.now();
      try {
        await fire(i);
        lastOkAt = performance.now();
        okLatencies.push(lastOkAt - t0);
      } catch (error) {
        const { code, details } = error as { code: grpcStatus; details: string };
        if (code === grpcStatus.UNAVAILABLE && /overloaded/.test(details)) refusalLatencies.push(performance.now() - t0);
        else if (code === grpcStatus.DEADLINE_EXCEEDED) deadlineExceeded++;
        else other.push(`${grpcStatus[code] ?? code}: ${String(details).slice(0, 160)}`);
      } finally {
        lastAnswerAt = performance.now();
      }
    }),
  );
  okLatencies.sort((a, b) => a - b);
  refusalLatencies.sort((a, b) => a - b);
  return {
    ok: okLatencies.length,
    refusedOverloaded: refusalLatencies.length,
    deadlineExceeded,
    otherErrors: other.length,
    otherExamples: [...new Set(other)].slice(0, 3),
    goodputPerSecond: okLatencies.length === 0 ? 0 : Math.round(okLatencies.length / ((lastOkAt - started) / 1000)),
    okLatencyMs: { p50: pct(okLatencies, 50), p99: pct(okLatencies, 99), max: pct(okLatencies, 100) },
    refusalLatencyMs: { p50: pct(refusalLatencies, 50), p99: pct(refusalLatencies, 99), max: pct(refusalLatencies, 100) },
    drainMs: Math.round(lastAnswerAt - started),
  };
}

/** Run bench/goload with `args`; its one line of JSON. Asynchronous: this process keeps sampling meanwhile. */
function goload(args: string[]): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    execFile(goloadBinary(), args, { maxBuffer: 16 * 1024 * 1024 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`goload ${args.join(' ')} failed: ${stderr || error.message}`));
      else resolve(JSON.parse(stdout) as Record<string, unknown>);
    });
  });
}

/** Go client: `BURST` calls at once on one grpc-go connection, each with a 3 s deadline. */
async function goBurst(socket: string, operation: 'encrypt' | 'decrypt', envelopeFile: string | undefined): Promise<BurstClientResult> {
  const args = ['-socket', socket, '-op', operation, '-burst', String(BURST), '-deadline-ms', String(DEADLINE_MS)];
  if (envelopeFile) args.push('-envelopes', envelopeFile);
  const r = (await goload(args)) as unknown as BurstClientResult;
  const times = (t: BurstClientResult['okLatencyMs']) => ({ p50: t.p50 === null ? null : round1(t.p50), p99: t.p99 === null ? null : round1(t.p99), max: t.max === null ? null : round1(t.max) });
  return { ...r, okLatencyMs: times(r.okLatencyMs), refusalLatencyMs: times(r.refusalLatencyMs) };
}

/** One burst, with what the plugin did meanwhile (backend calls, its own answers, RSS). */
async function burst(pid: number, metricsUrl: string, operation: 'wrap' | 'unwrap', peakPerSecond: number, client: 'go' | 'node', run: () => Promise<BurstClientResult>): Promise<BurstResult> {
  const backendsBefore = await Promise.all(['vault', 'aws', 'local'].map((b) => metricSum(metricsUrl, 'trousseau_backend_requests_total', { backend: b, operation })));
  const shedBefore = await metricSum(metricsUrl, 'trousseau_overload_shed_total');
  const method = operation === 'wrap' ? 'Encrypt' : 'Decrypt';
  const codes = ['OK', 'UNAVAILABLE', 'DEADLINE_EXCEEDED', 'CANCELLED', 'RESOURCE_EXHAUSTED'];
  const answeredBefore = await Promise.all(codes.map((code) => metricSum(metricsUrl, 'trousseau_kms_requests_total', { api: 'v2', method, code })));
  const load = loadAverage();
  let rssPeak = rssMiB(pid);
  const sampler = setInterval(() => (rssPeak = Math.max(rssPeak, rssMiB(pid))), 100);
  const cpuBefore = cpuSeconds(pid);
  const seen = await run().finally(() => clearInterval(sampler));
  const cpu = cpuSeconds(pid) - cpuBefore;
  await sleep(200);
  const backendsAfter = await Promise.all(['vault', 'aws', 'local'].map((b) => metricSum(metricsUrl, 'trousseau_backend_requests_total', { backend: b, operation })));
  return {
    calls: BURST,
    client,
    ...seen,
    goodputOfPeakPercent: Math.round((seen.goodputPerSecond / Math.max(1, peakPerSecond)) * 100),
    backendCalls: Object.fromEntries(['vault', 'aws', 'local'].map((b, i) => [b, backendsAfter[i]! - backendsBefore[i]!])),
    shed: (await metricSum(metricsUrl, 'trousseau_overload_shed_total')) - shedBefore,
    pluginAnswered: Object.fromEntries(
      await Promise.all(codes.map(async (code, i) => [code, (await metricSum(metricsUrl, 'trousseau_kms_requests_total', { api: 'v2', method, code })) - answeredBefore[i]!])),
    ) as Record<string, number>,
    rssPeakMiB: rssPeak,
    pluginCpuSeconds: Math.round(cpu * 100) / 100,
    pluginCpuUsPerCall: Math.round((cpu * 1e6) / BURST),
    load,
  };
}

export interface OverloadOptions {
  /** go (default: bench/goload, as kube-apiserver) or node (this process). */
  client?: string;
}

/** One line per target: what was required, what was measured, PASS or FAIL. */
function verdicts(checks: Record<string, { ok: boolean; detail: string }>): string[] {
  return Object.entries(checks).map(([target, { ok, detail }]) => `  ${ok ? 'PASS' : 'FAIL'}  ${target}: ${detail}`);
}

export async function runOverload(options: OverloadOptions = {}): Promise<Record<string, unknown>> {
  if (options.client !== undefined && options.client !== 'go' && options.client !== 'node') throw new Error(`--client must be go or node, not ${options.client}`);
  let client: 'go' | 'node' = options.client === 'node' ? 'node' : 'go';
  if (client === 'go' && !goAvailable()) {
    console.error('overload: no Go toolchain found; measuring with the Node client instead (see --client)');
    client = 'node';
  }
  if (client === 'go') goloadBinary(); // build before the plugin starts, not while it is measured
  const dir = await mkdtemp(path.join(os.tmpdir(), 'trousseau-overload-'));
  const { child, socket, metricsUrl } = await startPlugin(dir);
  const pid = child.pid!;
  // One channel for the load, as an apiserver has; another for admin Status, so the
  // bench can still read breakers and the key_id while the load channel is flooded.
  const clients = clientsFor(socket);
  const adminClients = clientsFor(socket);
  const result: Record<string, unknown> = {
    load: loadAverage(),
    client: client === 'go' ? 'go (bench/goload: grpc-go, k8s.io/kms, one connection)' : 'node (one channel)',
    backends: 'vault (OpenBao transit), aws (local-kms), local; quorum 2',
    pluginRoot: pluginRoot === root ? 'this checkout' : 'BENCH_PLUGIN_ROOT',
    burst: BURST,
    deadlineMs: DEADLINE_MS,
    maxConcurrentStreams: STREAMS ?? 'default',
    refusalHoldMs: HOLD ?? 'default',
  };
  const encrypt = (i: number, deadline = DEADLINE_MS) =>
    call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext: randomBytes(32), uid: `ov-${i}` }, deadline);
  const decrypt = (e: T.V2EncryptResponse, deadline = DEADLINE_MS) =>
    call<T.V2DecryptRequest, T.V2DecryptResponse>(clients.v2, 'Decrypt', { ciphertext: e.ciphertext, key_id: e.key_id, annotations: e.annotations, uid: 'ov' }, deadline);
  const goPeak = async (operation: 'encrypt' | 'decrypt', envelopeFile?: string): Promise<PeakResult> => {
    const runs: NonNullable<PeakResult['runs']> = [];
    for (const callers of GO_PEAK_CALLERS) {
      const r = await goload(['-socket', socket, '-op', operation, '-concurrency', String(callers), '-seconds', String(PEAK_SECONDS), ...(envelopeFile ? ['-envelopes', envelopeFile] : [])]);
      runs.push({ callers, okPerSecond: Number(r.opsPerSec), errors: Number(r.errors), clientCpuSeconds: round1(Number(r.clientCpuSeconds)) });
    }
    const best = runs.reduce((a, b) => (b.okPerSecond > a.okPerSecond ? b : a));
    return { okPerSecond: best.okPerSecond, errors: runs.reduce((sum, r) => sum + r.errors, 0), runs };
  };
  try {
    // Wait until every backend answered its first probe.
    for (let tries = 0; ; tries++) {
      const view = await adminView(adminClients).catch(() => undefined);
      if (view && view.backends.every((b) => b.probeOk === true)) break;
      if (tries > 100) throw new Error(`backends not healthy: ${JSON.stringify(view?.backends)}`);
      await sleep(200);
    }
    result.initial = snapshot(await adminView(adminClients)); // before the peak phase (its load can move the key_id too)
    await peak(16, 1, (i) => encrypt(i, 10_000)); // warm-up: connections, JIT, latency windows
    const envelopes: T.V2EncryptResponse[] = [];
    const peakEncrypt: PeakResult =
      client === 'go'
        ? await goPeak('encrypt')
        : await peak(PEAK_CALLERS, PEAK_SECONDS, async (i) => {
            const e = await encrypt(i, 10_000);
            if (envelopes.length < BURST) envelopes.push(e);
          });
    // Distinct envelopes for the cold Decrypt burst (and the Node client's Decrypt peak).
    while (envelopes.length < BURST) {
      await Promise.all(Array.from({ length: 32 }, (_, i) => encrypt(i, 10_000).then((e) => void (envelopes.length < BURST && envelopes.push(e)), () => undefined)));
    }
    const envelopeFile = path.join(dir, 'envelopes.jsonl');
    await writeFile(
      envelopeFile,
      envelopes
        .map((e) =>
          JSON.stringify({
            ciphertext: Buffer.from(e.ciphertext).toString('base64'),
            key_id: e.key_id,
            annotations: Object.fromEntries(Object.entries(e.annotations ?? {}).map(([k, v]) => [k, Buffer.from(v).toString('base64')])),
          }),
        )
        .join('\n'),
    );
    // The same distinct envelopes as the burst: repeating one envelope measured a higher peak than distinct ones reach.
    const peakDecrypt: PeakResult = client === 'go' ? await goPeak('decrypt', envelopeFile) : await peak(PEAK_CALLERS, PEAK_SECONDS, (i) => decrypt(envelopes[i % envelopes.length]!, 10_000));
    result.peak = { callers: client === 'go' ? GO_PEAK_CALLERS : PEAK_CALLERS, seconds: PEAK_SECONDS, encryptRuns: peakEncrypt.runs, decryptRuns: peakDecrypt.runs, encryptPerSecond: peakEncrypt.okPerSecond, decryptPerSecond: peakDecrypt.okPerSecond, errors: peakEncrypt.errors + peakDecrypt.errors, load: loadAverage() };
    const byCallers = (p: PeakResult) => (p.runs ? ` (${p.runs.map((r) => `${r.callers} callers ${r.okPerSecond}/s, client CPU ${r.clientCpuSeconds} s`).join(', ')})` : '');
    console.error(`overload peak (${client} client): Encrypt ${peakEncrypt.okPerSecond}/s${byCallers(peakEncrypt)}, Decrypt ${peakDecrypt.okPerSecond}/s${byCallers(peakDecrypt)}  (load ${loadAverage()})`);

    await sleep(3000);
    const before = await adminView(adminClients);
    const rssBefore = rssMiB(pid);
    result.before = { rssMiB: rssBefore, ...snapshot(before) };

    const breakerStates = new Map<string, Set<string>>();
    const keyIdsSeen = new Set<string>([`${before.keyId}${before.partial ? ' (partial)' : ''}`]);
    const watch = setInterval(() => {
      void adminView(adminClients).then(
        (v) => {
          v.backends.forEach((b) => (breakerStates.get(b.name) ?? breakerStates.set(b.name, new Set()).get(b.name)!).add(b.breaker));
          keyIdsSeen.add(`${v.keyId}${v.partial ? ' (partial)' : ''}`);
        },
        () => undefined,
      );
    }, 250);

    const line = (name: string, b: BurstResult, calls: string) =>
      `overload ${name} burst: ok ${b.ok}, refused ${b.refusedOverloaded}, deadline ${b.deadlineExceeded}, other ${b.otherErrors}; goodput ${b.goodputPerSecond}/s = ${b.goodputOfPeakPercent} % of peak; ok p50/max ${b.okLatencyMs.p50}/${b.okLatencyMs.max} ms; refusal p50/p99 ${b.refusalLatencyMs.p50}/${b.refusalLatencyMs.p99} ms; ${calls} ${JSON.stringify(b.backendCalls)}; plugin answered ${JSON.stringify(b.pluginAnswered)}; plugin CPU ${b.pluginCpuSeconds} s (${b.pluginCpuUsPerCall} µs per call)${b.clientCpuSeconds === undefined ? '' : `, client CPU ${round1(b.clientCpuSeconds)} s`}; RSS peak ${b.rssPeakMiB} MiB  (load ${b.load})`;
    const enc = await burst(pid, metricsUrl, 'wrap', peakEncrypt.okPerSecond, client, () => (client === 'go' ? goBurst(socket, 'encrypt', undefined) : nodeBurst((i) => encrypt(i))));
    result.encryptBurst = enc;
    console.error(line('Encrypt', enc, 'wraps'));
    await sleep(2000);
    const dec = await burst(pid, metricsUrl, 'unwrap', peakDecrypt.okPerSecond, client, () =>
      client === 'go' ? goBurst(socket, 'decrypt', envelopeFile) : nodeBurst((i) => decrypt(envelopes[i]!)),
    );
    result.decryptBurst = dec;
    console.error(line('Decrypt', dec, 'unwraps'));
    clearInterval(watch);

    await sleep(10_000);
    const after = await adminView(adminClients);
    const rssAfter = rssMiB(pid);
    result.after = { rssMiB: rssAfter, ...snapshot(after), load: loadAverage() };
    result.breakerStatesSeen = Object.fromEntries([...breakerStates].map(([name, states]) => [name, [...states]]));
    result.keyIdsSeen = [...keyIdsSeen];
    const rssPeak = Math.max(enc.rssPeakMiB, dec.rssPeakMiB);
    // Admitted calls are the ones the plugin did work for: its OK answers and any error
    // other than a refusal. One is late if the plugin answered it with DEADLINE_EXCEEDED
    // or its OK reached the client after the client's own deadline (the plugin's OKs
    // minus the client's). A client DEADLINE_EXCEEDED for a call the plugin never saw
    // (it waited in the client for a stream) or refused is not an admitted call.
    const late = (b: BurstResult) => Math.max(0, (b.pluginAnswered.OK ?? 0) - b.ok) + (b.pluginAnswered.DEADLINE_EXCEEDED ?? 0);
    const checks = {
      'Encrypt goodput >= 80 % of peak': { ok: enc.goodputOfPeakPercent >= 80, detail: `${enc.goodputPerSecond}/s of ${peakEncrypt.okPerSecond}/s = ${enc.goodputOfPeakPercent} %` },
      'Decrypt goodput >= 80 % of peak': { ok: dec.goodputOfPeakPercent >= 80, detail: `${dec.goodputPerSecond}/s of ${peakDecrypt.okPerSecond}/s = ${dec.goodputOfPeakPercent} %` },
      'every admitted call answers before its deadline': {
        ok: late(enc) === 0 && late(dec) === 0,
        detail:
          `late admitted calls: Encrypt ${late(enc)}, Decrypt ${late(dec)} (the plugin's OKs that arrived after the client's deadline, plus its DEADLINE_EXCEEDED answers); ` +
          `DEADLINE_EXCEEDED at the client in all (most for calls that never left the client): Encrypt ${enc.deadlineExceeded}, Decrypt ${dec.deadlineExceeded}; slowest OK ${enc.okLatencyMs.max} / ${dec.okLatencyMs.max} ms`,
      },
      'breakers of healthy backends stay closed': {
        ok: [...breakerStates.values()].every((states) => states.size === 1 && states.has('closed')),
        detail: `seen ${JSON.stringify(result.breakerStatesSeen)}`,
      },
      'RSS < 400 MiB': { ok: rssPeak < 400, detail: `peak ${rssPeak} MiB` },
      'RSS back within 20 % of pre-burst': { ok: rssAfter <= rssBefore * 1.2, detail: `${rssBefore} -> ${rssAfter} MiB (${Math.round((rssAfter / rssBefore - 1) * 100)} %) 10 s after` },
      'key_id unchanged': {
        ok: after.keyId === before.keyId && !after.partial && keyIdsSeen.size === 1,
        detail: `seen ${JSON.stringify([...keyIdsSeen])}${before.partial ? ` (already partial before the bursts, missing ${JSON.stringify(before.missing)}, last errors ${JSON.stringify(snapshot(before).lastErrors)})` : ''}`,
      },
    };
    result.checks = Object.fromEntries(Object.entries(checks).map(([k, v]) => [k, v.ok]));
    console.error(`overload after settling: RSS ${rssBefore} -> ${rssAfter} MiB; key_id ${after.keyId === before.keyId ? 'unchanged' : 'CHANGED'}; breakers seen ${JSON.stringify(result.breakerStatesSeen)}  (load ${loadAverage()})`);
    console.error(`overload verdict (${client} client, ${BURST}-call bursts, load at the start ${String(result.load)}):\n${verdicts(checks).join('\n')}`);
  } finally {
    clients.close();
    adminClients.close();
    child.kill('SIGTERM');
    await new Promise((r) => (child.exitCode === null ? child.once('exit', r) : r(undefined)));
    await rm(dir, { recursive: true, force: true });
  }
  return result;
}
