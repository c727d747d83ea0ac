/**
 * Shared by the chaos scenarios and the soak: the three real backend servers (OpenBao,
 * local-kms, and lowkey-vault for Azure Key Vault), a fault proxy in front of each, a
 * plugin configured against the proxies (in-process, or as a `serve` child process),
 * gRPC clients through the CLI's own `clientsFor`, and latency/error bookkeeping.
 *
 * `servers.azureServer` names the Azure server that ran (lowkey-vault, from the env file
 * test/servers/lowkey-vault.server.sh writes) and every table prints it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { lstat, mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { runInNewContext } from 'node:vm';
import v8 from 'node:v8';
import { status as grpcStatus, type ServiceError } from '@grpc/grpc-js';
import { stringify as toYaml } from 'yaml';
import { imageNodeOptions } from '../../bench/plugin-node-args.ts';
import { call, clientsFor } from '../../src/cli/client.ts';
import { parseConfig } from '../../src/config/load.ts';
import { parseEnvelope } from '../../src/envelope/format.ts';
import { KmsServer } from '../../src/kms/server.ts';
import type * as T from '../../src/kms/types.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { Metrics } from '../../src/observability/metrics.ts';
import { Plugin } from '../../src/plugin.ts';
import { canConnect, eventually, sleep } from '../helpers/plugin-harness.ts';
import { serverEnv } from '../helpers/servers.ts';
import { FaultProxy } from './fault-proxy.ts';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const BACKENDS = ['vault', 'aws', 'azure'] as const;
export type BackendName = (typeof BACKENDS)[number];

export interface ChaosServers {
  vault: { address: string; tokenFile: string; mount: string; keyName: string };
  aws: { endpoint: string; region: string; keyArn: string; accessKeyId: string; secretAccessKey: string };
  azure: { url: string; keyName: string; caFile: string; identityEndpoint: string };
  /** Which Azure server ran ("lowkey-vault"). */
  azureServer: string;
}

/** The servers' variables, or the names of the missing servers. */
export function chaosServers(): ChaosServers | { missing: string[] } {
  const vault = serverEnv('openbao');
  const aws = serverEnv('local-kms');
  const azure = serverEnv('lowkey-vault');
  const missing = [!vault && 'openbao', !aws && 'local-kms', !azure && 'lowkey-vault'].filter((m): m is string => typeof m === 'string');
  if (!vault || !aws || !azure) return { missing };
  const need = (vars: Record<string, string>, name: string): string => {
    const value = vars[name];
    if (!value) throw new Error(`${name} missing from the server env files`);
    return value;
  };
  return {
    vault: { address: need(vault, 'VAULT_ADDR'), tokenFile: need(vault, 'VAULT_TOKEN_FILE'), mount: need(vault, 'VAULT_TRANSIT_MOUNT'), keyName: need(vault, 'VAULT_KEY_NAME') },
    aws: {
      endpoint: need(aws, 'LOCAL_KMS_ENDPOINT'),
      region: need(aws, 'LOCAL_KMS_REGION'),
      keyArn: need(aws, 'LOCAL_KMS_KEY_ARN'),
      accessKeyId: need(aws, 'LOCAL_KMS_ACCESS_KEY_ID'),
      secretAccessKey: need(aws, 'LOCAL_KMS_SECRET_ACCESS_KEY'),
    },
    // The emulator's RSA-2048 key: the rig probes every 200 ms, and RSA-4096 private-key
    // work in the emulator starved the other backends on 2 cores (lowkey-vault.server.sh).
    azure: { url: need(azure, 'AZURE_KV_URL'), keyName: need(azure, 'AZURE_KV_LIGHT_KEY_NAME'), caFile: need(azure, 'AZURE_KV_CA_FILE'), identityEndpoint: need(azure, 'AZURE_KV_IDENTITY_ENDPOINT') },
    azureServer: azure.AZURE_KV_SERVER ?? 'unknown',
  };
}

/**
 * Credentials reach the AWS and Azure backends the production way, through the
 * environment (SDK default chain; managed identity endpoint of the test server).
 */
export function backendEnv(servers: ChaosServers): Record<string, string> {
  return {
    AWS_ACCESS_KEY_ID: servers.aws.accessKeyId,
    AWS_SECRET_ACCESS_KEY: servers.aws.secretAccessKey,
    AWS_EC2_METADATA_DISABLED: 'true',
    IDENTITY_ENDPOINT: servers.azure.identityEndpoint,
    IDENTITY_HEADER: 'trousseau-chaos',
  };
}

export function applyBackendEnv(servers: ChaosServers): void {
  Object.assign(process.env, backendEnv(servers));
  delete process.env.AWS_SESSION_TOKEN;
  delete process.env.AWS_PROFILE;
}

/**
 * Names of the servers that do not accept a TCP connection. The servers are shared
 * with every other test run on the machine (and `test/run-all.sh` stops them at the
 * end), so a scenario says plainly when its server is gone rather than blame the plugin.
 */
export async function unreachableServers(servers: ChaosServers): Promise<string[]> {
  const targets: [string, string][] = [
    ['openbao', servers.vault.address],
    ['local-kms', servers.aws.endpoint],
    ['lowkey-vault', servers.azure.url],
  ];
  const results = await Promise.all(
    targets.map(
      ([name, address]) =>
        new Promise<string | undefined>((resolve) => {
          const url = new URL(address);
          const socket = net.connect({ host: url.hostname === 'localhost' ? '127.0.0.1' : url.hostname, port: Number(url.port) });
          const done = (ok: boolean) => {
            socket.destroy();
            resolve(ok ? undefined : name);
          };
          socket.setTimeout(2000, () => done(false));
          socket.once('connect', () => done(true));
          socket.once('error', () => done(false));
        }),
    ),
  );
  return results.filter((r): r is string => r !== undefined);
}

export type Proxies = Record<BackendName, FaultProxy>;

/** The per-call timeout the chaos configuration gives `backend`. */
export function timeoutOf(backend: BackendName, timing: Timing): number {
  return backend === 'azure' ? timing.azureTimeoutMs : timing.timeoutMs;
}

export async function startProxies(servers: ChaosServers): Promise<Proxies> {
  return {
    vault: await FaultProxy.start('vault', servers.vault.address),
    aws: await FaultProxy.start('aws', servers.aws.endpoint),
    azure: await FaultProxy.start('azure', servers.azure.url, { tls: true }),
  };
}

export async function closeProxies(proxies: Proxies): Promise<void> {
  await Promise.all(Object.values(proxies).map((p) => p.close()));
}

export async function passAll(proxies: Proxies): Promise<void> {
  await Promise.all(Object.values(proxies).map((p) => p.pass()));
}

export interface Timing {
  timeoutMs: number;
  /**
   * Azure's own per-call timeout. lowkey-vault does RSA-4096 private-key operations in
   * Java: on the shared 2-core machine a sign (every Encrypt) or an unwrap (Decrypt)
   * took 90 ms at p50 and 200 ms at p90, queueing under several clients, and an
   * Encrypt makes two calls (wrapKey, then sign), so 400 ms is an outage on a healthy
   * server. Real Key Vault answers in tens of milliseconds; this is the emulator's cost.
   */
  azureTimeoutMs: number;
  resetTimeoutMs: number;
  probeIntervalMs: number;
  minBackoffMs: number;
  maxBackoffMs: number;
  recoverAfterMs: number;
}

export const DEFAULT_TIMING: Timing = { timeoutMs: 400, azureTimeoutMs: 1500, resetTimeoutMs: 500, probeIntervalMs: 200, minBackoffMs: 100, maxBackoffMs: 200, recoverAfterMs: 1000 };

/** The plugin configuration (plain object, as YAML would give) pointing every backend at its proxy. */
export function chaosConfig(servers: ChaosServers, proxies: Proxies, socketPath: string, timing: Partial<Timing> = {}): Record<string, unknown> {
  const t = { ...DEFAULT_TIMING, ...timing };
  return {
    socket: { path: socketPath },
    quorum: 2,
    backends: [
      {
        name: 'vault',
        type: 'vault',
        address: `http://127.0.0.1:${proxies.vault.port}`,
        transitMount: servers.vault.mount,
        keyName: servers.vault.keyName,
        auth: { method: 'token', tokenFile: servers.vault.tokenFile },
        timeoutMs: t.timeoutMs,
      },
      {
        name: 'aws',
        type: 'aws',
        keyId: servers.aws.keyArn,
        region: servers.aws.region,
        endpoint: `http://127.0.0.1:${proxies.aws.port}`,
        timeoutMs: t.timeoutMs,
      },
      {
        name: 'azure',
        type: 'azure',
        // localhost, not 127.0.0.1: the server certificate names localhost.
        vaultUrl: `https://localhost:${proxies.azure.port}`,
        keyName: servers.azure.keyName,
        caFile: servers.azure.caFile,
        disableChallengeResourceVerification: true,
        credential: { method: 'managedIdentity' },
        timeoutMs: t.azureTimeoutMs,
      },
    ],
    // An Azure copy costs two emulator calls in a row (wrapKey, then sign): with 300 ms
    // it often missed the grace under load, and each such envelope moved the key_id to
    // a partial one naming azure, which the scenarios would misread as instability.
    // The fixed grace alone (latency factor 0): with the factor, wraps held by a
    // phase's 2 s latency tail can stay in flight past the grace and time out after
    // the phase has ended, so the next phase begins with the azure breaker's window
    // full and a backend the schedule calls "up" refusing: the likely cause of the one
    // soak failure seen here after the factor came in.
    encrypt: { deadlineMs: 2000, stragglerGraceMs: 800, stragglerLatencyFactor: 0 },
    decrypt: { deadlineMs: 2500 },
    breaker: { resetTimeoutMs: t.resetTimeoutMs, rollingWindowMs: 1000, volumeThreshold: 3, errorThresholdPercentage: 50 },
    health: { probeIntervalMs: t.probeIntervalMs, minBackoffMs: t.minBackoffMs, maxBackoffMs: t.maxBackoffMs, recoverAfterMs: t.recoverAfterMs },
    escrow: { enabled: false },
    log: { level: 'warn' },
  };
}

export type Clients = ReturnType<typeof clientsFor>;

export interface Running {
  socketPath: string;
  clients: Clients;
  plugin?: Plugin;
  stop(): Promise<void>;
}

export async function tempDir(): Promise<{ dir: string; remove: () => Promise<void> }> {
  // Short prefix: unix socket paths are limited to about 107 bytes.
  const dir = await mkdtemp(path.join(os.tmpdir(), 'trc-'));
  return { dir, remove: () => rm(dir, { recursive: true, force: true }) };
}

/** A real Plugin behind a real KmsServer, in this process. */
export async function startInProcess(configObject: Record<string, unknown>, baseDir: string): Promise<Running & { plugin: Plugin }> {
  const config = parseConfig(configObject, 'chaos configuration');
  const metrics = new Metrics();
  const logger = silentLogger();
  const plugin = await Plugin.create({ config, baseDir, logger, metrics });
  const server = new KmsServer(plugin, { path: config.socket.path, mode: config.socket.mode, group: config.socket.group }, metrics, logger);
  await plugin.start();
  await server.start();
  const clients = clientsFor(config.socket.path);
  let stopped: Promise<void> | undefined;
  return {
    socketPath: config.socket.path,
    clients,
    plugin,
    stop() {
      stopped ??= (async () => {
        clients.close();
        await server.stop(500);
        await plugin.close();
      })();
      return stopped;
    },
  };
}

export interface ChildPlugin extends Running {
  child: ChildProcess;
  readonly stderr: string;
  exited: Promise<number | null>;
}

/**
 * `trousseau serve --config FILE` as a child process, ready once its socket accepts,
 * with the Node options the container image sets: the plugin under fire is the one
 * that is deployed.
 */
export async function startChild(configObject: Record<string, unknown>, dir: string, env: Record<string, string>, name = 'chaos'): Promise<ChildPlugin> {
  const file = path.join(dir, `${name}.yaml`);
  await writeFile(file, toYaml(configObject), { mode: 0o600 });
  const socketPath = (configObject.socket as { path: string }).path;
  const child = spawn(process.execPath, [...imageNodeOptions(repoRoot), path.join(repoRoot, 'src', 'main.ts'), 'serve', '--config', file], {
    cwd: repoRoot,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-20_000)));
  let gone = false;
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => ((gone = true), resolve(code))));
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (gone) throw new Error(`serve exited early:\n${stderr}`);
    const info = await lstat(socketPath).catch(() => undefined);
    if (info?.isSocket() && (await canConnect(socketPath))) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`serve did not open its socket within 30 s:\n${stderr}`);
    }
    await sleep(50);
  }
  const clients = clientsFor(socketPath);
  let stopped: Promise<void> | undefined;
  return {
    socketPath,
    clients,
    child,
    get stderr() {
      return stderr;
    },
    exited,
    stop() {
      stopped ??= (async () => {
        clients.close();
        if (!gone) child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
        await exited;
        clearTimeout(timer);
      })();
      return stopped;
    },
  };
}


// sleep and eventually are the shared test helpers, re-exported for the chaos files.
export { eventually, sleep };

// ---------------------------------------------------------------- client calls

export type Op = 'encrypt' | 'decrypt' | 'status';

export interface Outcome<R> {
  ok: boolean;
  ms: number;
  /** gRPC status name ("OK", "UNAVAILABLE", ...). */
  code: string;
  value?: R;
  /** The status details of a failure (plugin-written, safe to log). */
  detail?: string;
}

export function grpcName(error: unknown): string {
  const code = (error as Partial<ServiceError> | null)?.code;
  return typeof code === 'number' ? (grpcStatus[code] ?? String(code)) : 'CLIENT_ERROR';
}

async function timed<R>(fn: () => Promise<R>): Promise<Outcome<R>> {
  const started = performance.now();
  try {
    const value = await fn();
    return { ok: true, ms: performance.now() - started, code: 'OK', value };
  } catch (error) {
    return { ok: false, ms: performance.now() - started, code: grpcName(error), detail: (error as Partial<ServiceError> | null)?.details };
  }
}

/** The apiserver's own deadline for KMS calls is about 3 s; clients here use it too. */
export const CALL_TIMEOUT_MS = 3000;

export function encrypt(clients: Clients, plaintext: Buffer, uid = 'chaos'): Promise<Outcome<T.V2EncryptResponse>> {
  return timed(() => call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext, uid }, CALL_TIMEOUT_MS));
}

export function decrypt(clients: Clients, encrypted: T.V2EncryptResponse, uid = 'chaos'): Promise<Outcome<Buffer>> {
  return timed(async () => {
    const response = await call<T.V2DecryptRequest, T.V2DecryptResponse>(
      clients.v2,
      'Decrypt',
      { ciphertext: encrypted.ciphertext, uid, key_id: encrypted.key_id, annotations: encrypted.annotations },
      CALL_TIMEOUT_MS,
    );
    return response.plaintext;
  });
}

export function status(clients: Clients): Promise<Outcome<T.V2StatusResponse>> {
  return timed(() => call<object, T.V2StatusResponse>(clients.v2, 'Status', {}, CALL_TIMEOUT_MS));
}

export interface AdminBackend {
  name: string;
  breaker: 'closed' | 'half-open' | 'open';
  probeOk: boolean | undefined;
  lastError?: string;
}
export interface AdminView {
  keyId: string;
  partial: boolean;
  missing: string[];
  healthy: boolean;
  backends: AdminBackend[];
}

export async function adminStatus(clients: Clients): Promise<AdminView> {
  const response = await call<object, T.AdminStatusResponse>(clients.admin, 'Status', {}, CALL_TIMEOUT_MS);
  return JSON.parse(response.status_json) as AdminView;
}

export function backendOf(view: AdminView, name: string): AdminBackend {
  const b = view.backends.find((x) => x.name === name);
  if (!b) throw new Error(`admin status lists no backend ${name}`);
  return b;
}

/** True when admin status shows the backend usable (breaker closed, last probe ok). */
export function isUp(view: AdminView, name: string): boolean {
  const b = backendOf(view, name);
  return b.breaker === 'closed' && b.probeOk === true;
}

/** Backends holding a copy in an envelope the plugin returned. */
export function copiesOf(encrypted: T.V2EncryptResponse): string[] {
  const annotations = new Map(Object.entries(encrypted.annotations ?? {}).map(([k, v]) => [k, new Uint8Array(v)]));
  return parseEnvelope(encrypted.ciphertext, annotations)
    .copies.filter((c) => c.wrapped !== undefined)
    .map((c) => c.backendName);
}

// ---------------------------------------------------------------- bookkeeping

export function percentile(values: readonly number[], p: number): number | undefined {
  if (values.length === 0) return undefined;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}

/** Operations, errors by gRPC code and latencies, per operation. */
export class Recorder {
  private readonly latencies = new Map<Op, number[]>();
  private readonly codes = new Map<Op, Map<string, number>>();
  /** A few distinct failure details per operation, for the table. */
  readonly samples = new Map<Op, Set<string>>();

  add(op: Op, outcome: Outcome<unknown>): void {
    if (!outcome.ok && outcome.detail) {
      let set = this.samples.get(op);
      if (!set) this.samples.set(op, (set = new Set()));
      if (set.size < 3) set.add(outcome.detail.replace(/\d+ ms/g, 'N ms'));
    }
    let list = this.latencies.get(op);
    if (!list) this.latencies.set(op, (list = []));
    list.push(outcome.ms);
    let codes = this.codes.get(op);
    if (!codes) this.codes.set(op, (codes = new Map<string, number>()));
    codes.set(outcome.code, (codes.get(outcome.code) ?? 0) + 1);
  }

  count(op: Op, code?: string): number {
    const codes = this.codes.get(op);
    if (!codes) return 0;
    if (code) return codes.get(code) ?? 0;
    return [...codes.values()].reduce((a, b) => a + b, 0);
  }

  errors(op: Op): Record<string, number> {
    return Object.fromEntries([...(this.codes.get(op) ?? [])].filter(([code]) => code !== 'OK'));
  }

  p(op: Op, q: number): number | undefined {
    return percentile(this.latencies.get(op) ?? [], q);
  }

  /** One line per operation: ops, errors by code, p50, p99. */
  table(title: string): string {
    const fmt = (v: number | undefined) => (v === undefined ? '-' : `${Math.round(v)}ms`);
    const rows = [...this.latencies.keys()].map((op) => {
      const errors = Object.entries(this.errors(op)).map(([c, n]) => `${c}=${n}`).join(' ') || 'none';
      return `  ${op.padEnd(8)} ops=${String(this.count(op)).padEnd(5)} errors: ${errors.padEnd(28)} p50=${fmt(this.p(op, 50)).padEnd(7)} p99=${fmt(this.p(op, 99))}`;
    });
    const samples = [...this.samples].flatMap(([op, set]) => [...set].map((d) => `    ${op} error: ${d}`));
    return [title, ...rows, ...samples].join('\n');
  }
}

/** Run `count` tasks with at most `concurrency` at a time. */
export async function pool<I>(items: readonly I[], concurrency: number, task: (item: I, index: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(concurrency, items.length) }, async () => {
      while (next < items.length) {
        const i = next++;
        await task(items[i]!, i);
      }
    }),
  );
}

/** A function that forces a full GC, or undefined if the runtime refuses. */
export function gcFunction(): (() => void) | undefined {
  const existing = (globalThis as { gc?: () => void }).gc;
  if (existing) return existing;
  try {
    v8.setFlagsFromString('--expose-gc');
    return runInNewContext('gc') as () => void;
  } catch {
    return undefined;
  }
}
