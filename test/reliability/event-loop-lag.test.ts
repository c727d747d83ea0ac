/**
 * Issue 10, item 6: only time a backend itself takes counts towards its breaker,
 * its health and the key_id, even when the plugin's event loop is late.
 *
 * Under a burst the event loop can be busy for longer than a backend's timeout, and
 * libuv runs due timers before it reads sockets: a backend answer that has been
 * sitting in the socket all along used to lose to its own timeout timer. The health
 * probe failed, the backend was marked down and the key_id turned partial (seen in the
 * overload bench). Here the real OpenBao server answers through a small proxy in this
 * process that, right after it has handed the answer to the plugin's socket, blocks
 * the event loop (synchronously, as a burst of gRPC work does) for twice the backend's
 * timeout. The answer is then ready to be read; only a timer that runs first could
 * miss it.
 */
import test, { type ExecutionContext } from 'ava';
import net from 'node:net';
import path from 'node:path';
import { generateKeyFile } from '../../src/backends/local.ts';
import { parseConfig } from '../../src/config/load.ts';
import { parseEnvelope } from '../../src/envelope/format.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { Metrics } from '../../src/observability/metrics.ts';
import { Plugin } from '../../src/plugin.ts';
import { tempDir } from '../helpers/plugin-harness.ts';
import { requireServer, requireVar } from '../helpers/servers.ts';

const TIMEOUT_MS = 1500;
const BLOCK_MS = 2 * TIMEOUT_MS;

/** Block this thread (and so the event loop) for `ms`, as synchronous work would. */
function blockEventLoop(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/**
 * A TCP proxy to OpenBao in this process. `blockAfterNextAnswer()` arms it: the next
 * chunk of an answer is written to the plugin's socket, then the event loop is blocked.
 */
async function stallingProxy(t: ExecutionContext, upstream: URL) {
  let armed = false;
  let armedOnRequest = false;
  let blocked = 0;
  const server = net.createServer((client) => {
    const toServer = net.connect(Number(upstream.port), upstream.hostname);
    client.on('error', () => toServer.destroy());
    toServer.on('error', () => client.destroy());
    client.on('data', (chunk: Buffer) => {
      if (armedOnRequest) {
        // Block before the request goes on: its answer cannot be there when the loop wakes.
        armedOnRequest = false;
        blocked += 1;
        blockEventLoop(BLOCK_MS);
      }
      toServer.write(chunk);
    });
    client.on('end', () => toServer.end());
    toServer.on('data', (chunk: Buffer) => {
      client.write(chunk); // libuv writes at once: the answer is in the plugin's socket
      if (!armed) return;
      armed = false;
      blocked += 1;
      blockEventLoop(BLOCK_MS);
    });
    toServer.on('end', () => client.end());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const { port } = server.address() as net.AddressInfo;
  return {
    address: `http://127.0.0.1:${port}`,
    blockAfterNextAnswer: () => (armed = true),
    blockOnNextRequest: () => (armedOnRequest = true),
    get blocked() {
      return blocked;
    },
  };
}

async function startPlugin(t: ExecutionContext, quorum: number, encrypt: Record<string, number> = { deadlineMs: 2900, stragglerGraceMs: 1000 }) {
  const server = requireServer('openbao');
  if ('missing' in server) {
    t.log(server.missing);
    return undefined;
  }
  const need = (name: string) => requireVar(server.env, name, 'openbao');
  const proxy = await stallingProxy(t, new URL(need('VAULT_ADDR')));
  const dir = await tempDir(t);
  await generateKeyFile(path.join(dir, 'local.key'));
  const metrics = new Metrics();
  const plugin = await Plugin.create({
    config: parseConfig({
      quorum,
      backends: [
        {
          name: 'vault',
          type: 'vault',
          address: proxy.address,
          transitMount: need('VAULT_TRANSIT_MOUNT'),
          keyName: need('VAULT_KEY_NAME'),
          auth: { method: 'token', tokenFile: need('VAULT_TOKEN_FILE') },
          timeoutMs: TIMEOUT_MS,
        },
        { name: 'local', type: 'local', keyFile: 'local.key' },
      ],
      // By default a grace OpenBao keeps to even on a loaded machine, yet shorter than
      // the block: the grace timer and the backend's timeout both fall due while the loop is blocked.
      encrypt,
      // Only the probes the test makes.
      health: { probeIntervalMs: 3_600_000 },
      escrow: { enabled: false },
    }),
    baseDir: dir,
    logger: silentLogger(),
    metrics,
  });
  await plugin.start();
  t.teardown(() => plugin.close());
  const timeouts = async () => {
    const counter = (await metrics.registry.getMetricsAsJSON()).find((m) => m.name === 'trousseau_backend_requests_total');
    return (counter?.values ?? []).filter((v) => v.labels.outcome === 'timeout').reduce((sum, v) => sum + v.value, 0);
  };
  return { plugin, proxy, timeouts };
}

test.serial('a health probe whose answer waits in the socket while the event loop is blocked passes: backend healthy, key_id unchanged', async (t) => {
  t.timeout(60_000);
  const rig = await startPlugin(t, 2);
  if (!rig) return t.pass();
  const { plugin, proxy, timeouts } = rig;
  const before = plugin.status();
  t.is(before.healthz, 'ok');

  proxy.blockAfterNextAnswer();
  const results = await plugin.prober.probeAll();
  t.is(proxy.blocked, 1, 'the event loop was not blocked');
  const vault = results.find((r) => r.backend === 'vault')!;
  t.true(vault.ok, `the probe failed: ${String((vault.error as Error | undefined)?.message)}`);
  t.is(await timeouts(), 0, 'an answer that had arrived was counted as a backend timeout');
  const after = plugin.status();
  t.is(after.healthz, 'ok');
  t.is(after.keyId, before.keyId, 'the key_id moved');
  t.is(plugin.backends.find((b) => b.name === 'vault')!.breakerState, 'closed');
});

test.serial('an Encrypt whose wrap answer waits in the socket while the event loop is blocked gets every copy: no timeout, no missed wrap', async (t) => {
  t.timeout(60_000);
  // Quorum 1 of 2: the local copy alone could answer, so a lost vault copy would not
  // fail the Encrypt but would leave the envelope short and move the key_id.
  const rig = await startPlugin(t, 1);
  if (!rig) return t.pass();
  const { plugin, proxy, timeouts } = rig;
  const before = plugin.status();

  proxy.blockAfterNextAnswer();
  const encrypted = await plugin.encrypt(Buffer.from('a secret'), 'v2', new AbortController().signal);
  t.is(proxy.blocked, 1, 'the event loop was not blocked');
  const copies = parseEnvelope(encrypted.ciphertext, encrypted.annotations).copies.map((c) => c.backendName);
  t.deepEqual(copies.sort(), ['local', 'vault'], 'the envelope lacks a copy');
  t.is(await timeouts(), 0, 'an answer that had arrived was counted as a backend timeout');
  const after = plugin.status();
  t.is(after.healthz, 'ok');
  t.is(after.keyId, before.keyId, 'the key_id moved');
  t.is(encrypted.keyId, before.keyId);
});

test.serial('a wrap still out when the event loop wakes past the Encrypt deadline is not held against the backend: refused "overloaded", key_id unchanged', async (t) => {
  t.timeout(60_000);
  // The loop is blocked (3 s) before the vault request is even sent on, past the vault
  // timeout (1.5 s) and the Encrypt deadline (2 s): no one can tell whether the
  // backend would have been in time. Quorum 1 of 2: the local copy alone could answer.
  const rig = await startPlugin(t, 1, { deadlineMs: 2000, stragglerGraceMs: 1000 });
  if (!rig) return t.pass();
  const { plugin, proxy, timeouts } = rig;
  const before = plugin.status();

  proxy.blockOnNextRequest();
  const error = await t.throwsAsync(plugin.encrypt(Buffer.from('a secret'), 'v2', new AbortController().signal));
  t.is(proxy.blocked, 1, 'the event loop was not blocked');
  t.is((error as { code?: string }).code, 'OVERLOADED', `not an overload refusal: ${error?.message}`);
  t.is(await timeouts(), 0, 'a timeout fired by the late event loop was counted as the backend\'s');
  const after = plugin.status();
  t.is(after.healthz, 'ok');
  t.is(after.keyId, before.keyId, 'the key_id moved (a missed wrap was recorded)');
  t.is(plugin.backends.find((b) => b.name === 'vault')!.health().lastError, undefined, 'the backend got the blame');
});
