/**
 * The real OpenBao server of test/servers/up.sh behind a fault proxy, as the config of
 * a vault backend named `slow`. The proxy's hold() keeps a backend call in flight for
 * exactly as long as a test needs, then pass() lets it through. (Key files cannot do
 * this: they are read without blocking, and a FIFO is refused.)
 */
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { ExecutionContext } from 'ava';
import { parseConfig } from '../../src/config/load.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { Metrics } from '../../src/observability/metrics.ts';
import { Plugin } from '../../src/plugin.ts';
import { FaultProxy } from '../chaos/fault-proxy.ts';
import { requireServer, requireVar } from './servers.ts';

export async function openbaoBehindProxy(t: ExecutionContext, timeoutMs: number) {
  const server = requireServer('openbao');
  if ('missing' in server) throw new Error(server.missing);
  const need = (name: string) => requireVar(server.env, name, 'openbao');
  const proxy = await FaultProxy.start('openbao', need('VAULT_ADDR'));
  t.teardown(() => proxy.close());
  const backend = {
    name: 'slow',
    type: 'vault',
    address: `http://127.0.0.1:${proxy.port}`,
    transitMount: need('VAULT_TRANSIT_MOUNT'),
    keyName: need('VAULT_KEY_NAME'),
    auth: { method: 'token', tokenFile: need('VAULT_TOKEN_FILE') },
    timeoutMs,
  };
  return { proxy, backend };
}

/**
 * For tests that keep a Decrypt in flight in a `trousseau serve` process: an envelope
 * of `plaintext` wrapped by OpenBao alone, and a configuration file (in `dir`) that
 * serves `socketPath` with that backend behind the proxy, no background probes, and
 * the given drain deadline. Call `proxy.hold()` before the Decrypt to keep it waiting.
 */
export async function heldDecryptSetup(t: ExecutionContext, dir: string, socketPath: string, plaintext: Buffer, drainTimeoutMs: number) {
  const { proxy, backend } = await openbaoBehindProxy(t, 2900);
  const writer = await Plugin.create({ config: parseConfig({ quorum: 1, backends: [backend] }), baseDir: dir, logger: silentLogger(), metrics: new Metrics() });
  await writer.start();
  const envelope = await writer.encrypt(plaintext, 'v2', new AbortController().signal);
  await writer.close();
  const configFile = path.join(dir, 'config.yaml');
  await writeFile(
    configFile,
    JSON.stringify({
      socket: { path: socketPath },
      quorum: 1,
      backends: [backend],
      decrypt: { deadlineMs: 2900, hedging: { enabled: false } },
      health: { probeIntervalMs: 3_600_000 },
      escrow: { enabled: false },
      shutdown: { drainTimeoutMs },
    }),
  );
  return { proxy, envelope, configFile };
}
