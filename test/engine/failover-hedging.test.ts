/**
 * Decrypt failover and hedging through the gRPC server: a hanging or failing
 * preferred backend must not push a Decrypt past its deadline, abandoned calls are
 * really aborted, and hedges stay within their budget.
 */
import test from 'ava';
import { hang, latency, ok, unavailable } from '../helpers/fault-backend.ts';
import { eventually, startHarness, type HarnessOptions } from '../helpers/plugin-harness.ts';

const PLAINTEXT = Buffer.alloc(32, 9);

/** Two backends, "preferred" (priority 1) and "other" (priority 2), quorum 2 so both copies exist. */
function twoBackends(hedging: Record<string, unknown>, preferredTimeoutMs = 2000): HarnessOptions {
  return {
    backends: [
      { name: 'preferred', priority: 1, timeoutMs: preferredTimeoutMs },
      { name: 'other', priority: 2 },
    ],
    quorum: 2,
    config: { decrypt: { deadlineMs: 2500, hedging } },
  };
}

test.serial('hedging: a hanging preferred backend costs about maxDelayMs, and the hanging call is aborted', async (t) => {
  const h = await startHarness(t, twoBackends({ enabled: true, minDelayMs: 10, maxDelayMs: 100 }));
  const encrypted = await h.encrypt(PLAINTEXT);
  h.resetCounts();
  const preferred = h.fault('preferred');
  preferred.setMode(hang);
  h.fault('other').setMode(latency(20));
  const aborted = preferred.nextAbort();
  const started = performance.now();
  t.deepEqual(await h.decrypt(encrypted), PLAINTEXT);
  const elapsed = performance.now() - started;
  // maxDelayMs (100) + the other's 20 ms, far below the preferred's 2 s timeout.
  t.true(elapsed >= 100 && elapsed < 400, `decrypt took ${Math.round(elapsed)} ms`);
  t.is(preferred.calls.unwrap, 1);
  t.is(h.fault('other').calls.unwrap, 1);
  // The loser is aborted at once, not left to hang until its timeout.
  await Promise.race([aborted, new Promise((_, reject) => setTimeout(() => reject(new Error('hanging call never aborted')), 200))]);
  t.is(preferred.pending, 0);
});

test.serial('no hedging: a hanging preferred backend fails over at its own timeout, still within the deadline', async (t) => {
  const h = await startHarness(t, twoBackends({ enabled: false }, 300));
  const encrypted = await h.encrypt(PLAINTEXT);
  h.resetCounts();
  h.fault('preferred').setMode(hang);
  const started = performance.now();
  t.deepEqual(await h.decrypt(encrypted, 3000), PLAINTEXT);
  const elapsed = performance.now() - started;
  t.true(elapsed >= 290 && elapsed < 900, `decrypt took ${Math.round(elapsed)} ms`);
  t.is(h.fault('preferred').aborts, 1);
});

test.serial('an erroring preferred backend fails over at once, without waiting for a hedge delay', async (t) => {
  const h = await startHarness(t, twoBackends({ enabled: true, minDelayMs: 400, maxDelayMs: 500 }));
  const encrypted = await h.encrypt(PLAINTEXT);
  h.resetCounts();
  h.fault('preferred').setMode(unavailable);
  const started = performance.now();
  t.deepEqual(await h.decrypt(encrypted), PLAINTEXT);
  const elapsed = performance.now() - started;
  t.true(elapsed < 150, `decrypt took ${Math.round(elapsed)} ms`);
  t.is(h.fault('preferred').calls.unwrap, 1, 'the preferred backend is tried first');
  t.is(h.fault('other').calls.unwrap, 1);
});

test.serial('a healthy preferred backend is used alone: no hedge, no call to the other', async (t) => {
  const h = await startHarness(t, twoBackends({ enabled: true, minDelayMs: 50, maxDelayMs: 200 }));
  const encrypted = await h.encrypt(PLAINTEXT);
  h.resetCounts();
  // 5 ms is well under the 50 ms minimum hedge delay; 40 calls fill the latency window.
  h.fault('preferred').setMode(latency(5));
  for (let i = 0; i < 40; i++) t.deepEqual(await h.decrypt(encrypted), PLAINTEXT);
  t.is(h.fault('preferred').calls.unwrap, 40);
  t.is(h.fault('other').calls.unwrap, 0);
});

test.serial('hedge budget: with a slow preferred backend, 200 Decrypts hedge about 10 % + burst, not every time', async (t) => {
  const ratio = 0.1;
  const burst = 10;
  const h = await startHarness(t, twoBackends({ enabled: true, minDelayMs: 1, maxDelayMs: 5, budgetRatio: ratio, budgetBurst: burst }));
  const encrypted = await h.encrypt(PLAINTEXT);
  h.resetCounts();
  // Every Decrypt would like to hedge: the preferred takes 30 ms, the hedge delay is at most 5 ms.
  h.fault('preferred').setMode(latency(30));
  h.fault('other').setMode(ok);
  // In waves of 10, so the budget refills between them as it would under steady traffic.
  for (let wave = 0; wave < 20; wave++) {
    const results = await Promise.all(Array.from({ length: 10 }, () => h.decrypt(encrypted)));
    for (const r of results) t.deepEqual(r, PLAINTEXT);
  }
  const hedges = h.fault('other').calls.unwrap;
  const allowed = 200 * ratio + burst;
  t.true(hedges >= burst, `only ${hedges} hedges: hedging does not work`);
  t.true(hedges <= allowed + 2, `${hedges} hedges for 200 decrypts: the budget allows about ${allowed}`);
  t.log(`${hedges} hedges over 200 decrypts`);
});

test.serial('a black-holed preferred backend that keeps losing to hedges is probed at once and moved behind the other', async (t) => {
  // Probes every minute only: without the early probe the hanging backend would keep
  // costing each Decrypt a hedge delay (or, with the budget spent, its full timeout).
  const h = await startHarness(t, {
    ...twoBackends({ enabled: true, minDelayMs: 20, maxDelayMs: 50, budgetRatio: 0.1, budgetBurst: 20 }, 300),
    config: {
      decrypt: { deadlineMs: 2500, hedging: { enabled: true, minDelayMs: 20, maxDelayMs: 50, budgetRatio: 0.1, budgetBurst: 20 } },
      health: { probeIntervalMs: 60000, minBackoffMs: 50, maxBackoffMs: 60000, recoverAfterMs: 60000 },
    },
  });
  const encrypted = await h.encrypt(PLAINTEXT);
  h.fault('preferred').setMode(hang);
  // Three lost races make it suspect; the probe then times out (300 ms) and marks it down.
  for (let i = 0; i < 3; i++) t.deepEqual(await h.decrypt(encrypted), PLAINTEXT);
  await eventually(async () => ((await h.admin()).backends.find((b) => b.name === 'preferred')?.probeOk === false ? true : undefined), 3000);
  h.resetCounts();
  const started = performance.now();
  for (let i = 0; i < 10; i++) t.deepEqual(await h.decrypt(encrypted), PLAINTEXT);
  const perDecrypt = (performance.now() - started) / 10;
  t.is(h.fault('preferred').calls.unwrap, 0, 'the suspect backend is no longer tried first');
  t.true(perDecrypt < 20, `decrypt took ${perDecrypt.toFixed(1)} ms each: still waiting on the dead backend`);
});
