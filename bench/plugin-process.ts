/**
 * `trousseau serve` in a process of its own, in one of the configurations the memory
 * and start-up benchmarks compare:
 *
 *   dev   `serve --dev`: three local key backends (no SDK is loaded).
 *   all   one backend of each type (vault, aws, azure, local) against the real test
 *         servers: .servers/trousseau.yaml and .servers/trousseau.env, which
 *         `bash test/servers/up.sh openbao local-kms lowkey-vault` writes.
 *
 * The plugin runs from bin/trousseau.js with the image's Node flags
 * (plugin-node-args.ts). `compileCache` names a TROUSSEAU_COMPILE_CACHE folder
 * (src/config/compile-cache.js), which the plugin checks and fills itself.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { call, clientsFor } from '../src/cli/client.ts';
import { pluginNodeArgs } from './plugin-node-args.ts';
import { cpuSeconds, freePort } from './process-stats.ts';

export const root = path.resolve(import.meta.dirname, '..');
export type PluginConfiguration = 'dev' | 'all';
const serversDir = path.join(root, '.servers');

/** Why `configuration` cannot run here, or undefined when it can. */
export function unavailable(configuration: PluginConfiguration): string | undefined {
  if (configuration === 'dev') return undefined;
  for (const file of ['trousseau.yaml', 'trousseau.env']) {
    if (!existsSync(path.join(serversDir, file))) return `.servers/${file} is missing: run bash test/servers/up.sh openbao local-kms lowkey-vault`;
  }
  return undefined;
}

function serversEnv(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of readFileSync(path.join(serversDir, 'trousseau.env'), 'utf8').split('\n')) {
    const match = /^([A-Z0-9_]+)=(.*)$/.exec(line);
    if (match) env[match[1]!] = match[2]!;
  }
  return env;
}

export interface PluginProcess {
  child: ChildProcess;
  socket: string;
  metricsUrl: string;
  /** Milliseconds from spawn to the first answer of v2 Status (an error answer counts: the socket serves). */
  firstAnswerMs: number;
  /** Milliseconds from spawn to the first Status with healthz "ok". */
  healthyMs: number;
  /** Plugin CPU time (user + system) spent up to the first Status answer, ms: what start-up costs whatever else runs. */
  cpuToFirstAnswerMs: number;
  stop(): Promise<void>;
}

/** Start the plugin in `configuration` with its socket in `dir`, and wait until Status says ok. */
export async function startPluginProcess(
  dir: string,
  configuration: PluginConfiguration,
  options: { compileCache?: string | undefined; nodeArgs?: string[] } = {},
): Promise<PluginProcess> {
  const socket = path.join(dir, 'kms.sock');
  const port = await freePort();
  const common = ['--socket', socket, '--http-listen', `127.0.0.1:${port}`, '--log-level', 'error'];
  const args =
    configuration === 'dev'
      ? ['serve', '--dev', '--data-dir', path.join(dir, 'keys'), ...common]
      : ['serve', '--config', path.join(serversDir, 'trousseau.yaml'), ...common];
  const env: NodeJS.ProcessEnv = { ...process.env, ...(configuration === 'all' ? serversEnv() : {}) };
  delete env.NODE_COMPILE_CACHE;
  delete env.TROUSSEAU_COMPILE_CACHE;
  delete env.NODE_OPTIONS;
  if (options.compileCache) env.TROUSSEAU_COMPILE_CACHE = options.compileCache;
  const started = performance.now();
  const child = spawn(process.execPath, [...(options.nodeArgs ?? pluginNodeArgs(root)), path.join(root, 'bin/trousseau.js'), ...args], {
    env,
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  const clients = clientsFor(socket);
  let firstAnswerMs: number | undefined;
  let cpuToFirstAnswerMs = NaN;
  const deadline = Date.now() + 60_000;
  try {
    for (;;) {
      if (child.exitCode !== null) throw new Error(`plugin (${configuration}) exited with ${child.exitCode} during start-up`);
      if (Date.now() > deadline) throw new Error(`plugin (${configuration}) not healthy within 60 s`);
      if (existsSync(socket)) {
        const healthz = await call<object, { healthz: string }>(clients.v2, 'Status', {}, 2000).then(
          (status) => status.healthz,
          // No connection yet is no answer; any other error is the plugin answering.
          (error: { details?: string }) => (/No connection|ECONNREFUSED|ENOENT|connect/i.test(error.details ?? '') ? undefined : 'error'),
        );
        if (healthz !== undefined && firstAnswerMs === undefined) {
          firstAnswerMs = performance.now() - started;
          cpuToFirstAnswerMs = cpuSeconds(child.pid!) * 1000;
        }
        if (healthz === 'ok') break;
      }
      await new Promise((r) => setTimeout(r, 5));
    }
  } catch (error) {
    child.kill('SIGKILL');
    throw error;
  } finally {
    clients.close();
  }
  const healthyMs = performance.now() - started;
  return {
    child,
    socket,
    metricsUrl: `http://127.0.0.1:${port}/metrics`,
    firstAnswerMs: Math.round(firstAnswerMs ?? healthyMs),
    healthyMs: Math.round(healthyMs),
    cpuToFirstAnswerMs: Math.round(cpuToFirstAnswerMs),
    stop: async () => {
      if (child.exitCode === null) child.kill('SIGTERM');
      await new Promise((r) => (child.exitCode === null ? child.once('exit', r) : r(undefined)));
    },
  };
}
