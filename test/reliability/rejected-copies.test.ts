/**
 * A failover past a copy that no longer opens used to show only in two counters. Now
 * the refusing backend is counted in the admin status (count, last reason and time,
 * in `trousseau status`) and named in a warning that is rate-limited per backend.
 * (test/reliability/vault-key-recreated.test.ts does the same with a real re-created
 * Vault transit key.)
 */
import { Writable } from 'node:stream';
import test from 'ava';
import { renderStatus, type StatusDocument } from '../../src/cli/status-view.ts';
import { RejectedCopyTracker } from '../../src/engine/rejected-copies.ts';
import { createLogger } from '../../src/observability/logger.ts';
import { rejected } from '../helpers/fault-backend.ts';
import { startHarness } from '../helpers/plugin-harness.ts';

test('a copy refused while another opens the envelope is counted for that backend and shown by `trousseau status`', async (t) => {
  const h = await startHarness(t, { backends: [{ name: 'a', priority: 1 }, { name: 'b', priority: 2 }, { name: 'c', priority: 3 }] });
  const encrypted = await h.encrypt(Buffer.from('data'));
  h.fault('a').setMode(rejected, ['unwrap']);
  for (let i = 0; i < 3; i++) t.deepEqual(await h.decrypt(encrypted), Buffer.from('data'));
  const status = (await h.admin()) as unknown as StatusDocument;
  t.like(status.rejectedCopies, [{ backend: 'a', count: 3, lastReason: 'BACKEND_REJECTED' }]);
  t.regex(renderStatus(status), /REJECTED COPIES/);
  t.regex(renderStatus(status), /\ba .* 3 BACKEND_REJECTED \d+s ago/);
  t.regex(renderStatus(status), /\bb .* {2}- {2}/);
});

test('an envelope no copy opens is not reported as a rejected copy (it may be forged)', async (t) => {
  const h = await startHarness(t);
  const encrypted = await h.encrypt(Buffer.from('data'));
  for (const name of ['a', 'b', 'c']) h.fault(name).setMode(rejected, ['unwrap']);
  await t.throwsAsync(h.decrypt(encrypted));
  t.deepEqual(((await h.admin()) as unknown as StatusDocument).rejectedCopies, []);
});

test('the warning names the backend and the error class, at most once per interval per backend', (t) => {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString().split('\n').filter(Boolean)) lines.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  let now = 1_000_000;
  const tracker = new RejectedCopyTracker(createLogger('warn', sink), 60_000, () => now);
  for (let i = 0; i < 50; i++) tracker.record('vault', 'BACKEND_REJECTED');
  tracker.record('aws', 'TAMPERED');
  t.is(lines.length, 2);
  t.like(lines[0], { level: 'warn', backend: 'vault', reason: 'BACKEND_REJECTED', copies: 1, total: 1 });
  t.like(lines[1], { backend: 'aws', reason: 'TAMPERED' });
  now += 60_000;
  tracker.record('vault', 'BACKEND_REJECTED');
  t.is(lines.length, 3);
  t.like(lines[2], { backend: 'vault', copies: 50, total: 51 });
  t.like(tracker.report(), [{ backend: 'vault', count: 51, lastReason: 'BACKEND_REJECTED', lastAt: now }, { backend: 'aws', count: 1 }]);
});
