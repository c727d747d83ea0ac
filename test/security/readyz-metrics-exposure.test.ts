/**
 * The HTTP port is open to every local user (the reference DaemonSet uses the host
 * network), while the admin socket that serves the full status is 0600. So /readyz
 * says ready or not with short fixed reasons, and /metrics labels carry only bounded
 * words and operator-chosen backend names: no key_id, key version, key identifier or
 * escrow detail. The reader here is an unprivileged user (uid 65534), as the threat is.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import test from 'ava';
import { ObservabilityServer } from '../../src/observability/http.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { unavailable } from '../helpers/fault-backend.ts';
import { eventually, startHarness } from '../helpers/plugin-harness.ts';

const run = promisify(execFile);

/** GET `url` as an unprivileged user (uid/gid 65534 when run as root, as CI does); returns status code and body. */
async function fetchAsNobody(url: string): Promise<{ code: number; body: string }> {
  const curl = ['curl', '-s', '-w', '\n%{http_code}', url];
  const [file, ...args] = process.getuid?.() === 0 ? ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', ...curl] : curl;
  const { stdout } = await run(file!, args, { timeout: 10_000 });
  const cut = stdout.lastIndexOf('\n');
  return { code: Number(stdout.slice(cut + 1)), body: stdout.slice(0, cut) };
}

/** Label names a metric of ours may use (and histogram buckets' le): all carry bounded values (see src/observability/metrics.ts). */
const ALLOWED_LABELS = new Set(['le', 'backend', 'operation', 'outcome', 'api', 'method', 'code', 'format_version', 'stage', 'result', 'reason']);
/** The software's own version and commit (trousseau_build_info), public in any release: not a key's. */
const BUILD_INFO_LABELS = new Set(['version', 'commit']);

test('an unprivileged local user gets ready/not-ready with short reasons from /readyz, and no key identifier from /metrics', async (t) => {
  const h = await startHarness(t, { backends: ['a', 'b', 'c'], quorum: 2, config: { health: { probeIntervalMs: 100, minBackoffMs: 50, maxBackoffMs: 200 } } });
  await h.plugin.verifyEscrow(); // escrow metrics and report exist
  await h.decrypt(await h.encrypt(Buffer.from('x')));
  const http = new ObservabilityServer(h.metrics, h.plugin, silentLogger());
  const { port } = await http.listen('127.0.0.1:0');
  t.teardown(() => http.close());

  const admin = await h.admin();
  const identifiers = [admin.keyId, ...admin.backends.map((b) => b.keyVersion).filter((v): v is string => Boolean(v))];
  t.true(identifiers.length >= 4);

  const ready = await fetchAsNobody(`http://127.0.0.1:${port}/readyz`);
  t.is(ready.code, 200);
  t.deepEqual(JSON.parse(ready.body), { ready: true, reasons: [] });

  h.fault('b').setMode(unavailable);
  h.fault('c').setMode(unavailable);
  await eventually(async () => ((await h.admin()).healthy ? undefined : true), 3000);
  const notReady = await fetchAsNobody(`http://127.0.0.1:${port}/readyz`);
  t.is(notReady.code, 503);
  t.deepEqual(JSON.parse(notReady.body), { ready: false, reasons: ['below quorum: 1 of 2 required backends usable; Encrypt fails'] });
  for (const id of [...identifiers, 'BACKEND_UNAVAILABLE', 'escrow']) t.false(notReady.body.includes(id), `/readyz shows ${id}`);

  const metrics = await fetchAsNobody(`http://127.0.0.1:${port}/metrics`);
  t.is(metrics.code, 200);
  let labelled = 0;
  for (const line of metrics.body.split('\n')) {
    if (line.startsWith('#') || !line.includes('{')) continue;
    const labels = line.slice(line.indexOf('{') + 1, line.lastIndexOf('}'));
    for (const [, name, value] of labels.matchAll(/([a-z_]+)="([^"]*)"/g)) {
      labelled++;
      const allowed = ALLOWED_LABELS.has(name!) || (line.startsWith('trousseau_build_info{') && BUILD_INFO_LABELS.has(name!));
      t.true(allowed, `label ${name} in ${line}`);
      for (const id of identifiers) t.false(value!.includes(id), `metric label holds an identifier: ${line}`);
    }
  }
  t.true(labelled > 20, 'too few labelled samples to mean anything');
});
