/**
 * Escrow verification in a plugin (engine/escrow-verifier.ts): each backend must
 * decrypt a canary envelope ALONE. Real local key files; faults are real file
 * changes, or a FaultBackend that refuses one operation.
 */
import { copyFile, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import test from 'ava';
import { generateKeyFile } from '../../src/backends/local.ts';
import { renderStatus, type StatusDocument } from '../../src/cli/status-view.ts';
import { call } from '../../src/cli/client.ts';
import type { EscrowReport } from '../../src/engine/escrow-verifier.ts';
import type * as T from '../../src/kms/types.ts';
import { ObservabilityServer } from '../../src/observability/http.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { rejected } from '../helpers/fault-backend.ts';
import { eventually, startHarness } from '../helpers/plugin-harness.ts';

const byName = (report: EscrowReport) => new Map(report.backends.map((b) => [b.backend, b]));

async function gauge(metrics: { registry: { getSingleMetricAsString(name: string): Promise<string> } }, backend: string): Promise<string | undefined> {
  const text = await metrics.registry.getSingleMetricAsString('trousseau_backend_escrow_verified');
  return new RegExp(`\\{backend="${backend}"\\} (\\d)`).exec(text)?.[1];
}

test('every local backend alone decrypts: the report, metrics and status table say so; /readyz just says ready', async (t) => {
  const h = await startHarness(t, { config: { escrow: { initialDelayMs: 3_600_000 } } });
  const before = (await h.admin()) as unknown as StatusDocument;
  t.is(before.escrow?.lastRunAt, undefined);
  t.regex(renderStatus(before), /escrow: {2}not verified yet/);

  const report = await h.plugin.verifyEscrow();
  t.true(report.ok);
  t.deepEqual(report.backends.map((b) => [b.backend, b.verified, b.stage]), [['a', true, undefined], ['b', true, undefined], ['c', true, undefined]]);
  for (const b of report.backends) t.truthy(b.keyVersion && b.since);
  for (const name of ['a', 'b', 'c']) t.is(await gauge(h.metrics, name), '1');
  t.regex(await h.metrics.registry.getSingleMetricAsString('trousseau_escrow_verifications_total'), /result="pass"\} 1/);

  const status = (await h.admin()) as unknown as StatusDocument;
  const table = renderStatus(status);
  t.regex(table, /ALONE DECRYPTS/);
  t.regex(table, /escrow: {2}every backend alone decrypts/);
  t.regex(table, /\ba .* yes \d+s/);

  const http = new ObservabilityServer(h.metrics, h.plugin, silentLogger());
  const bound = await http.listen('127.0.0.1:0');
  t.teardown(() => http.close());
  // /readyz only says ready: the escrow report names key versions, so it stays behind the admin socket.
  const readyz = (await (await fetch(`http://127.0.0.1:${bound.port}/readyz`)).json()) as Record<string, unknown>;
  t.deepEqual(readyz, { ready: true, reasons: [] });
  t.true(status.escrow?.ok);
  t.is(status.escrow?.backends.length, 3);
});

test('a backend that wraps but cannot unwrap fails alone, although a normal Decrypt still fails over and works', async (t) => {
  const h = await startHarness(t, { config: { escrow: { initialDelayMs: 3_600_000 } } });
  const encrypted = await h.encrypt(Buffer.from('data'));
  h.fault('b').setMode(rejected, ['unwrap']);
  t.deepEqual(await h.decrypt(encrypted), Buffer.from('data'));

  const report = await h.plugin.verifyEscrow();
  t.false(report.ok);
  const b = byName(report).get('b')!;
  t.is(b.verified, false);
  t.is(b.stage, 'unwrap');
  t.is(b.lastError, 'BACKEND_REJECTED');
  t.true(byName(report).get('a')!.verified);
  t.is(await gauge(h.metrics, 'b'), '0');
  t.regex(await h.metrics.registry.getSingleMetricAsString('trousseau_backend_escrow_failures_total'), /backend="b",stage="unwrap",code="BACKEND_REJECTED"\} 1/);
  t.regex(renderStatus((await h.admin()) as unknown as StatusDocument), /\bb .* NO unwrap:BACKEND_REJECTED/);

  h.fault('b').setMode({ kind: 'ok' });
  const again = await h.plugin.verifyEscrow();
  t.true(again.ok);
  const recovered = byName(again).get('b')!;
  t.true(recovered.verified);
  t.is(recovered.lastError, 'BACKEND_REJECTED', 'the last error class is kept after recovery');
  t.true(recovered.since! >= b.since!);
});

test('a removed key file fails at key_version, a replaced one at the retained canary; restoring it passes again', async (t) => {
  const h = await startHarness(t, { config: { escrow: { initialDelayMs: 3_600_000 } } });
  const file = h.keyFiles.get('b')!;
  const saved = `${file}.saved`;
  await copyFile(file, saved);
  t.true((await h.plugin.verifyEscrow()).ok);

  await rm(file);
  let report = await h.plugin.verifyEscrow();
  t.false(report.ok);
  t.like(byName(report).get('b'), { verified: false, stage: 'key_version', lastError: 'BACKEND_UNAVAILABLE' });
  t.true(byName(report).get('a')!.verified);

  // A different key under the same file name: fresh canaries work, old data does not.
  await generateKeyFile(file);
  report = await h.plugin.verifyEscrow();
  t.false(report.ok);
  t.like(byName(report).get('b'), { verified: false, stage: 'retained', lastError: 'BACKEND_REJECTED', retained: false });

  await rm(file);
  await copyFile(saved, file);
  report = await h.plugin.verifyEscrow();
  t.true(report.ok);
  t.like(byName(report).get('b'), { verified: true, retained: true });
});

test('renewing the canary accepts a replaced key; the canary file is shared across plugin instances', async (t) => {
  const h = await startHarness(t, { config: { escrow: { initialDelayMs: 3_600_000, canaryFile: 'canary.json' } } });
  t.true((await h.plugin.verifyEscrow()).ok);
  const canary = JSON.parse(await readFile(path.join(h.dir, 'canary.json'), 'utf8')) as { kind: string; ciphertext: string };
  t.is(canary.kind, 'trousseau-escrow-canary');

  const file = h.keyFiles.get('c')!;
  await rename(file, `${file}.old`);
  await generateKeyFile(file);
  t.is(byName(await h.plugin.verifyEscrow()).get('c')!.stage, 'retained');

  // A second plugin on the same files reads the reference from the file, so it fails too.
  const other = await startHarness(t, {
    backends: ['a', 'b', 'c'].map((name) => ({ name, keyFile: h.keyFiles.get(name)! })),
    config: { escrow: { initialDelayMs: 3_600_000, canaryFile: path.join(h.dir, 'canary.json') } },
  });
  t.is(byName(await other.plugin.verifyEscrow()).get('c')!.stage, 'retained');

  const renewed = await h.plugin.verifyEscrow(undefined, true);
  t.true(renewed.ok);
  t.not(JSON.parse(await readFile(path.join(h.dir, 'canary.json'), 'utf8')).ciphertext, canary.ciphertext);
  t.true((await h.plugin.verifyEscrow()).ok);
});

test('the admin Verify call runs a verification in the serving plugin', async (t) => {
  const h = await startHarness(t, { config: { escrow: { initialDelayMs: 3_600_000 } } });
  let response = await call<T.AdminVerifyRequest, T.AdminVerifyResponse>(h.clients.admin, 'Verify', { renew_canary: false });
  t.true(response.ok);
  t.is((JSON.parse(response.report_json) as EscrowReport).backends.length, 3);
  h.fault('a').setMode(rejected, ['wrap']);
  response = await call<T.AdminVerifyRequest, T.AdminVerifyResponse>(h.clients.admin, 'Verify', { renew_canary: false });
  t.false(response.ok);
  t.like(byName(JSON.parse(response.report_json) as EscrowReport).get('a'), { verified: false, stage: 'wrap' });
  t.regex(await h.metrics.registry.getSingleMetricAsString('trousseau_kms_requests_total'), /api="admin",method="Verify",code="OK"\} 2/);
});

test('verification runs on its schedule and stops with the plugin', async (t) => {
  const h = await startHarness(t, { config: { escrow: { initialDelayMs: 0, intervalMs: 1000 } } });
  const first = await eventually(() => h.plugin.escrow.report().lastRunAt, 3000);
  const second = await eventually(() => {
    const at = h.plugin.escrow.report().lastRunAt;
    return at !== undefined && at > first ? at : undefined;
  }, 3000);
  t.true(second - first >= 900);
  t.true(h.plugin.escrow.report().ok);
  await h.stop();
  const stoppedAt = h.plugin.escrow.report().lastRunAt;
  await new Promise((r) => setTimeout(r, 1300));
  t.is(h.plugin.escrow.report().lastRunAt, stoppedAt, 'no run after close');
});

test('escrow.enabled false: no scheduled run, but verify still works on demand', async (t) => {
  const h = await startHarness(t, { config: { escrow: { enabled: false, initialDelayMs: 0 } } });
  await new Promise((r) => setTimeout(r, 150));
  t.is(h.plugin.escrow.report().lastRunAt, undefined);
  t.regex(renderStatus((await h.admin()) as unknown as StatusDocument), /scheduled checks disabled/);
  t.true((await h.plugin.verifyEscrow()).ok);
});
