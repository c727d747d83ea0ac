/**
 * Issue 13's mixed configuration, end to end: `trousseau serve --config FILE` with a
 * native vault backend (OpenBao), a kms-plugin backend over the real
 * aws-encryption-provider (over local-kms), and a local key, driven through its socket
 * by the CLI's own KMS v2 client. Encrypt/Decrypt round trips; every envelope carries
 * all three copies, and each copy opens alone (a plugin configured with that backend
 * only decrypts it), so any one KMS is enough to read every envelope.
 */
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import test from 'ava';
import { generateKeyFile } from '../../src/backends/local.ts';
import { adminStatus, copiesOf, decrypt, encrypt, eventually, isUp, startChild, startInProcess, status, tempDir } from '../chaos/rig.ts';
import { peerStatus } from '../helpers/kms-plugin-peer.ts';
import { requireServer, requireVar } from '../helpers/servers.ts';

const peer = requireServer('aws-encryption-provider');
const bao = requireServer('openbao');

if ('missing' in peer || 'missing' in bao) {
  test.skip(`kms-plugin done-when: ${'missing' in peer ? peer.missing : ''} ${'missing' in bao ? bao.missing : ''}`, () => {});
} else {
  test('done-when: native vault + kms-plugin over aws-encryption-provider + local; round trips, and each copy opens alone', async (t) => {
    t.timeout(120_000);
    const { dir, remove } = await tempDir();
    t.teardown(remove);
    await generateKeyFile(path.join(dir, 'local.key'));
    const innerSocket = requireVar(peer.env, 'AWS_ENCRYPTION_PROVIDER_SOCKET', 'aws-encryption-provider');
    const innerKeyId = (await peerStatus(innerSocket, 3000)).key_id;
    const backends = [
      {
        name: 'vault',
        type: 'vault',
        address: requireVar(bao.env, 'VAULT_ADDR', 'openbao'),
        transitMount: requireVar(bao.env, 'VAULT_TRANSIT_MOUNT', 'openbao'),
        keyName: requireVar(bao.env, 'VAULT_KEY_NAME', 'openbao'),
        auth: {
          method: 'approle',
          roleIdFile: requireVar(bao.env, 'VAULT_APPROLE_ROLE_ID_FILE', 'openbao'),
          secretIdFile: requireVar(bao.env, 'VAULT_APPROLE_SECRET_ID_FILE', 'openbao'),
        },
      },
      { name: 'aws-plugin', type: 'kms-plugin', socket: innerSocket, timeoutMs: 2000 },
      { name: 'local', type: 'local', keyFile: path.join(dir, 'local.key') },
    ];
    const settings = { escrow: { enabled: false }, log: { level: 'warn' }, health: { probeIntervalMs: 1000 } };
    const serve = await startChild({ socket: { path: path.join(dir, 'kms.sock') }, quorum: 2, backends, ...settings }, dir, {}, 'done-when');
    t.teardown(() => serve.stop());

    const view = await eventually(() => adminStatus(serve.clients).then((v) => (backends.every((b) => isUp(v, b.name)) ? v : undefined), () => undefined), 30_000, 200);
    t.true(view.healthy);
    const kmsStatus = await status(serve.clients);
    t.true(kmsStatus.ok && kmsStatus.value!.healthz === 'ok');
    const described = view.backends.find((b) => b.name === 'aws-plugin') as { keyVersion?: string } | undefined;
    t.is(described?.keyVersion, innerKeyId, "the kms-plugin backend's key version is the inner plugin's key_id");

    const envelopes: { plaintext: Buffer; encrypted: NonNullable<Awaited<ReturnType<typeof encrypt>>['value']> }[] = [];
    for (let i = 0; envelopes.length < 5 && i < 20; i++) {
      const plaintext = randomBytes(32 + i);
      const e = await encrypt(serve.clients, plaintext, `done-when-${i}`);
      t.true(e.ok, `Encrypt: ${e.code} ${e.detail ?? ''}`);
      if (!e.ok) continue;
      t.is(e.value!.key_id, kmsStatus.value!.key_id);
      if (copiesOf(e.value!).length === 3) envelopes.push({ plaintext, encrypted: e.value! });
      const d = await decrypt(serve.clients, e.value!);
      t.true(d.ok && d.value!.equals(plaintext), `Decrypt: ${d.code} ${d.detail ?? ''}`);
    }
    t.is(envelopes.length, 5, 'envelopes with all three copies');
    t.true(envelopes.every((e) => e.encrypted.ciphertext.length <= 1024), 'fits the KMS v2 ciphertext limit');

    // Each copy alone: a plugin that knows only that backend opens every envelope.
    for (const backend of backends) {
      const alone = await startInProcess({ socket: { path: path.join(dir, `${backend.name}.sock`) }, quorum: 1, backends: [backend], ...settings }, dir);
      try {
        for (const { plaintext, encrypted } of envelopes) {
          const d = await decrypt(alone.clients, encrypted);
          t.true(d.ok && d.value!.equals(plaintext), `${backend.name} alone: ${d.code} ${d.detail ?? ''}`);
        }
      } finally {
        await alone.stop();
      }
    }
  });
}
