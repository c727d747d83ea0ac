/**
 * Quorum Encrypt through the gRPC server: k of n with failing or hanging backends
 * either succeeds with at least k real copies or fails cleanly with UNAVAILABLE, and
 * its latency follows the k-th fastest backend, not the slowest.
 */
import test from 'ava';
import fc from 'fast-check';
import { status } from '@grpc/grpc-js';
import { parseEnvelope } from '../../src/envelope/format.ts';
import { hang, latency, ok, rejected, unavailable, type FaultMode } from '../helpers/fault-backend.ts';
import { grpcError, startHarness } from '../helpers/plugin-harness.ts';

const copiesOf = (e: { ciphertext: Buffer; annotations: Record<string, Buffer> }) =>
  parseEnvelope(e.ciphertext, new Map(Object.entries(e.annotations))).copies.map((c) => c.backendName);

const MODES: { label: string; mode: FaultMode; works: boolean }[] = [
  { label: 'ok', mode: ok, works: true },
  { label: 'slow', mode: latency(5, 10), works: true },
  { label: 'unavailable', mode: unavailable, works: false },
  { label: 'rejected', mode: rejected, works: false },
  { label: 'hang', mode: hang, works: false },
];

for (const [n, quorum] of [
  [3, 2],
  [4, 3],
] as const) {
  test.serial(`${quorum} of ${n}: any mix of failing and hanging backends gives a full result or a clean UNAVAILABLE`, async (t) => {
    const names = Array.from({ length: n }, (_, i) => `b${i}`);
    const h = await startHarness(t, {
      backends: names.map((name) => ({ name, timeoutMs: 100 })),
      quorum,
      // The breaker would turn a later "ok" into a refusal; this property is about quorum alone.
      config: { breaker: { volumeThreshold: 1000 }, encrypt: { stragglerGraceMs: 0 } },
    });
    await fc.assert(
      fc.asyncProperty(fc.array(fc.constantFrom(...MODES), { minLength: n, maxLength: n }), async (modes) => {
        modes.forEach((m, i) => h.fault(names[i]!).setMode(m.mode));
        const working = names.filter((_, i) => modes[i]!.works);
        const plaintext = Buffer.from('quorum property seed');
        const started = performance.now();
        const result = await h.encrypt(plaintext).then(
          (r) => ({ ok: r }),
          (error: { code: number }) => ({ error }),
        );
        const elapsed = performance.now() - started;
        // Whatever happened, a hanging backend (100 ms timeout) must not hold the call much longer.
        t.true(elapsed < 1500, `encrypt took ${Math.round(elapsed)} ms`);
        if (working.length >= quorum) {
          if (!('ok' in result)) return t.fail(`expected success with ${working.join(',')} working, got ${result.error.code}`);
          const copies = copiesOf(result.ok);
          t.true(copies.length >= quorum, `only ${copies.length} copies`);
          t.true(copies.every((c) => working.includes(c)), 'a copy from a failing backend');
          for (const name of names) h.fault(name).setMode(ok);
          t.deepEqual(await h.decrypt(result.ok), plaintext);
        } else {
          if (!('error' in result)) return t.fail(`expected UNAVAILABLE with only ${working.length} working`);
          t.is(result.error.code, status.UNAVAILABLE);
        }
        return undefined;
      }),
      { numRuns: 15 },
    );
  });
}

test.serial('latencies 20/50/200 ms with quorum 2 and no grace: Encrypt answers with the 2nd fastest, without the slow copy', async (t) => {
  const h = await startHarness(t, {
    backends: ['fast', 'mid', 'slow'],
    quorum: 2,
    config: { encrypt: { stragglerGraceMs: 0 }, health: { probeIntervalMs: 3_600_000, recoverAfterMs: 60_000 } },
  });
  const full = (await h.status()).key_id;
  h.fault('fast').setMode(latency(20));
  h.fault('mid').setMode(latency(50));
  h.fault('slow').setMode(latency(200));
  const started = performance.now();
  const encrypted = await h.encrypt(Buffer.alloc(32, 1));
  const elapsed = performance.now() - started;
  // A functional check of parallelism (sequential would be >= 270 ms), not a benchmark.
  t.true(elapsed >= 45 && elapsed < 150, `encrypt took ${Math.round(elapsed)} ms`);
  t.deepEqual(copiesOf(encrypted), ['fast', 'mid']);
  // The envelope lacks a copy, so the key_id it carries is the partial one, and Status agrees.
  t.not(encrypted.key_id, full);
  t.regex(encrypted.key_id, /-partial$/);
  t.is((await h.status()).key_id, encrypted.key_id);
  // The abandoned straggler was aborted, not left running.
  t.is(h.fault('slow').aborts, 1);
  t.deepEqual(await h.decrypt(encrypted), Buffer.alloc(32, 1));
});

test.serial('straggler grace: a backend answering within the grace still gets its copy in', async (t) => {
  const h = await startHarness(t, { backends: ['fast', 'mid', 'slow'], quorum: 2, config: { encrypt: { stragglerGraceMs: 300 } } });
  const full = (await h.status()).key_id;
  h.fault('fast').setMode(latency(10));
  h.fault('mid').setMode(latency(20));
  h.fault('slow').setMode(latency(80));
  const started = performance.now();
  const encrypted = await h.encrypt(Buffer.alloc(32, 2));
  const elapsed = performance.now() - started;
  t.deepEqual(copiesOf(encrypted), ['fast', 'mid', 'slow']);
  t.is(encrypted.key_id, full);
  // It finished when the last backend answered, not at the end of the grace.
  t.true(elapsed < 250, `encrypt took ${Math.round(elapsed)} ms`);
});

for (const factor of [2, 0]) {
  const kept = factor > 0;
  test.serial(`straggler grace, latency factor ${factor}: a backend steadily at 300 ms (far away, grace 150 ms) ${kept ? 'keeps its copy and the key_id stays full' : 'is left out (the factor turned off)'}`, async (t) => {
    const h = await startHarness(t, {
      backends: ['fast', 'mid', 'far'],
      quorum: 2,
      config: { encrypt: { stragglerGraceMs: 150, stragglerLatencyFactor: factor }, health: { probeIntervalMs: 3_600_000, recoverAfterMs: 60_000 } },
    });
    const full = (await h.status()).key_id;
    h.fault('fast').setMode(latency(5));
    h.fault('mid').setMode(latency(10));
    h.fault('far').setMode(latency(300));
    // Its pace is known from its own successful calls: here three health probes.
    for (let i = 0; i < 3; i++) await h.plugin.prober.probeAll();
    const encrypted = await h.encrypt(Buffer.alloc(32, 3));
    if (kept) {
      t.deepEqual(copiesOf(encrypted), ['fast', 'mid', 'far']);
      t.is(encrypted.key_id, full);
    } else {
      t.deepEqual(copiesOf(encrypted), ['fast', 'mid']);
      t.regex(encrypted.key_id, /-partial$/);
    }
  });
}

test.serial('below quorum nothing is returned: UNAVAILABLE and no partial envelope', async (t) => {
  const h = await startHarness(t, { backends: [{ name: 'a' }, { name: 'b', timeoutMs: 150 }, { name: 'c' }], quorum: 2 });
  h.fault('a').setMode(unavailable);
  h.fault('b').setMode(hang);
  const error = await grpcError(t, h.encrypt(Buffer.alloc(32)));
  t.is(error.code, status.UNAVAILABLE);
  t.regex(error.details, /only 1 of 2/);
  t.is(h.fault('b').aborts, 1, 'the hanging call is aborted at its timeout');
  t.is(h.fault('b').pending, 0);
});

test.serial('a backend marked down is still tried when the others can no longer reach quorum', async (t) => {
  const h = await startHarness(t, { backends: ['a', 'b', 'c'], quorum: 2 });
  // c fails one probe (so it is skipped at first), then recovers before its next probe.
  h.fault('c').setMode(unavailable);
  await h.plugin.prober.probeAll();
  t.false(h.plugin.backends.find((b) => b.name === 'c')!.usable);
  h.resetCounts();
  h.fault('c').setMode(ok);
  // Now b fails: a and b alone cannot reach quorum 2, so c is started within the same deadline.
  h.fault('b').setMode(unavailable);
  const encrypted = await h.encrypt(Buffer.alloc(32, 3));
  t.truthy(encrypted.ciphertext.length);
  t.is(h.fault('c').calls.wrap, 1);
  t.deepEqual(await h.decrypt(encrypted), Buffer.alloc(32, 3));
});
