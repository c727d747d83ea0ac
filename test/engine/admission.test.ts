/**
 * Admission control's deadline rule at a free slot (engine/admission.ts).
 *
 * At the end of a burst the wait queue has been refused and slots free up while the
 * client still sends calls with a few milliseconds left. Taking every free slot would
 * start a round of calls (up to 32, the KMS bound) that can only be answered after the
 * client's deadline: work started that cannot finish in time. A free slot is now
 * refused to a call that recent hold times say cannot finish, as long as calls are
 * running to keep that estimate fresh; with nothing running it is still always taken.
 * Only at the KMS gate (`refuseLateAtFreeSlot`): a backend's admission leaves that
 * choice to the engine's failover.
 */
import test from 'ava';
import { Admission, type AdmissionPolicy, type Slot } from '../../src/engine/admission.ts';
import { sleep } from '../helpers/plugin-harness.ts';

const HOLD_MS = 100;

/** An Admission whose hold estimate (p90) has learnt ~100 ms from 16 real holds. */
async function trained(policy: AdmissionPolicy = { refuseLateAtFreeSlot: true }): Promise<Admission> {
  const admission = new Admission('kms', { maxInFlight: 32, maxQueued: 8, maxWaitMs: 1000 }, undefined, policy);
  const slots = await Promise.all(Array.from({ length: 16 }, () => admission.acquire()));
  await sleep(HOLD_MS);
  for (const slot of slots) slot.release();
  return admission;
}

test('with calls running, a free slot is refused to a call that cannot finish before its deadline', async (t) => {
  const admission = await trained();
  t.true(admission.expectedHoldMs >= HOLD_MS - 5, `hold estimate ${admission.expectedHoldMs} ms`);
  const running: Slot = await admission.acquire();
  const decision = admission.admit(Date.now() + 80);
  t.is(decision.kind, 'refused');
  t.is(decision.kind === 'refused' ? decision.reason : undefined, 'deadline');
  t.is(admission.inFlight, 1, 'no slot was taken');
  // One with the time to finish is still granted at once.
  const inTime = admission.admit(Date.now() + 1000);
  t.is(inTime.kind, 'granted');
  if (inTime.kind === 'granted') inTime.slot.release();
  running.release();
});

test('with nothing running, a free slot is always taken, whatever the estimate says', async (t) => {
  const admission = await trained();
  t.is(admission.inFlight, 0);
  const decision = admission.admit(Date.now() + 80);
  t.is(decision.kind, 'granted');
  if (decision.kind === 'granted') decision.slot.release();
});

test('a backend\'s admission (no such policy) still takes a free slot for a call short of time: a failover may still make it', async (t) => {
  const admission = await trained({});
  const running = await admission.acquire();
  const decision = admission.admit(Date.now() + 80);
  t.is(decision.kind, 'granted');
  if (decision.kind === 'granted') decision.slot.release();
  running.release();
});

test('a caller as good as gone is refused even at a free slot with nothing running', (t) => {
  const admission = new Admission('test', { maxInFlight: 1, maxQueued: 1, maxWaitMs: 1000 });
  const decision = admission.admit(Date.now() + 10);
  t.is(decision.kind, 'refused');
});
