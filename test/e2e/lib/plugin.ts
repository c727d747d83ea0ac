/**
 * How the suite runs the plugin: one small interface, two ways.
 *
 * - CheckoutLauncher (`npm run test:e2e -- --no-image`): `node src/main.ts serve` from
 *   this checkout.
 * - ImageLauncher (the default): the container image, run by deploy/image/run.sh under
 *   podman with the static pod's settings (`npm run image` builds it).
 *
 * Both are given the same self-contained configuration folder (plugin-config.ts), a
 * socket folder on the host that the apiserver dials into, and a loopback port for
 * /healthz and /readyz. Everything else the suite does (status, readiness, kill -9)
 * goes through RunningPlugin, so the scenarios do not know which one runs.
 */
import { execFile } from 'node:child_process';
import { chmodSync, chownSync, existsSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { CONFIG_NAME, repoRoot } from './plugin-config.ts';
import { Child, type ExitStatus } from './process.ts';
import { waitFor } from './wait.ts';

const run = promisify(execFile);
const node = path.join(repoRoot, 'node_modules/.bin/node');
const cli = path.join(repoRoot, 'src/main.ts');

export interface PluginSetup {
  /** Holds CONFIG_NAME and every file it names (relative names). */
  configDir: string;
  /** Host folder of the socket; the socket is SOCKET_NAME inside it. */
  socketDir: string;
  /** 127.0.0.1 port for /healthz, /readyz, /metrics. */
  httpPort: number;
  env: Record<string, string>;
  logFile: string;
}

export const SOCKET_NAME = 'kms.sock';

export interface RunningPlugin {
  /** The process the launcher started (for the image: the one running podman). */
  readonly pid: number | undefined;
  readonly socketPath: string;
  readonly httpUrl: string;
  /** SIGKILL, as an OOM kill or a node crash would; resolves once it is gone. */
  kill9(): Promise<void>;
  /** SIGTERM; resolves with how it exited. */
  stop(): Promise<ExitStatus>;
  logTail(): string;
}

export interface PluginLauncher {
  /** "checkout" or "image", for logs. */
  readonly description: string;
  start(setup: PluginSetup): Promise<RunningPlugin>;
}

class ChildPlugin implements RunningPlugin {
  readonly socketPath: string;
  readonly httpUrl: string;
  private readonly child: Child;

  constructor(child: Child, setup: PluginSetup) {
    this.child = child;
    this.socketPath = path.join(setup.socketDir, SOCKET_NAME);
    this.httpUrl = `http://127.0.0.1:${setup.httpPort}`;
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  async kill9(): Promise<void> {
    this.child.signal('SIGKILL');
    await this.child.exited;
  }

  stop(): Promise<ExitStatus> {
    return this.child.stop(30_000);
  }

  logTail(): string {
    return this.child.tail();
  }
}

export class CheckoutLauncher implements PluginLauncher {
  readonly description = 'checkout';

  async start(setup: PluginSetup): Promise<RunningPlugin> {
    const child = new Child('trousseau', node, [
      cli, 'serve', '--config', path.join(setup.configDir, CONFIG_NAME),
      '--socket', path.join(setup.socketDir, SOCKET_NAME), '--http-listen', `127.0.0.1:${setup.httpPort}`,
    ], { logFile: setup.logFile, env: { ...process.env, ...setup.env } });
    const plugin = new ChildPlugin(child, setup);
    await waitServing(plugin, () => child.exitStatus, () => child.tail());
    return plugin;
  }
}

/**
 * The image, run by deploy/image/run.sh (the image work's script) under podman with
 * the static pod's settings (deploy/image/settings.json): non-root uid, read-only root,
 * no capabilities, no-new-privileges, memory limit, host network, the socket folder
 * and the configuration folder (read-only, at /etc/trousseau) mounted from the host.
 * run.sh starts the container detached and `run.sh --stop NAME` stops it with SIGTERM;
 * kill -9 is podman's SIGKILL to the container's PID 1, as an OOM kill would be.
 */
export class ImageLauncher implements PluginLauncher {
  readonly description = 'image';
  private readonly script = process.env.TROUSSEAU_E2E_IMAGE_RUN ?? path.join(repoRoot, 'deploy/image/run.sh');
  private starts = 0;

  private async giveToImageUser(configDir: string): Promise<void> {
    // The plugin reads its files as the image's user, and refuses files that others
    // could read: they must be that user's, mode 0600 (the static pod's Secret volume
    // gives the same).
    const settings = path.join(path.dirname(this.script), 'podman-args.ts');
    const { stdout } = await run(node, [settings, 'get', 'podSecurityContext']);
    const { runAsUser, runAsGroup } = JSON.parse(stdout) as { runAsUser: number; runAsGroup: number };
    for (const entry of [configDir, ...readdirSync(configDir).map((name) => path.join(configDir, name))]) chownSync(entry, runAsUser, runAsGroup);
  }

  async start(setup: PluginSetup): Promise<RunningPlugin> {
    if (!existsSync(this.script)) {
      throw new Error('deploy/image/run.sh is missing, so the plugin cannot run from the image; run the suite from the checkout with `npm run test:e2e -- --no-image`');
    }
    await this.giveToImageUser(setup.configDir);
    const envFile = `${setup.configDir}.env`;
    writeFileSync(envFile, Object.entries(setup.env).map(([k, v]) => `${k}=${v}\n`).join(''), { mode: 0o600 });
    const name = `trousseau-${path.basename(path.dirname(setup.socketDir))}-${++this.starts}`;
    try {
      await run('bash', [
        // One compile cache per run, kept across the run's restarts, as a node keeps its own.
        this.script, '--name', name, '--socket-dir', setup.socketDir, '--cache-dir', path.join(path.dirname(setup.socketDir), 'compile-cache'),
        '--config-dir', setup.configDir, '--env-file', envFile, '--',
        'serve', '--config', `${CONTAINER_CONFIG_DIR}/${CONFIG_NAME}`, '--socket', `${CONTAINER_SOCKET_DIR}/${SOCKET_NAME}`,
        '--http-listen', `127.0.0.1:${setup.httpPort}`,
      ], { timeout: 180_000 });
    } catch (error) {
      throw new Error(`deploy/image/run.sh could not start the image: ${(error as { stderr?: string }).stderr ?? (error as Error).message}`, { cause: error });
    }
    const plugin = new ContainerPlugin(name, this.script, setup);
    await plugin.attach();
    await waitServing(plugin, () => plugin.exitStatus, () => plugin.logTail(), 180_000);
    return plugin;
  }
}

/** Where deploy/image/settings.json puts the two folders inside the container. */
const CONTAINER_CONFIG_DIR = '/etc/trousseau';
const CONTAINER_SOCKET_DIR = '/var/run/trousseau';

class ContainerPlugin implements RunningPlugin {
  readonly socketPath: string;
  readonly httpUrl: string;
  private readonly name: string;
  private readonly script: string;
  private readonly logFile: string;
  private logs: Child | undefined;
  private containerPid: number | undefined;
  private ended: ExitStatus | undefined;

  constructor(name: string, script: string, setup: PluginSetup) {
    this.name = name;
    this.script = script;
    this.logFile = setup.logFile;
    this.socketPath = path.join(setup.socketDir, SOCKET_NAME);
    this.httpUrl = `http://127.0.0.1:${setup.httpPort}`;
  }

  /** Follows the container's log into the log file; notes its PID 1. */
  async attach(): Promise<void> {
    this.logs = new Child(`podman logs ${this.name}`, 'podman', ['logs', '--follow', this.name], { logFile: this.logFile });
    const { stdout } = await run('podman', ['inspect', '--format', '{{.State.Pid}}', this.name]);
    this.containerPid = Number(stdout.trim()) || undefined;
  }

  get pid(): number | undefined {
    return this.containerPid;
  }

  /** Defined once the container has stopped (or podman no longer knows it). */
  get exitStatus(): ExitStatus | undefined {
    if (this.ended) return this.ended;
    if (this.logs?.exitStatus) this.ended = { code: null, signal: null };
    return this.ended;
  }

  async kill9(): Promise<void> {
    await run('podman', ['kill', '--signal', 'KILL', this.name]);
    await run('podman', ['wait', this.name]).catch(() => undefined);
    await this.logs?.exited;
    await run('podman', ['rm', '--force', this.name]).catch(() => undefined);
    this.ended = { code: null, signal: 'SIGKILL' };
  }

  async stop(): Promise<ExitStatus> {
    if (this.ended) return this.ended;
    let code: number | null;
    try {
      const { stdout } = await run('bash', [this.script, '--stop', this.name], { timeout: 120_000 });
      code = Number(stdout.trim());
    } catch (error) {
      const stdout = (error as { stdout?: string }).stdout?.trim() ?? '';
      code = /^\d+$/.test(stdout) ? Number(stdout) : null;
    }
    await this.logs?.stop(5000);
    this.ended = { code, signal: null };
    return this.ended;
  }

  logTail(): string {
    return this.logs?.tail() ?? '(no log)';
  }
}

export function launcherFromEnvironment(): PluginLauncher {
  return process.env.TROUSSEAU_E2E_PLUGIN === 'checkout' ? new CheckoutLauncher() : new ImageLauncher();
}

/** Waits until the plugin answers /healthz and its socket exists. */
async function waitServing(plugin: RunningPlugin, exited: () => ExitStatus | undefined, tail: () => string, timeoutMs = 60_000): Promise<void> {
  try {
    await waitFor('the plugin to serve (/healthz 200, socket present)', async () => {
      if (exited()) throw new Error(`plugin exited ${JSON.stringify(exited())}`);
      const response = await fetch(`${plugin.httpUrl}/healthz`);
      return response.ok && existsSync(plugin.socketPath);
    }, { timeoutMs, intervalMs: 200 });
  } catch (error) {
    await plugin.stop();
    throw new Error(`${(error as Error).message}\n${tail()}`, { cause: error });
  }
}

/** The plugin's /readyz: status and body. */
export async function pluginReadyz(plugin: RunningPlugin): Promise<{ status: number; body: { ready?: boolean; reasons?: string[] } }> {
  const response = await fetch(`${plugin.httpUrl}/readyz`);
  return { status: response.status, body: (await response.json()) as { ready?: boolean; reasons?: string[] } };
}

export interface StatusReport {
  exitCode: number;
  keyId: string | undefined;
  partial: boolean;
  healthy: boolean;
  backends: { name: string; probeOk: boolean }[];
}

/** `trousseau status --json` from the host, against the plugin's socket. */
export async function trousseauStatus(plugin: RunningPlugin): Promise<StatusReport> {
  let stdout: string;
  let exitCode = 0;
  try {
    ({ stdout } = await run(node, [cli, 'status', '-s', plugin.socketPath, '--json'], { timeout: 30_000 }));
  } catch (error) {
    const failed = error as { code?: number; stdout?: string };
    if (typeof failed.code !== 'number') throw error;
    exitCode = failed.code;
    stdout = failed.stdout ?? '';
  }
  const report = (stdout.trim() ? JSON.parse(stdout) : {}) as Partial<StatusReport>;
  return { exitCode, keyId: report.keyId, partial: report.partial ?? false, healthy: report.healthy ?? false, backends: report.backends ?? [] };
}

/**
 * `trousseau keygen --rotate FILE` on the host, as the file's owner (the image's user
 * when the image runs): the rotated file must stay readable by the plugin, and the
 * plugin refuses key files that others can read.
 */
export async function rotateLocalKey(file: string): Promise<void> {
  const { uid, gid } = statSync(file);
  const keygen = [node, cli, 'keygen', '--rotate', file];
  if (uid === process.getuid?.()) await run(keygen[0]!, keygen.slice(1), { timeout: 30_000 });
  else {
    // The image's user reaches its mounted folder only inside the container; on the host
    // the run's temporary folder (mkdtemp, 0700) must let it through to make the
    // rotation's lock file beside the key.
    const runFolder = path.dirname(path.dirname(file));
    chmodSync(runFolder, (statSync(runFolder).mode & 0o7777) | 0o001);
    await run('setpriv', [`--reuid=${uid}`, `--regid=${gid}`, '--clear-groups', ...keygen], { timeout: 30_000 });
  }
}
