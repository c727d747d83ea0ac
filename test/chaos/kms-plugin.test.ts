/**
 * Chaos scenario for the kms-plugin backend: the inner plugin (a private instance of
 * the real aws-encryption-provider, over the shared local-kms) is killed with SIGKILL,
 * leaving its socket behind, and started again. The plugin under test (in-process, the
 * same Plugin and KmsServer `serve` runs) has three backends, quorum 2: the kms-plugin
 * one first in Decrypt order, native vault (OpenBao) and local.
 *
 * Asserted as a client sees it: while the inner plugin is dead every Decrypt still
 * returns the right plaintext (through the other copies), Encrypts still reach quorum,
 * and the backend is shown down; once it is back, the same plugin process (no restart)
 * shows it up again, after a real wrap and unwrap through it, and new envelopes carry
 * its copy again, which opens alone.
 */
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import test from 'ava';
import { generateKeyFile } from '../../src/backends/local.ts';
import { peerStatus, startAwsEncryptionProvider } from '../helpers/kms-plugin-peer.ts';
import { requireServer, requireVar } from '../helpers/servers.ts';
import { adminStatus, backendOf, copiesOf, decrypt, encrypt, eventually, isUp, startInProcess, tempDir } from './rig.ts';

const peer = requireServer('aws-encryption-provider');
const bao = requireServer('openbao');

if ('missing' in peer || 'missing' in bao) {
  test.skip(`kms-plugin chaos: ${'missing' in peer ? peer.missing : ''} ${'missing' in bao ? bao.missing : ''}`, () => {});
} else {
  test('kms-plugin chaos: the inner plugin killed and restarted; reads never fail, the backend comes back in the same process', async (t) => {
    t.timeout(120_000);
    const { dir, remove } = await tempDir();
    t.teardown(remove);
    const inner = await startAwsEncryptionProvider(t, peer.env, dir);
    await generateKeyFile(path.join(dir, 'local.key'));
    const config = {
      socket: { path: path.join(dir, 'kms.sock') },
      quorum: 2,
      backends: [
        // Tried first by Decrypt: while it is dead, every Decrypt has to fail over.
        { name: 'inner-aws', type: 'kms-plugin', socket: inner.socket, priority: 10, timeoutMs: 1000, statusIntervalMs: 0 },
        {
          name: 'vault',
          type: 'vault',
          address: requireVar(bao.env, 'VAULT_ADDR', 'openbao'),
          transitMount: requireVar(bao.env, 'VAULT_TRANSIT_MOUNT', 'openbao'),
          keyName: requireVar(bao.env, 'VAULT_KEY_NAME', 'openbao'),
          auth: { method: 'token', tokenFile: requireVar(bao.env, 'VAULT_TOKEN_FILE', 'openbao') },
          timeoutMs: 1000,
        },
        { name: 'local', type: 'local', keyFile: 'local.key' },
      ],
      encrypt: { deadlineMs: 2000, stragglerGraceMs: 800, stragglerLatencyFactor: 0 },
      decrypt: { deadlineMs: 2500 },
      breaker: { resetTimeoutMs: 500, rollingWindowMs: 1000, volumeThreshold: 3, errorThresholdPercentage: 50 },
      health: { probeIntervalMs: 200, minBackoffMs: 100, maxBackoffMs: 200, recoverAfterMs: 1000 },
      escrow: { enabled: false },
      log: { level: 'warn' },
    };
    const run = await startInProcess(config, dir);
    t.teardown(() => run.stop());
    const clients = run.clients;
    const allUp = () => adminStatus(clients).then((v) => (['inner-aws', 'vault', 'local'].every((n) => isUp(v, n)) ? v : undefined));
    await eventually(allUp, 30_000, 100);

    // Envelopes with all three copies, written while everything is up.
    const baseline: { plaintext: Buffer; encrypted: NonNullable<Awaited<ReturnType<typeof encrypt>>['value']> }[] = [];
    for (let i = 0; baseline.length < 8 && i < 40; i++) {
      const plaintext = randomBytes(32);
      const result = await encrypt(clients, plaintext);
      if (result.ok && copiesOf(result.value!).length === 3) baseline.push({ plaintext, encrypted: result.value! });
    }
    t.is(baseline.length, 8, 'healthy Encrypts carry all three copies');

    // 1. Kill the inner plugin: its socket stays, connections are refused.
    await inner.kill();
    await t.throwsAsync(peerStatus(inner.socket, 1000));
    const failures: string[] = [];
    const readAll = async (phase: string) => {
      for (const { plaintext, encrypted } of baseline) {
        const d = await decrypt(clients, encrypted);
        if (!d.ok || !d.value!.equals(plaintext)) failures.push(`${phase}: ${d.code} ${d.detail ?? 'wrong plaintext'}`);
      }
    };
    await readAll('just killed');
    const down = await eventually(
      () => adminStatus(clients).then((v) => (backendOf(v, 'inner-aws').probeOk === false ? v : undefined)),
      30_000,
      100,
    );
    t.false(isUp(down, 'inner-aws'));
    await readAll('while down');
    const whileDown = await encrypt(clients, randomBytes(32));
    t.true(whileDown.ok, `Encrypt reaches quorum with vault and local (${whileDown.code} ${whileDown.detail ?? ''})`);
    if (whileDown.ok) t.deepEqual(copiesOf(whileDown.value!).sort(), ['local', 'vault']);

    // 2. Start it again on the same socket: the same plugin process picks it up.
    await inner.restart();
    await eventually(allUp, 30_000, 100);
    await readAll('after restart');
    const afterwards = await eventually(
      async () => {
        const result = await encrypt(clients, randomBytes(32));
        return result.ok && copiesOf(result.value!).includes('inner-aws') ? result.value! : undefined;
      },
      30_000,
      100,
    );
    t.true(copiesOf(afterwards).includes('inner-aws'));
    t.deepEqual(failures, [], 'every Decrypt returned the right plaintext');

    // The restarted inner plugin opens old copies alone: a plugin with only that backend.
    const alone = await startInProcess(
      { socket: { path: path.join(dir, 'alone.sock') }, quorum: 1, backends: [config.backends[0]], escrow: { enabled: false }, log: { level: 'warn' } },
      dir,
    );
    t.teardown(() => alone.stop());
    for (const { plaintext, encrypted } of baseline.slice(0, 3)) {
      const d = await decrypt(alone.clients, encrypted);
      t.true(d.ok && d.value!.equals(plaintext), `the inner-aws copy alone: ${d.code} ${d.detail ?? ''}`);
    }
  });
}
