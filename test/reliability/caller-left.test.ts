/**
 * Issue 10, item 6: overload never changes the key_id. Under a burst, callers give up
 * (their 3 s deadline passes) while their Encrypts are still under way. The envelope
 * such an Encrypt builds is never delivered, so it never reaches etcd: a copy it
 * lacks says nothing about new envelopes, and must not be recorded as a missed wrap
 * (which marks the backend unhealthy and moves the key_id). Before, it was.
 */
import test from 'ava';
import { status, type ServiceError } from '@grpc/grpc-js';
import { latency } from '../helpers/fault-backend.ts';
import { sleep, startHarness } from '../helpers/plugin-harness.ts';

test('an Encrypt whose caller left before a slow copy came back records no missed wrap: key_id unchanged', async (t) => {
  t.timeout(60_000);
  // Quorum 1 of 2; b answers after 1.5 s (within its timeout and the straggler grace),
  // the client gives up after 300 ms.
  const h = await startHarness(t, {
    backends: [{ name: 'a' }, { name: 'b', timeoutMs: 2500 }],
    quorum: 1,
    config: { encrypt: { deadlineMs: 2900, stragglerGraceMs: 2000 }, health: { probeIntervalMs: 3_600_000 } },
  });
  const before = await h.status();
  h.fault('b').setMode(latency(1500));
  const error = await t.throwsAsync(h.encrypt(Buffer.from('a secret'), 300));
  t.is((error as ServiceError).code, status.DEADLINE_EXCEEDED);
  // Let the plugin finish the abandoned Encrypt and b's wrap settle.
  await sleep(2500);
  const admin = await h.admin();
  t.false(admin.partial, `key_id went partial (missing ${admin.missing.join(', ')})`);
  t.is((await h.status()).key_id, before.key_id, 'the key_id moved');
});
