/**
 * Chaos scenario for the pkcs11 backend: its token disappears under a running plugin
 * (the SoftHSM2 token folder moved away, so the module answers that no such token is
 * present and the open session is gone), then comes back.
 *
 * The plugin runs with quorum 2 over the pkcs11 backend and two local key files, and
 * is driven through its gRPC socket as the other chaos scenarios are. While the
 * token is gone, every Encrypt and Decrypt must succeed with the other two and
 * answer within the apiserver's deadline; once it is back, the backend must log in
 * again by itself (no restart) and wrap again.
 *
 * Its own file (and so its own process): the PKCS#11 module is one per process,
 * with its own copy of the token (test/backends/pkcs11-helpers.ts).
 */
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import test from 'ava';
import { generateKeyFile } from '../../src/backends/local.ts';
import type * as T from '../../src/kms/types.ts';
import { privateSoftHsm, softHsmServer } from '../backends/pkcs11-helpers.ts';
import { Recorder, adminStatus, backendOf, copiesOf, decrypt, encrypt, eventually, isUp, pool, startInProcess, tempDir } from './rig.ts';

const DECRYPT_P99_BOUND_MS = 3000;

const server = softHsmServer();
if ('missing' in server) {
  test.skip('chaos: pkcs11 token removed and restored', () => {});
} else {
  test.serial('chaos: pkcs11 token removed -> Encrypt and Decrypt succeed with the other two; restored -> the backend logs in again and wraps', async (t) => {
    const hsm = await privateSoftHsm(server.env);
    t.teardown(() => hsm.cleanup());
    const { dir, remove } = await tempDir();
    t.teardown(remove);
    await generateKeyFile(path.join(dir, 'a.key'));
    await generateKeyFile(path.join(dir, 'b.key'));
    const config = {
      socket: { path: path.join(dir, 'kms.sock') },
      quorum: 2,
      backends: [
        // priority 0: Decrypt asks the token first whenever it is up.
        { ...hsm.config(), name: 'hsm', priority: 0, timeoutMs: 800 },
        { name: 'local-a', type: 'local', keyFile: 'a.key' },
        { name: 'local-b', type: 'local', keyFile: 'b.key' },
      ],
      encrypt: { deadlineMs: 2000, stragglerGraceMs: 800 },
      decrypt: { deadlineMs: 2500 },
      breaker: { resetTimeoutMs: 500, rollingWindowMs: 1000, volumeThreshold: 3, errorThresholdPercentage: 50 },
      health: { probeIntervalMs: 200, minBackoffMs: 100, maxBackoffMs: 200, recoverAfterMs: 1000 },
      escrow: { enabled: false },
      log: { level: 'warn' },
    };
    const run = await startInProcess(config, dir);
    t.teardown(() => run.stop());
    await eventually(async () => (isUp(await adminStatus(run.clients), 'hsm') ? true : undefined), 30_000, 100);

    interface Envelope {
      plaintext: Buffer;
      encrypted: T.V2EncryptResponse;
    }
    const baseline: Envelope[] = [];
    for (let i = 0; baseline.length < 10 && i < 40; i++) {
      const plaintext = randomBytes(32 + i);
      const e = await encrypt(run.clients, plaintext);
      if (e.ok && copiesOf(e.value!).includes('hsm')) baseline.push({ plaintext, encrypted: e.value! });
    }
    t.is(baseline.length, 10, 'healthy Encrypts carry a pkcs11 copy');

    async function mixedLoad(rec: Recorder, ops: number): Promise<Envelope[]> {
      const written: Envelope[] = [];
      await pool(
        Array.from({ length: ops }, (_, i) => i),
        4,
        async (i) => {
          const plaintext = randomBytes(8 + i);
          const e = await encrypt(run.clients, plaintext);
          rec.add('encrypt', e);
          if (e.ok) written.push({ plaintext, encrypted: e.value! });
          const pick = baseline[i % baseline.length]!;
          const d = await decrypt(run.clients, pick.encrypted);
          if (d.ok && !d.value!.equals(pick.plaintext)) {
            d.ok = false;
            d.code = 'WRONG_PLAINTEXT';
          }
          rec.add('decrypt', d);
        },
      );
      return written;
    }

    // ---- the token goes away
    await hsm.removeToken();
    const down = new Recorder();
    const writtenDown = await mixedLoad(down, 40);
    t.log(down.table('pkcs11 token removed'));
    t.deepEqual(down.errors('encrypt'), {}, 'every Encrypt reaches quorum with the two local backends');
    t.deepEqual(down.errors('decrypt'), {}, 'every Decrypt succeeds');
    t.true((down.p('decrypt', 99) ?? 0) < DECRYPT_P99_BOUND_MS);
    const view = await eventually(async () => {
      const v = await adminStatus(run.clients);
      return isUp(v, 'hsm') ? undefined : v;
    }, 30_000, 100);
    t.false((backendOf(view, 'hsm').lastError ?? '').includes(hsm.pin), 'the health shows the PIN');
    // Envelopes written without the token are marked partial and still decrypt.
    for (const e of writtenDown) {
      if (!copiesOf(e.encrypted).includes('hsm')) t.true(e.encrypted.key_id.endsWith('-partial'), `key_id ${e.encrypted.key_id} claims a pkcs11 copy it lacks`);
    }

    // ---- the token comes back: no restart, the backend logs in again
    await hsm.restoreToken();
    await eventually(async () => (isUp(await adminStatus(run.clients), 'hsm') ? true : undefined), 30_000, 100);
    const up = new Recorder();
    const writtenUp = await mixedLoad(up, 20);
    t.log(up.table('pkcs11 token restored'));
    t.deepEqual(up.errors('encrypt'), {});
    t.deepEqual(up.errors('decrypt'), {});
    t.true(writtenUp.some((e) => copiesOf(e.encrypted).includes('hsm')), 'no Encrypt carries a pkcs11 copy after the token came back');
    // Everything written in every phase still decrypts.
    const all = new Recorder();
    await pool([...writtenDown, ...writtenUp], 4, async (e) => {
      const d = await decrypt(run.clients, e.encrypted);
      if (d.ok && !d.value!.equals(e.plaintext)) d.ok = false;
      all.add('decrypt', d);
    });
    t.deepEqual(all.errors('decrypt'), {});
  });
}
