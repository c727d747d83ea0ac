/**
 * Circuit breakers, observed from outside: through the gRPC server, the admin status
 * and the fault backend's call counts, with short real timeouts.
 */
import test from 'ava';
import { call } from '../../src/cli/client.ts';
import type * as T from '../../src/kms/types.ts';
import { hang, latency, ok, rejected, unavailable } from '../helpers/fault-backend.ts';
import { eventually, sleep, startHarness, type Harness } from '../helpers/plugin-harness.ts';

const PLAINTEXT = Buffer.alloc(32, 5);
const VOLUME = 4;
const RESET_MS = 300;
// Long enough for VOLUME timeouts in a row (200 ms each, more on a loaded machine,
// where a timer that fires late is extended by its lateness: engine/abort.ts).
const WINDOW_MS = 2500;

async function setup(t: Parameters<typeof startHarness>[0], hedging: Record<string, unknown> = { enabled: false }) {
  const h = await startHarness(t, {
    backends: [
      { name: 'preferred', priority: 1, timeoutMs: 200 },
      { name: 'other', priority: 2 },
    ],
    quorum: 2,
    config: {
      breaker: { volumeThreshold: VOLUME, errorThresholdPercentage: 50, rollingWindowMs: WINDOW_MS, resetTimeoutMs: RESET_MS },
      decrypt: { hedging },
    },
  });
  const encrypted = await h.encrypt(PLAINTEXT);
  // Let the start-up probe's and the Encrypt's successes roll out of the breaker's window,
  // so the window holds only what the test does.
  await sleep(WINDOW_MS + 150);
  h.resetCounts();
  return { h, encrypted };
}

const breakerOf = async (h: Harness, name: string) => (await h.admin()).backends.find((b) => b.name === name)!.breaker;

test.serial('breaker: opens after volumeThreshold failures, refuses without calling, half-opens for one trial, closes on success', async (t) => {
  const { h, encrypted } = await setup(t);
  const preferred = h.fault('preferred');
  preferred.setMode(unavailable);

  for (let i = 1; i < VOLUME; i++) {
    t.deepEqual(await h.decrypt(encrypted), PLAINTEXT, 'failover keeps Decrypt working');
    t.is(await breakerOf(h, 'preferred'), 'closed', `open after only ${i} failures`);
  }
  t.deepEqual(await h.decrypt(encrypted), PLAINTEXT);
  t.is(await breakerOf(h, 'preferred'), 'open');
  t.is(preferred.calls.unwrap, VOLUME);

  // Open: calls are refused before they reach the backend, and Decrypt still works.
  for (let i = 0; i < 5; i++) t.deepEqual(await h.decrypt(encrypted), PLAINTEXT);
  t.is(preferred.calls.unwrap, VOLUME, 'an open breaker let calls through');
  // Encrypt skips it too (quorum 2 of 2 cannot be met without it: a clean error, no call).
  await t.throwsAsync(h.encrypt(PLAINTEXT));
  t.is(preferred.calls.wrap, 0);

  await eventually(async () => ((await breakerOf(h, 'preferred')) === 'half-open' ? true : undefined), RESET_MS + 1000);
  // Half-open: of five concurrent Decrypts exactly one is the trial.
  preferred.setMode(latency(100));
  const results = await Promise.all(Array.from({ length: 5 }, () => h.decrypt(encrypted)));
  for (const r of results) t.deepEqual(r, PLAINTEXT);
  t.is(preferred.calls.unwrap, VOLUME + 1, 'half-open lets a single trial through');
  t.is(await breakerOf(h, 'preferred'), 'closed');

  preferred.setMode(ok);
  h.resetCounts();
  t.deepEqual(await h.decrypt(encrypted), PLAINTEXT);
  t.is(preferred.calls.unwrap, 1);
  t.is(h.fault('other').calls.unwrap, 0, 'closed again: the preferred backend serves alone');
});

test.serial('breaker: a failed half-open trial opens it again for another resetTimeout', async (t) => {
  const { h, encrypted } = await setup(t);
  const preferred = h.fault('preferred');
  preferred.setMode(unavailable);
  for (let i = 0; i < VOLUME; i++) await h.decrypt(encrypted);
  t.is(await breakerOf(h, 'preferred'), 'open');
  await eventually(async () => ((await breakerOf(h, 'preferred')) === 'half-open' ? true : undefined), RESET_MS + 1000);
  await h.decrypt(encrypted);
  t.is(preferred.calls.unwrap, VOLUME + 1);
  t.is(await breakerOf(h, 'preferred'), 'open');
  await h.decrypt(encrypted);
  t.is(preferred.calls.unwrap, VOLUME + 1);
});

test.serial('breaker: BACKEND_REJECTED errors do not open it', async (t) => {
  const { h, encrypted } = await setup(t);
  const preferred = h.fault('preferred');
  preferred.setMode(rejected);
  for (let i = 0; i < VOLUME * 3; i++) t.deepEqual(await h.decrypt(encrypted), PLAINTEXT);
  t.is(preferred.calls.unwrap, VOLUME * 3, 'every call reached the backend');
  t.is(await breakerOf(h, 'preferred'), 'closed');
});

test.serial('breaker: timeouts (a hanging backend) open it', async (t) => {
  const { h, encrypted } = await setup(t);
  h.fault('preferred').setMode(hang);
  for (let i = 0; i < VOLUME; i++) t.deepEqual(await h.decrypt(encrypted), PLAINTEXT);
  t.is(await breakerOf(h, 'preferred'), 'open');
  const started = performance.now();
  t.deepEqual(await h.decrypt(encrypted), PLAINTEXT);
  t.true(performance.now() - started < 150, 'an open breaker fails over without waiting for the timeout');
});

test.serial('breaker: calls the client abandoned do not count as backend failures', async (t) => {
  const { h, encrypted } = await setup(t);
  // Healthy but slower than the client is willing to wait.
  h.fault('preferred').setMode(latency(150));
  h.fault('other').setMode(latency(150));
  for (let i = 0; i < VOLUME * 2; i++) {
    await t.throwsAsync(
      call<T.V2DecryptRequest, T.V2DecryptResponse>(
        h.clients.v2,
        'Decrypt',
        { ciphertext: encrypted.ciphertext, uid: 'impatient', key_id: encrypted.key_id, annotations: encrypted.annotations },
        30,
      ),
    );
  }
  await sleep(200);
  t.is(await breakerOf(h, 'preferred'), 'closed', 'client cancellations opened the breaker of a healthy backend');
});

test.serial('breaker: a half-open trial abandoned because a hedge won does not close it', async (t) => {
  const { h, encrypted } = await setup(t, { enabled: true, minDelayMs: 10, maxDelayMs: 20 });
  const preferred = h.fault('preferred');
  preferred.setMode(unavailable);
  for (let i = 0; i < VOLUME; i++) await h.decrypt(encrypted);
  t.is(await breakerOf(h, 'preferred'), 'open');
  await eventually(async () => ((await breakerOf(h, 'preferred')) === 'half-open' ? true : undefined), RESET_MS + 1000);
  // The trial hangs; the hedge to "other" wins after ~20 ms and the trial is cancelled.
  preferred.setMode(hang);
  t.deepEqual(await h.decrypt(encrypted), PLAINTEXT);
  t.is(preferred.calls.unwrap, VOLUME + 1);
  t.not(await breakerOf(h, 'preferred'), 'closed', 'a trial that never answered closed the breaker');
});
