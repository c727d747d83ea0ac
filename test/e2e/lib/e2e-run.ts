/**
 * One test file's world: a work folder, one etcd, the plugin (from the launcher the
 * suite was started with) behind fault proxies, and the kube-apiservers it starts.
 * test/e2e/run.sh builds the binaries and says where they are through
 * TROUSSEAU_E2E_KUBE_BIN and TROUSSEAU_E2E_ETCD_BIN.
 */
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { KubeApiserver, makeCredentials, type Credentials } from './apiserver.ts';
import { Etcd } from './etcd.ts';
import { freePort } from './ports.ts';
import { preparePluginConfig, type PluginConfig } from './plugin-config.ts';
import { launcherFromEnvironment, pluginReadyz, type PluginLauncher, type RunningPlugin } from './plugin.ts';
import { waitFor } from './wait.ts';

function requiredDir(variable: string): string {
  const dir = process.env[variable];
  if (!dir) throw new Error(`${variable} is not set: run the suite with \`npm run test:e2e\` (test/e2e/run.sh builds the binaries and sets it)`);
  return dir;
}

export class E2eRun {
  readonly workDir: string;
  readonly kubeBin = requiredDir('TROUSSEAU_E2E_KUBE_BIN');
  readonly etcdBin = requiredDir('TROUSSEAU_E2E_ETCD_BIN');
  readonly launcher: PluginLauncher = launcherFromEnvironment();
  readonly socketDir: string;
  etcd!: Etcd;
  credentials!: Credentials;
  pluginConfig!: PluginConfig;
  plugin: RunningPlugin | undefined;
  private pluginStarts = 0;
  private readonly apiservers = new Set<KubeApiserver>();

  private constructor(name: string) {
    // Short: a unix socket path must fit in 108 bytes.
    this.workDir = mkdtempSync(path.join(os.tmpdir(), `e2e-${name}-`));
    this.socketDir = path.join(this.workDir, 'sock');
    mkdirSync(this.socketDir, { mode: 0o700 });
  }

  static async create(name: string): Promise<E2eRun> {
    const run = new E2eRun(name);
    try {
      run.credentials = await makeCredentials(run.workDir);
      run.etcd = await Etcd.start(run.etcdBin, run.workDir);
      run.pluginConfig = await preparePluginConfig(path.join(run.workDir, 'plugin'));
    } catch (error) {
      await run.close(true);
      throw error;
    }
    return run;
  }

  get socketPath(): string {
    return path.join(this.socketDir, 'kms.sock');
  }

  /** Starts the plugin and waits until its /readyz says ready. */
  async startPlugin(): Promise<RunningPlugin> {
    const plugin = await this.launcher.start({
      configDir: this.pluginConfig.dir,
      socketDir: this.socketDir,
      httpPort: await freePort(),
      env: this.pluginConfig.env,
      logFile: path.join(this.workDir, `trousseau-${++this.pluginStarts}.log`),
    });
    this.plugin = plugin;
    await waitFor('the plugin /readyz 200', async () => (await pluginReadyz(plugin)).status === 200, {
      timeoutMs: 60_000,
      describe: () => plugin.logTail(),
    });
    return plugin;
  }

  writeFile(name: string, text: string): string {
    const file = path.join(this.workDir, name);
    writeFileSync(file, text, { mode: 0o600 });
    return file;
  }

  async startApiserver(name: string, encryptionConfigFile: string, featureGates: string[] = []): Promise<KubeApiserver> {
    const apiserver = await KubeApiserver.start({
      name,
      binDir: this.kubeBin,
      workDir: this.workDir,
      etcd: this.etcd,
      credentials: this.credentials,
      encryptionConfigFile,
      etcdPrefix: `/e2e-${name}`,
      featureGates,
    });
    this.apiservers.add(apiserver);
    return apiserver;
  }

  async closeApiserver(apiserver: KubeApiserver): Promise<void> {
    this.apiservers.delete(apiserver);
    await apiserver.close();
  }

  /** Stops everything; the work folder (logs) is kept when `keepFiles`. */
  async close(keepFiles: boolean): Promise<void> {
    for (const apiserver of this.apiservers) await apiserver.close().catch(() => undefined);
    await this.plugin?.stop().catch(() => undefined);
    await this.pluginConfig?.close();
    await this.etcd?.stop();
    if (keepFiles) console.error(`e2e: logs and files kept in ${this.workDir}`);
    else rmSync(this.workDir, { recursive: true, force: true });
  }
}
