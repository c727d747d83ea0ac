/**
 * A preferred backend whose server freezes (SIGSTOP of a local-kms of this test's own)
 * while Decrypts stream in at concurrency 16: every Decrypt must still be answered,
 * from the other copy. The server accepts nothing and answers nothing, so each call
 * to it waits for its timeout; with the backend timeout above the Decrypt deadline
 * (2.9 s, the most allowed, against 2.5 s), a Decrypt that waits for it fails. The hedge
 * budget (10 % + a burst of 10) covers only some of the calls in flight: the rest
 * waited for the deadline before the stalled backend was told apart from a slow one.
 */
import test from 'ava';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { generateKeyFile } from '../../src/backends/local.ts';
import { call, clientsFor } from '../../src/cli/client.ts';
import { parseConfig } from '../../src/config/load.ts';
import { KmsServer } from '../../src/kms/server.ts';
import type * as T from '../../src/kms/types.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { Metrics } from '../../src/observability/metrics.ts';
import { Plugin } from '../../src/plugin.ts';
import { eventually } from '../helpers/plugin-harness.ts';
import { localKmsBinary, OWN_KMS_CREDENTIALS, OWN_KMS_KEY_ARN, OWN_KMS_REGION, startOwnLocalKms } from '../helpers/own-local-kms.ts';

const CONCURRENCY = 16;
const AFTER_FREEZE = 400;

/** Sum of a counter's samples whose labels include all of `labels`. */
async function counter(metrics: Metrics, name: string, labels: Record<string, string>): Promise<number> {
  const metric = await metrics.registry.getSingleMetric(name)?.get();
  return (metric?.values ?? []).filter((v) => Object.entries(labels).every(([k, x]) => v.labels[k] === x)).reduce((sum, v) => sum + v.value, 0);
}

test.serial('a frozen preferred AWS server: every Decrypt at concurrency 16 is answered from the other copy', async (t) => {
  if (!existsSync(localKmsBinary())) {
    const missing = 'local-kms is not installed: start it with test/servers/up.sh local-kms';
    if (process.env.CI) throw new Error(missing);
    console.error(`\n!!! ${missing} (this test is SKIPPED)\n`);
    t.pass();
    return;
  }
  Object.assign(process.env, OWN_KMS_CREDENTIALS);
  const dir = await mkdtemp(path.join(os.tmpdir(), 'trousseau-frozen-'));
  const kms = await startOwnLocalKms(dir);
  t.teardown(async () => {
    await kms.stop();
    await rm(dir, { recursive: true, force: true });
  });
  await generateKeyFile(path.join(dir, 'local.key'));
  const socketPath = path.join(dir, 'kms.sock');
  const config = parseConfig(
    {
      socket: { path: socketPath },
      quorum: 2,
      backends: [
        // The longest timeout allowed, above the Decrypt deadline (the default 2.5 s).
        { name: 'aws', type: 'aws', priority: 1, timeoutMs: 2900, keyId: OWN_KMS_KEY_ARN, region: OWN_KMS_REGION, endpoint: kms.endpoint },
        { name: 'local', type: 'local', priority: 2, keyFile: 'local.key' },
      ],
      // No background probe during the test: it would only add calls to the frozen server.
      health: { probeIntervalMs: 3_600_000 },
      log: { level: 'error' },
    },
    'test configuration',
  );
  const metrics = new Metrics();
  const logger = silentLogger();
  const plugin = await Plugin.create({ config, baseDir: dir, logger, metrics });
  const server = new KmsServer(plugin, { path: socketPath, mode: config.socket.mode, group: config.socket.group }, metrics, logger);
  await plugin.start();
  await server.start();
  const clients = clientsFor(socketPath);
  t.teardown(async () => {
    clients.close();
    await server.stop(1000);
    await plugin.close();
  });

  const encrypted = await call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext: Buffer.alloc(32, 3), uid: 't' }, 10_000);
  const decrypt = () =>
    call<T.V2DecryptRequest, T.V2DecryptResponse>(clients.v2, 'Decrypt', { ciphertext: encrypted.ciphertext, key_id: encrypted.key_id, annotations: encrypted.annotations, uid: 't' }, 10_000);

  let frozen = false;
  let stop = false;
  let okBeforeFreeze = 0;
  let okAfterFreeze = 0;
  const failures: string[] = [];
  const workers = Array.from({ length: CONCURRENCY }, async () => {
    while (!stop) {
      const startedFrozen = frozen;
      try {
        await decrypt();
        if (startedFrozen) okAfterFreeze++;
        else okBeforeFreeze++;
      } catch (error) {
        failures.push(`${(error as { code?: number }).code ?? '?'}: ${(error as Error).message.slice(0, 200)}`);
      }
    }
  });
  // Enough answers from aws for its latency window to know what is normal for it.
  await eventually(() => (okBeforeFreeze >= 200 ? true : undefined), 60_000);
  const awsUnwrapsBefore = await counter(metrics, 'trousseau_backend_requests_total', { backend: 'aws', operation: 'unwrap', outcome: 'success' });
  kms.child.kill('SIGSTOP');
  frozen = true;
  // Decrypts that started with the server frozen, plus every one in flight at the freeze.
  await eventually(() => (okAfterFreeze + failures.length >= AFTER_FREEZE ? true : undefined), 60_000);
  stop = true;
  await Promise.all(workers);

  t.is(failures.length, 0, `every Decrypt is answered while the local copy is reachable; failed: ${failures.length}, e.g. ${JSON.stringify(failures.slice(0, 3))}`);
  t.true(okAfterFreeze >= AFTER_FREEZE);
  t.true(awsUnwrapsBefore >= 100, `aws was the preferred copy before the freeze (${awsUnwrapsBefore} unwraps)`);
  const localUnwraps = await counter(metrics, 'trousseau_backend_requests_total', { backend: 'local', operation: 'unwrap', outcome: 'success' });
  t.true(localUnwraps >= AFTER_FREEZE, `the local copy answered the Decrypts after the freeze (${localUnwraps} unwraps)`);
});
