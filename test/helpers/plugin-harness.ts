/**
 * Starts a real Plugin behind a real KmsServer on a unix socket in a fresh temporary
 * folder, with FaultBackend-wrapped local key backends, and gRPC clients built by the
 * CLI's own `clientsFor`. Everything is stopped in the test's teardown.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { lstat, mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ExecutionContext } from 'ava';
import type { ServiceError } from '@grpc/grpc-js';
import { LocalKeyBackend, generateKeyFile } from '../../src/backends/local.ts';
import { call, clientsFor } from '../../src/cli/client.ts';
import { parseConfig } from '../../src/config/load.ts';
import type { Config } from '../../src/config/schema.ts';
import { KmsServer } from '../../src/kms/server.ts';
import type * as T from '../../src/kms/types.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { Metrics } from '../../src/observability/metrics.ts';
import { Plugin } from '../../src/plugin.ts';
import { FaultBackend, type FaultMode } from './fault-backend.ts';

export interface HarnessBackend {
  name: string;
  priority?: number;
  timeoutMs?: number;
  /** Key file to use instead of a fresh one (to share keys between instances). */
  keyFile?: string;
  /** Initial fault mode (applied before the start-up probe). */
  mode?: FaultMode;
}

export interface HarnessOptions {
  /** Backends, by name or in full; default three (a, b, c). */
  backends?: (string | HarnessBackend)[];
  quorum?: number;
  /** Anything else of the configuration (encrypt, decrypt, breaker, health, ...). */
  config?: Record<string, unknown>;
  /** Socket path; default kms.sock in the temporary folder. */
  socketPath?: string;
  /** Do not start the plugin and server (for socket life-cycle tests). */
  noStart?: boolean;
}

export interface Harness {
  dir: string;
  socketPath: string;
  config: Config;
  plugin: Plugin;
  server: KmsServer;
  metrics: Metrics;
  faults: Map<string, FaultBackend>;
  keyFiles: Map<string, string>;
  clients: ReturnType<typeof clientsFor>;
  fault(name: string): FaultBackend;
  start(): Promise<void>;
  stop(): Promise<void>;
  status(): Promise<T.V2StatusResponse>;
  encrypt(plaintext: Buffer, timeoutMs?: number): Promise<T.V2EncryptResponse>;
  decrypt(encrypted: T.V2EncryptResponse, timeoutMs?: number): Promise<Buffer>;
  admin(): Promise<AdminStatus>;
  /** Sum of every backend's calls. */
  backendCalls(): number;
  /** resetCounts() on every backend. */
  resetCounts(): void;
}

export interface AdminStatus {
  keyId: string;
  partial: boolean;
  missing: string[];
  quorum: number;
  healthy: boolean;
  backends: { name: string; breaker: string; probeOk: boolean | undefined; keyVersion?: string; lastError?: string; lastErrorCause?: string }[];
}

/** A fresh temporary folder, removed in teardown. */
export async function tempDir(t: ExecutionContext): Promise<string> {
  // Short prefix: unix socket paths are limited to about 107 bytes.
  const dir = await mkdtemp(path.join(os.tmpdir(), 'trs-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

export async function startHarness(t: ExecutionContext, options: HarnessOptions = {}): Promise<Harness> {
  const dir = await tempDir(t);
  const specs = (options.backends ?? ['a', 'b', 'c']).map((b) => (typeof b === 'string' ? { name: b } : b));
  const keyFiles = new Map<string, string>();
  for (const spec of specs) {
    const file = spec.keyFile ?? path.join(dir, `${spec.name}.key`);
    if (!spec.keyFile) await generateKeyFile(file);
    keyFiles.set(spec.name, file);
  }
  const socketPath = options.socketPath ?? path.join(dir, 'kms.sock');
  const config = parseConfig(
    {
      socket: { path: socketPath },
      quorum: options.quorum ?? Math.min(2, specs.length),
      backends: specs.map((s) => ({
        name: s.name,
        type: 'local',
        keyFile: keyFiles.get(s.name),
        ...(s.priority === undefined ? {} : { priority: s.priority }),
        ...(s.timeoutMs === undefined ? {} : { timeoutMs: s.timeoutMs }),
      })),
      // Background probes off unless a test asks for them: they would add backend calls.
      health: { probeIntervalMs: 3_600_000 },
      ...options.config,
    },
    'test configuration',
  );
  const faults = new Map(specs.map((s) => [s.name, new FaultBackend(new LocalKeyBackend(s.name, keyFiles.get(s.name)!), s.mode)]));
  const metrics = new Metrics();
  const logger = silentLogger();
  const plugin = new Plugin({ config, baseDir: dir, logger, metrics, backends: [...faults.values()] });
  const server = new KmsServer(plugin, { path: socketPath, mode: config.socket.mode, group: config.socket.group }, metrics, logger);
  const clients = clientsFor(socketPath);

  let started = false;
  let stopped: Promise<void> | undefined;
  const harness: Harness = {
    dir,
    socketPath,
    config,
    plugin,
    server,
    metrics,
    faults,
    keyFiles,
    clients,
    fault(name) {
      const f = faults.get(name);
      if (!f) throw new Error(`no backend ${name}`);
      return f;
    },
    async start() {
      await plugin.start();
      await server.start();
      // Only a server that bound may remove the socket: after a refused start the path belongs to someone else.
      started = true;
    },
    stop() {
      stopped ??= (async () => {
        clients.close();
        if (started) await server.stop(1000);
        await plugin.close();
      })();
      return stopped;
    },
    status: () => call<object, T.V2StatusResponse>(clients.v2, 'Status', {}),
    encrypt: (plaintext, timeoutMs = 5000) =>
      call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext, uid: 'test' }, timeoutMs),
    decrypt: async (encrypted, timeoutMs = 5000) =>
      (
        await call<T.V2DecryptRequest, T.V2DecryptResponse>(
          clients.v2,
          'Decrypt',
          { ciphertext: encrypted.ciphertext, uid: 'test', key_id: encrypted.key_id, annotations: encrypted.annotations },
          timeoutMs,
        )
      ).plaintext,
    admin: async () => JSON.parse((await call<object, T.AdminStatusResponse>(clients.admin, 'Status', {})).status_json) as AdminStatus,
    backendCalls: () => [...faults.values()].reduce((sum, f) => sum + f.totalCalls, 0),
    resetCounts: () => {
      for (const f of faults.values()) f.resetCounts();
    },
  };
  t.teardown(() => harness.stop());
  if (!options.noStart) await harness.start();
  return harness;
}

/** The gRPC error a promise rejected with (fails the test if it resolved). */
export async function grpcError(t: ExecutionContext, promise: Promise<unknown>): Promise<ServiceError> {
  try {
    await promise;
  } catch (error) {
    return error as ServiceError;
  }
  t.fail('expected a gRPC error');
  throw new Error('expected a gRPC error');
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Poll `check` until it returns a value other than undefined, or fail after `timeoutMs`. */
export async function eventually<R>(check: () => Promise<R | undefined> | R | undefined, timeoutMs = 3000, everyMs = 20): Promise<R> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await sleep(everyMs);
  }
}

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
/** The CLI entry point, run with the Node that runs the tests (Node 24 under ava). */
export const MAIN = path.join(repoRoot, 'src', 'main.ts');

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Run `trousseau ARGS` to completion. */
export function runCli(args: string[], options: { input?: string; timeoutMs?: number } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [MAIN, ...args], { cwd: repoRoot, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`trousseau ${args.join(' ')} did not finish`));
    }, options.timeoutMs ?? 20_000);
    child.once('error', reject);
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
    child.stdin.end(options.input ?? '');
  });
}

export interface ServeProcess {
  child: ChildProcessWithoutNullStreams;
  /** Everything the process logged so far. */
  readonly stderr: string;
  /** Resolves with the exit code. */
  exited: Promise<number | null>;
  /** SIGTERM and wait for the exit code. */
  terminate(): Promise<number | null>;
}

/**
 * `trousseau serve` on a configuration of one local key backend (quorum 1) in a new
 * temporary folder, with `settings` merged at the top level (connections, log...).
 */
export async function spawnLocalServe(t: ExecutionContext, settings: Record<string, unknown> = {}): Promise<{ serve: ServeProcess; socketPath: string }> {
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'kms.sock');
  await generateKeyFile(path.join(dir, 'a.key'));
  const config = { socket: { path: socketPath }, quorum: 1, backends: [{ name: 'a', type: 'local', keyFile: 'a.key' }], ...settings };
  await writeFile(path.join(dir, 'config.yaml'), JSON.stringify(config));
  return { serve: await spawnServe(t, ['--config', path.join(dir, 'config.yaml')], socketPath), socketPath };
}

/** Start `trousseau serve ARGS` and wait until it serves on `socketPath`. Killed in teardown. */
export async function spawnServe(t: ExecutionContext, args: string[], socketPath: string): Promise<ServeProcess> {
  const child = spawn(process.execPath, [MAIN, 'serve', ...args], { cwd: repoRoot, stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  child.stdout.resume();
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  let gone = false;
  void exited.then(() => (gone = true));
  // Waits for the exit, so that no process of this file outlives its last test.
  t.teardown(async () => {
    if (gone) return;
    child.kill('SIGKILL');
    await exited;
  });
  const proc: ServeProcess = {
    child,
    get stderr() {
      return stderr;
    },
    exited,
    terminate() {
      if (!gone) child.kill('SIGTERM');
      return exited;
    },
  };
  // A loaded CI machine may take several seconds to load the SDKs.
  await eventually(async () => {
    if (gone) throw new Error(`serve exited early:\n${stderr}`);
    const info = await lstat(socketPath).catch(() => undefined);
    return info?.isSocket() && (await canConnect(socketPath)) ? true : undefined;
  }, 30_000, 50);
  return proc;
}

/** True when something accepts connections on the unix socket. */
export function canConnect(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(socketPath, () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}
