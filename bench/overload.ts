/**
 * Overload scenario (`npm run bench -- --scenario overload [--json] [--out FILE]`):
 * `trousseau serve --config` in its own process against the real test servers of
 * test/servers/up.sh — OpenBao transit (vault), local-kms (aws) and a local key file,
 * quorum 2 (test/servers/trousseau.yaml without the Azure stand-in, which the
 * default `up.sh openbao local-kms moto` does not start).
 *
 *   peak      the plugin's best throughput in this run: closed-loop Encrypt, then
 *             Decrypt, 32 callers for 5 s each (OK/s).
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
 * BENCH_PLUGIN_ROOT=<folder> runs the plugin from another checkout (e.g. the code
 * before admission control, for the comparison in docs/performance.md).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { status as grpcStatus } from '@grpc/grpc-js';
import { generateKeyFile } from '../src/backends/local.ts';
import { call, clientsFor } from '../src/cli/client.ts';
import type * as T from '../src/kms/types.ts';
import { pluginNodeArgs } from './plugin-node-args.ts';

const root = path.resolve(import.meta.dirname, '..');
const pluginRoot = process.env.BENCH_PLUGIN_ROOT ? path.resolve(process.env.BENCH_PLUGIN_ROOT) : root;
const BURST = Number(process.env.BENCH_OVERLOAD_BURST ?? 5000);
const DEADLINE_MS = 3000;
const PEAK_CALLERS = 32;
const PEAK_SECONDS = 5;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const round1 = (x: number) => Math.round(x * 10) / 10;
const loadAverage = () =>
  os
    .loadavg()
    .map((x) => x.toFixed(2))
    .join(' / ');

function serverEnv(name: string): Record<string, string> {
  const file = path.join(root, '.servers', 'env', `${name}.env`);
  if (!existsSync(file)) throw new Error(`the ${name} test server is not running: bash test/servers/up.sh openbao local-kms`);
  const vars: Record<string, string> = {};
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    const eq = line.indexOf('=');
    if (eq > 0) vars[line.slice(0, eq)] = line.slice(eq + 1);
  }
  return vars;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

function rssMiB(pid: number): number {
  const kb = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? NaN);
  return round1(kb / 1024);
}

async function startPlugin(dir: string): Promise<{ child: ChildProcess; socket: string; metricsUrl: string }> {
  const vault = serverEnv('openbao');
  const kms = serverEnv('local-kms');
  await generateKeyFile(path.join(dir, 'local.key'));
  const socket = path.join(dir, 'kms.sock');
  const port = await freePort();
  // test/servers/trousseau.yaml, minus the Azure stand-in.
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
  backends: { name: string; breaker: string; probeOk?: boolean }[];
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

interface BurstResult {
  calls: number;
  ok: number;
  refusedOverloaded: number;
  deadlineExceeded: number;
  otherErrors: number;
  otherExamples: string[];
  goodputPerSecond: number;
  /** Goodput as a share of the same operation's peak, in percent. */
  goodputOfPeakPercent: number;
  okLatencyMs: { p50: number | null; p99: number | null; max: number | null };
  refusalLatencyMs: { p50: number | null; p99: number | null; max: number | null };
  /** Time from the first send to the last answer of any kind. */
  drainMs: number;
  backendCalls: Record<string, number>;
  shed: number;
  /** What the plugin itself answered, by gRPC code (its request metrics). */
  pluginAnswered: Record<string, number>;
  rssPeakMiB: number;
}

/** `BURST` calls at once, each with a 3 s deadline. */
async function burst(pid: number, metricsUrl: string, operation: 'wrap' | 'unwrap', peakPerSecond: number, fire: (i: number) => Promise<unknown>): Promise<BurstResult> {
  const backendsBefore = await Promise.all(['vault', 'aws', 'local'].map((b) => metricSum(metricsUrl, 'trousseau_backend_requests_total', { backend: b, operation })));
  const shedBefore = await metricSum(metricsUrl, 'trousseau_overload_shed_total');
  const method = operation === 'wrap' ? 'Encrypt' : 'Decrypt';
  const codes = ['OK', 'UNAVAILABLE', 'DEADLINE_EXCEEDED', 'CANCELLED'];
  const answeredBefore = await Promise.all(codes.map((code) => metricSum(metricsUrl, 'trousseau_kms_requests_total', { api: 'v2', method, code })));
  let rssPeak = rssMiB(pid);
  const sampler = setInterval(() => (rssPeak = Math.max(rssPeak, rssMiB(pid))), 100);
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
  clearInterval(sampler);
  await sleep(200);
  const backendsAfter = await Promise.all(['vault', 'aws', 'local'].map((b) => metricSum(metricsUrl, 'trousseau_backend_requests_total', { backend: b, operation })));
  okLatencies.sort((a, b) => a - b);
  refusalLatencies.sort((a, b) => a - b);
  const goodput = okLatencies.length === 0 ? 0 : Math.round(okLatencies.length / ((lastOkAt - started) / 1000));
  return {
    calls: BURST,
    ok: okLatencies.length,
    refusedOverloaded: refusalLatencies.length,
    deadlineExceeded,
    otherErrors: other.length,
    otherExamples: [...new Set(other)].slice(0, 3),
    goodputPerSecond: goodput,
    goodputOfPeakPercent: Math.round((goodput / Math.max(1, peakPerSecond)) * 100),
    okLatencyMs: { p50: pct(okLatencies, 50), p99: pct(okLatencies, 99), max: pct(okLatencies, 100) },
    refusalLatencyMs: { p50: pct(refusalLatencies, 50), p99: pct(refusalLatencies, 99), max: pct(refusalLatencies, 100) },
    drainMs: Math.round(lastAnswerAt - started),
    backendCalls: Object.fromEntries(['vault', 'aws', 'local'].map((b, i) => [b, backendsAfter[i]! - backendsBefore[i]!])),
    shed: (await metricSum(metricsUrl, 'trousseau_overload_shed_total')) - shedBefore,
    pluginAnswered: Object.fromEntries(
      await Promise.all(codes.map(async (code, i) => [code, (await metricSum(metricsUrl, 'trousseau_kms_requests_total', { api: 'v2', method, code })) - answeredBefore[i]!])),
    ) as Record<string, number>,
    rssPeakMiB: rssPeak,
  };
}

export async function runOverload(): Promise<Record<string, unknown>> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'trousseau-overload-'));
  const { child, socket, metricsUrl } = await startPlugin(dir);
  const pid = child.pid!;
  // One channel for the load, as an apiserver has; another for admin Status, so the
  // bench can still read breakers and the key_id while the load channel is flooded.
  const clients = clientsFor(socket);
  const adminClients = clientsFor(socket);
  const result: Record<string, unknown> = {
    load: loadAverage(),
    backends: 'vault (OpenBao transit), aws (local-kms), local; quorum 2',
    pluginRoot: pluginRoot === root ? 'this checkout' : 'BENCH_PLUGIN_ROOT',
    burst: BURST,
    deadlineMs: DEADLINE_MS,
  };
  const encrypt = (i: number, deadline = DEADLINE_MS) =>
    call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext: randomBytes(32), uid: `ov-${i}` }, deadline);
  const decrypt = (e: T.V2EncryptResponse, deadline = DEADLINE_MS) =>
    call<T.V2DecryptRequest, T.V2DecryptResponse>(clients.v2, 'Decrypt', { ciphertext: e.ciphertext, key_id: e.key_id, annotations: e.annotations, uid: 'ov' }, deadline);
  try {
    // Wait until every backend answered its first probe.
    for (let tries = 0; ; tries++) {
      const view = await adminView(adminClients).catch(() => undefined);
      if (view && view.backends.every((b) => b.probeOk === true)) break;
      if (tries > 100) throw new Error(`backends not healthy: ${JSON.stringify(view?.backends)}`);
      await sleep(200);
    }
    await peak(16, 1, (i) => encrypt(i, 10_000)); // warm-up: connections, JIT, latency windows
    const envelopes: T.V2EncryptResponse[] = [];
    const peakEncrypt = await peak(PEAK_CALLERS, PEAK_SECONDS, async (i) => {
      const e = await encrypt(i, 10_000);
      if (envelopes.length < BURST) envelopes.push(e);
    });
    // Distinct envelopes for the cold Decrypt burst (and the Decrypt peak).
    while (envelopes.length < BURST) {
      await Promise.all(Array.from({ length: 32 }, (_, i) => encrypt(i, 10_000).then((e) => void (envelopes.length < BURST && envelopes.push(e)), () => undefined)));
    }
    const peakDecrypt = await peak(PEAK_CALLERS, PEAK_SECONDS, (i) => decrypt(envelopes[i % envelopes.length]!, 10_000));
    result.peak = { callers: PEAK_CALLERS, seconds: PEAK_SECONDS, encryptPerSecond: peakEncrypt.okPerSecond, decryptPerSecond: peakDecrypt.okPerSecond, errors: peakEncrypt.errors + peakDecrypt.errors };
    console.error(`overload peak: Encrypt ${peakEncrypt.okPerSecond}/s, Decrypt ${peakDecrypt.okPerSecond}/s  (load ${loadAverage()})`);

    await sleep(3000);
    const before = await adminView(adminClients);
    const rssBefore = rssMiB(pid);
    result.before = { rssMiB: rssBefore, keyId: before.keyId, partial: before.partial, breakers: Object.fromEntries(before.backends.map((b) => [b.name, b.breaker])) };

    const breakerStates = new Map<string, Set<string>>();
    const watch = setInterval(() => {
      void adminView(adminClients).then(
        (v) => v.backends.forEach((b) => (breakerStates.get(b.name) ?? breakerStates.set(b.name, new Set()).get(b.name)!).add(b.breaker)),
        () => undefined,
      );
    }, 250);

    const enc = await burst(pid, metricsUrl, 'wrap', peakEncrypt.okPerSecond, (i) => encrypt(i));
    result.encryptBurst = enc;
    console.error(
      `overload Encrypt burst: ok ${enc.ok}, refused ${enc.refusedOverloaded}, deadline ${enc.deadlineExceeded}, other ${enc.otherErrors}; goodput ${enc.goodputPerSecond}/s = ${enc.goodputOfPeakPercent} % of peak; ok max ${enc.okLatencyMs.max} ms; refusal p99 ${enc.refusalLatencyMs.p99} ms; wraps ${JSON.stringify(enc.backendCalls)}; RSS peak ${enc.rssPeakMiB} MiB  (load ${loadAverage()})`,
    );
    await sleep(2000);
    const dec = await burst(pid, metricsUrl, 'unwrap', peakDecrypt.okPerSecond, (i) => decrypt(envelopes[i]!));
    result.decryptBurst = dec;
    console.error(
      `overload Decrypt burst: ok ${dec.ok}, refused ${dec.refusedOverloaded}, deadline ${dec.deadlineExceeded}, other ${dec.otherErrors}; goodput ${dec.goodputPerSecond}/s = ${dec.goodputOfPeakPercent} % of peak; ok max ${dec.okLatencyMs.max} ms; refusal p99 ${dec.refusalLatencyMs.p99} ms; unwraps ${JSON.stringify(dec.backendCalls)}; RSS peak ${dec.rssPeakMiB} MiB  (load ${loadAverage()})`,
    );
    clearInterval(watch);

    await sleep(10_000);
    const after = await adminView(adminClients);
    const rssAfter = rssMiB(pid);
    result.after = { rssMiB: rssAfter, keyId: after.keyId, partial: after.partial, breakers: Object.fromEntries(after.backends.map((b) => [b.name, b.breaker])) };
    result.breakerStatesSeen = Object.fromEntries([...breakerStates].map(([name, states]) => [name, [...states]]));
    result.checks = {
      encryptGoodputAtLeast80PercentOfPeak: enc.goodputOfPeakPercent >= 80,
      decryptGoodputAtLeast80PercentOfPeak: dec.goodputOfPeakPercent >= 80,
      everyAdmittedCallBeforeDeadline: enc.deadlineExceeded === 0 && dec.deadlineExceeded === 0 && (enc.okLatencyMs.max ?? 0) < DEADLINE_MS && (dec.okLatencyMs.max ?? 0) < DEADLINE_MS,
      breakersStayedClosed: [...breakerStates.values()].every((s) => s.size === 1 && s.has('closed')),
      rssPeakUnder400MiB: Math.max(enc.rssPeakMiB, dec.rssPeakMiB) < 400,
      rssBackWithin20Percent: rssAfter <= rssBefore * 1.2,
      keyIdUnchanged: after.keyId === before.keyId && !after.partial,
    };
    console.error(`overload after settling: RSS ${rssBefore} -> ${rssAfter} MiB; key_id ${after.keyId === before.keyId ? 'unchanged' : 'CHANGED'}; breakers seen ${JSON.stringify(result.breakerStatesSeen)}`);
    console.error(`overload checks: ${JSON.stringify(result.checks)}`);
  } finally {
    clients.close();
    adminClients.close();
    child.kill('SIGTERM');
    await new Promise((r) => (child.exitCode === null ? child.once('exit', r) : r(undefined)));
    await rm(dir, { recursive: true, force: true });
  }
  return result;
}
