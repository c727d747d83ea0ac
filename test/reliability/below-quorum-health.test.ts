/**
 * Below quorum the plugin tells the truth (issue: with one backend of four up and
 * quorum 2, Status said healthz "ok", /readyz 200 and `trousseau status` healthy,
 * while every Encrypt failed and a restarted apiserver could read nothing):
 * - Status keeps the frozen key_id but its healthz names the shortfall;
 * - /readyz is 503 with a short reason; `trousseau status` exits 2 and lists every
 *   missing backend;
 * - a plugin that starts below quorum announces no key_id at all (a gRPC error) until
 *   quorum is usable, so a restart never hands the apiserver a new key_id that no
 *   Encrypt can honour; once the backends are back, the key_id is the one from before.
 */
import { status as grpcStatus } from '@grpc/grpc-js';
import test, { type ExecutionContext } from 'ava';
import { ObservabilityServer } from '../../src/observability/http.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import type { Plugin } from '../../src/plugin.ts';
import { ok, unavailable } from '../helpers/fault-backend.ts';
import { eventually, grpcError, runCli, sleep, startHarness } from '../helpers/plugin-harness.ts';

// Fast probes, a short recovery hold and a short breaker reset, so outages end quickly.
const fastProbes = { health: { probeIntervalMs: 100, minBackoffMs: 50, maxBackoffMs: 200, recoverAfterMs: 300 }, breaker: { resetTimeoutMs: 200 } };
const FOUR = ['a', 'b', 'c', 'd'];

async function readyz(t: ExecutionContext, plugin: Plugin, metrics: ConstructorParameters<typeof ObservabilityServer>[0]): Promise<{ code: number; body: unknown }> {
  const http = new ObservabilityServer(metrics, plugin, silentLogger());
  const bound = await http.listen('127.0.0.1:0');
  t.teardown(() => http.close());
  const response = await fetch(`http://127.0.0.1:${bound.port}/readyz`);
  return { code: response.status, body: await response.json() };
}

test.serial('one backend of four up, quorum 2: healthz names the shortfall, key_id frozen, /readyz 503, `trousseau status` exits 2', async (t) => {
  const h = await startHarness(t, { backends: FOUR, quorum: 2, config: fastProbes });
  const full = await h.status();
  t.is(full.healthz, 'ok');
  for (const name of ['b', 'c', 'd']) h.fault(name).setMode(unavailable);
  const below = await eventually(async () => {
    const s = await h.status();
    return s.healthz !== 'ok' && (await h.admin()).backends.filter((b) => b.probeOk === false).length === 3 ? s : undefined;
  }, 10_000);
  t.is(below.healthz, 'below quorum: 1 of 2 required backends usable (down: b, c, d)');
  // Frozen at the last key_id above quorum (partial if one backend failed first).
  for (let i = 0; i < 5; i++) {
    t.is((await h.status()).key_id, below.key_id, 'the key_id moved below quorum');
    await sleep(60);
  }
  t.is((await grpcError(t, h.encrypt(Buffer.alloc(32)))).code, grpcStatus.UNAVAILABLE);

  t.deepEqual(await readyz(t, h.plugin, h.metrics), { code: 503, body: { ready: false, reasons: ['below quorum: 1 of 2 required backends usable; Encrypt fails'] } });

  const admin = await h.admin();
  t.false(admin.healthy);
  t.deepEqual(admin.missing, ['b', 'c', 'd'], 'the list of missing backends is incomplete');

  const table = await runCli(['status', '--socket', h.socketPath], { timeoutMs: 60_000 });
  t.is(table.code, 2, table.stdout + table.stderr);
  t.regex(table.stdout, /serving: NO: below quorum: 1 of 2 required backends usable/);
  t.regex(table.stdout, /missing: b, c, d/);
  const json = await runCli(['status', '--json', '--socket', h.socketPath], { timeoutMs: 60_000 });
  t.is(json.code, 2);
  t.false((JSON.parse(json.stdout) as { healthy: boolean }).healthy);

  // Back to quorum: healthy again, exit 0.
  h.fault('b').setMode(ok);
  await eventually(async () => ((await h.status()).healthz === 'ok' ? true : undefined), 10_000);
  t.is((await runCli(['status', '--socket', h.socketPath], { timeoutMs: 60_000 })).code, 0);
  t.is((await readyz(t, h.plugin, h.metrics)).code, 200);
});

test.serial('restarted below quorum: no key_id is announced (a gRPC error, no new -partial one); reads work; back at quorum the key_id is the old one', async (t) => {
  const first = await startHarness(t, { backends: FOUR, quorum: 2, config: fastProbes });
  const before = await first.status();
  const encrypted = await first.encrypt(Buffer.from('written before the restart'));
  const keyFiles = first.keyFiles;
  await first.stop();

  const h = await startHarness(t, {
    backends: FOUR.map((name) => ({ name, keyFile: keyFiles.get(name)!, ...(name === 'a' ? {} : { mode: unavailable }) })),
    quorum: 2,
    config: fastProbes,
  });
  for (let i = 0; i < 3; i++) {
    const error = await grpcError(t, h.status());
    t.is(error.code, grpcStatus.UNAVAILABLE, 'Status answered a key_id below quorum');
    t.regex(error.details, /below quorum: 1 of 2 required backends usable \(down: b, c, d\); no key_id is announced/);
  }
  t.false('keyId' in (await h.admin()), 'the admin status names a key_id');
  t.is((await readyz(t, h.plugin, h.metrics)).code, 503);
  t.is((await runCli(['status', '--socket', h.socketPath], { timeoutMs: 60_000 })).code, 2);
  t.deepEqual(await h.decrypt(encrypted), Buffer.from('written before the restart'));

  for (const name of ['b', 'c', 'd']) h.fault(name).setMode(ok);
  let last: unknown;
  const back = await eventually(async () => {
    const s = await h.status().catch((e: unknown) => e);
    last = s;
    return (s as { healthz?: string }).healthz === 'ok' && (s as { key_id?: string }).key_id === before.key_id ? s : undefined;
  }, 10_000).catch(() => last);
  t.deepEqual(back, { ...before });
});

test.serial('started below quorum, then quorum becomes usable: the first key_id is announced at once, before recoverAfterMs', async (t) => {
  const h = await startHarness(t, {
    backends: FOUR.map((name) => ({ name, ...(name === 'a' ? {} : { mode: unavailable }) })),
    quorum: 2,
    config: { ...fastProbes, health: { ...fastProbes.health, recoverAfterMs: 60_000 } },
  });
  t.is((await grpcError(t, h.status())).code, grpcStatus.UNAVAILABLE);
  h.fault('b').setMode(ok);
  const announced = await eventually(async () => h.status().catch(() => undefined), 10_000);
  t.is(announced.healthz, 'ok');
  t.regex(announced.key_id, /-partial$/);
  const encrypted = await h.encrypt(Buffer.from('x'));
  t.is(encrypted.key_id, (await h.status()).key_id, 'Encrypt and Status disagree');
});
