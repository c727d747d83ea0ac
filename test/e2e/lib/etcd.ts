/**
 * A single-member etcd on loopback, and raw reads of what the apiserver stored in it
 * (with etcdctl, as an operator checking encryption at rest would).
 */
import { execFile } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { Child } from './process.ts';
import { PortClash, freePort, retryOnPortClash, saysAddressInUse } from './ports.ts';
import { waitFor } from './wait.ts';

const run = promisify(execFile);

export class Etcd {
  readonly url: string;
  private readonly child: Child;
  private readonly etcdctl: string;

  private constructor(url: string, child: Child, etcdctl: string) {
    this.url = url;
    this.child = child;
    this.etcdctl = etcdctl;
  }

  static start(binDir: string, workDir: string): Promise<Etcd> {
    return retryOnPortClash(async () => {
      const [clientPort, peerPort] = [await freePort(), await freePort()];
      const url = `http://127.0.0.1:${clientPort}`;
      const peer = `http://127.0.0.1:${peerPort}`;
      const dataDir = path.join(workDir, `etcd-data-${clientPort}`);
      mkdirSync(dataDir, { recursive: true, mode: 0o700 });
      const child = new Child('etcd', path.join(binDir, 'etcd'), [
        '--name', 'e2e', '--data-dir', dataDir,
        '--listen-client-urls', url, '--advertise-client-urls', url,
        '--listen-peer-urls', peer, '--initial-advertise-peer-urls', peer,
        '--initial-cluster', `e2e=${peer}`,
        // A test store: durability across a machine crash is not what is tested, and
        // fsync on a loaded disk only slows every write.
        '--unsafe-no-fsync', '--log-level', 'warn',
      ], { logFile: path.join(workDir, 'etcd.log') });
      const etcd = new Etcd(url, child, path.join(binDir, 'etcdctl'));
      try {
        await waitFor('etcd /health', async () => {
          if (child.exitStatus) throw new Error('exited');
          const response = await fetch(`${url}/health`);
          return response.ok && ((await response.json()) as { health?: string }).health === 'true';
        }, { timeoutMs: 120_000, intervalMs: 250 });
      } catch (error) {
        await child.stop();
        if (saysAddressInUse(child.log())) throw new PortClash('etcd: port in use');
        throw new Error(`etcd did not start (${(error as Error).message}):\n${child.tail()}`, { cause: error });
      }
      return etcd;
    });
  }

  /** Every key under `prefix` with its raw value, exactly as stored. */
  async getPrefix(prefix: string): Promise<Map<string, Buffer>> {
    // JSON output carries keys and values base64-encoded: byte-exact, whatever they hold.
    const { stdout } = await run(this.etcdctl, ['--endpoints', this.url, 'get', '--prefix', prefix, '-w', 'json'], { maxBuffer: 512 * 1024 * 1024 });
    const parsed = JSON.parse(stdout) as { kvs?: { key: string; value: string }[] };
    const values = new Map<string, Buffer>();
    for (const kv of parsed.kvs ?? []) values.set(Buffer.from(kv.key, 'base64').toString('utf8'), Buffer.from(kv.value, 'base64'));
    return values;
  }

  async stop(): Promise<void> {
    await this.child.stop();
  }
}
