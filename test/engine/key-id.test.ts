/**
 * The Status key_id under backend outages, recoveries, flapping and key rotation,
 * with a fast health probe (100 ms) and a short recovery hold (300 ms).
 */
import test from 'ava';
import { status } from '@grpc/grpc-js';
import { addKeyToFile } from '../../src/backends/local.ts';
import { parseEnvelope } from '../../src/envelope/format.ts';
import { ok, unavailable } from '../helpers/fault-backend.ts';
import { eventually, grpcError, sleep, startHarness } from '../helpers/plugin-harness.ts';

const RECOVER_MS = 300;
const fastProbes = (extra: Record<string, unknown> = {}) => ({
  health: { probeIntervalMs: 100, minBackoffMs: 50, maxBackoffMs: 200, recoverAfterMs: RECOVER_MS },
  ...extra,
});

test.serial('a backend down gives a partial key_id; back up, it stays partial for recoverAfterMs, then returns to the full one', async (t) => {
  const h = await startHarness(t, { config: fastProbes() });
  const full = (await h.status()).key_id;
  h.fault('c').setMode(unavailable);
  const partial = await eventually(async () => {
    const s = await h.status();
    return s.key_id !== full ? s : undefined;
  }, 2000);
  t.regex(partial.key_id, /-partial$/);
  t.is(partial.healthz, 'ok');
  const admin = await h.admin();
  t.deepEqual(admin.missing, ['c']);
  // Encrypt during the outage: two copies, and the key_id Encrypt returns is the Status one.
  const encrypted = await h.encrypt(Buffer.alloc(32, 3));
  t.is(encrypted.key_id, partial.key_id);

  h.fault('c').setMode(ok);
  const backAt = performance.now();
  const recovered = await eventually(async () => ((await h.status()).key_id === full ? performance.now() : undefined), 3000, 10);
  const held = recovered - backAt;
  t.true(held >= RECOVER_MS - 20, `key_id returned to full after ${Math.round(held)} ms, before recoverAfterMs`);
  t.true(held < RECOVER_MS + 1200, `key_id took ${Math.round(held)} ms to recover`);
  t.deepEqual(await h.decrypt(encrypted), Buffer.alloc(32, 3));
});

test.serial('a flapping backend moves the key_id at most twice, not on every flap', async (t) => {
  const h = await startHarness(t, { config: fastProbes() });
  const seen: string[] = [(await h.status()).key_id];
  let down = false;
  const flapper = setInterval(() => {
    down = !down;
    h.fault('b').setMode(down ? unavailable : ok);
  }, 150);
  t.teardown(() => clearInterval(flapper));
  const until = Date.now() + 2000;
  while (Date.now() < until) {
    const id = (await h.status()).key_id;
    if (id !== seen.at(-1)) seen.push(id);
    await sleep(15);
  }
  clearInterval(flapper);
  const changes = seen.length - 1;
  t.true(changes >= 1, 'the outages were never noticed');
  t.true(changes <= 2, `key_id changed ${changes} times in 2 s of flapping`);
  t.true(seen.slice(1).every((id) => id.endsWith('-partial')));
});

test.serial('below quorum the key_id is frozen, and Status answers it with a healthz that names the shortfall', async (t) => {
  const h = await startHarness(t, { config: fastProbes() });
  h.fault('b').setMode(unavailable);
  const partial = await eventually(async () => {
    const id = (await h.status()).key_id;
    return id.endsWith('-partial') ? id : undefined;
  }, 2000);
  h.fault('c').setMode(unavailable);
  await eventually(async () => ((await h.admin()).backends.find((b) => b.name === 'c')!.probeOk === false ? true : undefined), 2000);
  for (let i = 0; i < 5; i++) {
    const s = await h.status();
    t.is(s.healthz, 'below quorum: 1 of 2 required backends usable (down: b, c)');
    t.is(s.key_id, partial, 'the key_id moved below quorum');
    await sleep(60);
  }
  // Encrypt cannot meet quorum: a clean UNAVAILABLE, Decrypt keeps working through "a".
  t.is((await grpcError(t, h.encrypt(Buffer.alloc(32)))).code, status.UNAVAILABLE);
});

test.serial('all backends down: Status is a gRPC UNAVAILABLE error, not a healthz string', async (t) => {
  const h = await startHarness(t, { config: fastProbes() });
  for (const name of ['a', 'b', 'c']) h.fault(name).setMode(unavailable);
  const error = await eventually(async () => {
    try {
      await h.status();
      return undefined;
    } catch (e) {
      return e as { code: number; details: string };
    }
  }, 2000);
  t.is(error.code, status.UNAVAILABLE);
  for (const name of ['a', 'b', 'c']) h.fault(name).setMode(ok);
  // The backends come back one probe at a time: a Status between the first and the
  // second answers "below quorum" (no error). Wait for the whole recovery.
  const back = await eventually(async () => {
    const st = await h.status().catch(() => undefined);
    return st?.healthz === 'ok' ? st : undefined;
  }, 3000);
  t.is(back.healthz, 'ok');
});

test.serial('local key rotation changes the key_id within the probe interval; old envelopes still decrypt', async (t) => {
  const h = await startHarness(t, { config: fastProbes() });
  const before = await h.encrypt(Buffer.from('written before the rotation'));
  const oldId = (await h.status()).key_id;
  t.is(before.key_id, oldId);
  await addKeyToFile(h.keyFiles.get('a')!);
  const rotatedAt = performance.now();
  const newId = await eventually(async () => {
    const id = (await h.status()).key_id;
    return id !== oldId ? id : undefined;
  }, 2000, 10);
  t.true(performance.now() - rotatedAt < 600, 'rotation not seen within a few probe intervals');
  t.false(newId.endsWith('-partial'), 'a rotation is a new full key_id, not an outage');
  const after = await h.encrypt(Buffer.from('written after the rotation'));
  t.is(after.key_id, newId);
  t.deepEqual(await h.decrypt(before), Buffer.from('written before the rotation'));
  // Only "a" is asked, with its old key: the others are down, so the rotation really kept it.
  h.fault('b').setMode(unavailable);
  h.fault('c').setMode(unavailable);
  t.deepEqual(await h.decrypt(before), Buffer.from('written before the rotation'));
  t.deepEqual(await h.decrypt(after), Buffer.from('written after the rotation'));
});

test.serial('an Encrypt while the key_id is frozen below quorum never returns a key_id claiming a copy the envelope lacks', async (t) => {
  // Probes by hand (none in the background) and a long recovery hold, to set up the state exactly.
  const h = await startHarness(t, { config: { health: { probeIntervalMs: 3_600_000, recoverAfterMs: 60_000 } } });
  const probe = () => h.plugin.prober.probeAll();
  h.fault('c').setMode(unavailable);
  await probe();
  const missingC = (await h.admin()).keyId; // partial: a and b healthy
  h.fault('b').setMode(unavailable);
  await probe();
  t.is((await h.status()).key_id, missingC, 'below quorum the key_id is frozen');
  // c answers again but has not been healthy for recoverAfterMs; b is still down.
  h.fault('c').setMode(ok);
  const encrypted = await h.encrypt(Buffer.alloc(32, 5));
  const copies = parseEnvelope(encrypted.ciphertext).copies.map((c) => c.backendName);
  t.deepEqual(copies, ['a', 'c']);
  t.not(encrypted.key_id, missingC, 'the frozen key_id names b, which the envelope lacks');
  t.regex(encrypted.key_id, /-partial$/);
  t.is((await h.status()).key_id, encrypted.key_id, 'Status adopts the key_id Encrypt returned');
  t.deepEqual(await h.decrypt(encrypted), Buffer.alloc(32, 5));
});
