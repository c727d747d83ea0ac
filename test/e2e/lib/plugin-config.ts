/**
 * The plugin's configuration for a run: .servers/trousseau.yaml (the plugin against
 * the real test servers that test/servers/up.sh started), changed in two ways:
 *
 * - every network backend is reached through a fault proxy of this run
 *   (test/chaos/fault-proxy.ts), so a test can "stop" a backend for this plugin only,
 *   never the shared server other tests use;
 * - every file it names (AppRole ids, CA, the local key file) is copied into one
 *   folder of this run and named relative to it, so the folder is self-contained (the
 *   image launcher mounts it as the container's configuration folder) and a key
 *   rotation of the local key file touches this run's copy only.
 */
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import YAML from 'yaml';
import { FaultProxy } from '../../chaos/fault-proxy.ts';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const serversDir = path.join(repoRoot, '.servers');

export const CONFIG_NAME = 'trousseau.yaml';

export interface PluginConfig {
  /** Folder holding CONFIG_NAME and every file it names. */
  dir: string;
  /** Backend name -> the proxy in front of its server (network backends only). */
  proxies: Map<string, FaultProxy>;
  /** Names of the backends, in configuration order. */
  backends: string[];
  quorum: number;
  /** The local key file's copy (for rotation), if a local backend is configured. */
  localKeyFile: string | undefined;
  /** Variables the plugin needs (AWS default chain, Azure managed identity). */
  env: Record<string, string>;
  close(): Promise<void>;
}

/** Fields of a backend that name a server; each gets a proxy. */
const ADDRESS_FIELDS = ['address', 'endpoint', 'vaultUrl'];

function readEnvFile(file: string): Record<string, string> {
  const vars: Record<string, string> = {};
  if (!existsSync(file)) return vars;
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    const eq = line.indexOf('=');
    if (eq > 0 && !line.startsWith('#')) vars[line.slice(0, eq)] = line.slice(eq + 1);
  }
  return vars;
}

export async function preparePluginConfig(dir: string): Promise<PluginConfig> {
  const source = path.join(serversDir, 'trousseau.yaml');
  if (!existsSync(source)) throw new Error('.servers/trousseau.yaml is missing: start the real test servers with `bash test/servers/up.sh`');
  const config = YAML.parse(readFileSync(source, 'utf8')) as { quorum: number; backends: Record<string, unknown>[]; [key: string]: unknown };
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const proxies = new Map<string, FaultProxy>();
  let localKeyFile: string | undefined;
  let copies = 0;

  // Every `...File` value, at any depth, is copied in under a name of its own.
  const copyFiles = (node: Record<string, unknown>, backend: string) => {
    for (const [key, value] of Object.entries(node)) {
      if (typeof value === 'string' && /File$/.test(key)) {
        const name = `${backend}-${copies++}-${path.basename(value)}`;
        copyFileSync(path.resolve(serversDir, value), path.join(dir, name));
        node[key] = name;
        if (key === 'keyFile' && node.type === 'local') localKeyFile = path.join(dir, name);
      } else if (value && typeof value === 'object' && !Array.isArray(value)) {
        copyFiles(value as Record<string, unknown>, backend);
      }
    }
  };

  try {
    for (const backend of config.backends) {
      const name = String(backend.name);
      copyFiles(backend, name);
      for (const field of ADDRESS_FIELDS) {
        const address = backend[field];
        if (typeof address !== 'string') continue;
        const url = new URL(address);
        const proxy = await FaultProxy.start(`e2e-${name}`, address);
        proxies.set(name, proxy);
        // The host name stays (a TLS server's certificate names it); the port is the proxy's.
        url.port = String(proxy.port);
        backend[field] = url.toString().replace(/\/$/, '');
      }
    }
    // Probes and recovery fast enough that the outage scenarios wait seconds, not
    // minutes; the apiserver's own timers still set the pace.
    config.health = { probeIntervalMs: 1000, minBackoffMs: 250, maxBackoffMs: 1000, recoverAfterMs: 3000 };
    delete config.socket; // given on the command line: its place differs per launcher
    writeFileSync(path.join(dir, CONFIG_NAME), YAML.stringify(config), { mode: 0o600 });
  } catch (error) {
    await Promise.all([...proxies.values()].map((p) => p.close()));
    throw error;
  }

  return {
    dir,
    proxies,
    backends: config.backends.map((b) => String(b.name)),
    quorum: config.quorum,
    localKeyFile,
    env: readEnvFile(path.join(serversDir, 'trousseau.env')),
    close: async () => {
      await Promise.all([...proxies.values()].map((p) => p.close()));
    },
  };
}
