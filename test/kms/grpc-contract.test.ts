/**
 * The KMS contract as kube-apiserver sees it, through a real gRPC client on a real
 * unix socket: v2 Status / Encrypt / Decrypt, v1beta1, the admin status.
 */
import test from 'ava';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { status } from '@grpc/grpc-js';
import { buildInfo } from '../../src/build-info.ts';
import { call } from '../../src/cli/client.ts';
import { renderStatus, type StatusDocument } from '../../src/cli/status-view.ts';
import { unavailable } from '../helpers/fault-backend.ts';
import type * as T from '../../src/kms/types.ts';
import { grpcError, startHarness } from '../helpers/plugin-harness.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

test('v2 Status answers version v2, healthz ok and a key_id of 1..1024 bytes', async (t) => {
  const h = await startHarness(t);
  const s = await h.status();
  t.is(s.version, 'v2');
  t.is(s.healthz, 'ok');
  t.true(Buffer.byteLength(s.key_id) >= 1 && Buffer.byteLength(s.key_id) <= 1024);
  t.false(s.key_id.endsWith('-partial'));
  // Stable while nothing changes.
  t.is((await h.status()).key_id, s.key_id);
});

test('two instances with the same key files report the same key_id; a different key gives another', async (t) => {
  const first = await startHarness(t);
  const shared = [...first.keyFiles].map(([name, keyFile]) => ({ name, keyFile }));
  const second = await startHarness(t, { backends: shared });
  const other = await startHarness(t); // same names, fresh keys
  const [a, b, c] = await Promise.all([first.status(), second.status(), other.status()]);
  t.is(a.key_id, b.key_id);
  t.not(a.key_id, c.key_id);
});

test('v2 Encrypt returns the Status key_id and round-trips through Decrypt', async (t) => {
  const h = await startHarness(t);
  const plaintext = Buffer.from('a 32-byte seed, as the apiserver'); // 32 bytes
  const encrypted = await h.encrypt(plaintext);
  t.is(encrypted.key_id, (await h.status()).key_id);
  t.true(encrypted.ciphertext.length >= 1 && encrypted.ciphertext.length <= 1024);
  t.false(encrypted.ciphertext.includes(plaintext));
  t.deepEqual(await h.decrypt(encrypted), plaintext);
  // An envelope from one instance opens on another holding the same keys.
  const twin = await startHarness(t, { backends: [...h.keyFiles].map(([name, keyFile]) => ({ name, keyFile })) });
  t.deepEqual(await twin.decrypt(encrypted), plaintext);
});

test('v2 round trip of the largest plaintext that fits, with copies moved to annotations', async (t) => {
  const h = await startHarness(t);
  const plaintext = Buffer.alloc(700, 7);
  const encrypted = await h.encrypt(plaintext);
  t.true(encrypted.ciphertext.length <= 1024);
  const keys = Object.keys(encrypted.annotations);
  t.true(keys.length > 0, 'copies that do not fit must move to annotations');
  for (const key of keys) t.regex(key, /^[a-z0-9-]+\.wrapped-key\.trousseau\.io$/);
  t.deepEqual(await h.decrypt(encrypted), plaintext);
});

test('v1beta1: Version says v1beta1; Encrypt/Decrypt round-trip with and without the version field', async (t) => {
  const h = await startHarness(t);
  const version = await call<T.V1VersionRequest, T.V1VersionResponse>(h.clients.v1, 'Version', { version: 'v1beta1' });
  t.is(version.version, 'v1beta1');
  t.is(version.runtime_name, 'trousseau');
  // The build's version, as --version and trousseau_build_info give it: package.json's in a checkout.
  t.is(version.runtime_version, buildInfo().version);
  if (!existsSync(path.join(root, 'build-info.json'))) {
    t.is(version.runtime_version, (JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8')) as { version: string }).version);
  }
  for (const v of ['v1beta1', '']) {
    const plain = Buffer.from(`dek for version "${v}"`);
    const { cipher } = await call<T.V1EncryptRequest, T.V1EncryptResponse>(h.clients.v1, 'Encrypt', { version: v, plain });
    t.false(cipher.includes(plain));
    const back = await call<T.V1DecryptRequest, T.V1DecryptResponse>(h.clients.v1, 'Decrypt', { version: v, cipher });
    t.deepEqual(back.plain, plain);
  }
});

test('admin Status is JSON with the key_id, quorum and each backend, and no key material', async (t) => {
  const h = await startHarness(t);
  const s = await h.status();
  const admin = await h.admin();
  t.is(admin.keyId, s.key_id);
  t.false(admin.partial);
  t.deepEqual(admin.missing, []);
  t.is(admin.quorum, 2);
  t.true(admin.healthy);
  t.deepEqual(
    admin.backends.map((b) => [b.name, b.breaker, b.probeOk]),
    [
      ['a', 'closed', true],
      ['b', 'closed', true],
      ['c', 'closed', true],
    ],
  );
  const raw = JSON.stringify(admin);
  const { readFile } = await import('node:fs/promises');
  for (const file of h.keyFiles.values()) {
    const key = (await readFile(file, 'utf8')).trim();
    t.false(raw.includes(key), 'admin status must not show key material');
  }
});

test('admin Status says why a backend failed last (lastErrorCause), and `trousseau status` prints it under the table', async (t) => {
  const h = await startHarness(t);
  h.fault('b').setMode(unavailable);
  await h.encrypt(Buffer.alloc(32, 9));
  const admin = await h.admin();
  const b = admin.backends.find((x) => x.name === 'b')!;
  t.is(b.lastError, 'BACKEND_UNAVAILABLE');
  t.is(b.lastErrorCause, 'injected outage of b');
  t.is(admin.backends.find((x) => x.name === 'a')!.lastErrorCause, undefined);
  const table = renderStatus(admin as unknown as StatusDocument); // the same JSON document the CLI reads
  t.regex(table, /last errors:\n {2}b {2}BACKEND_UNAVAILABLE \d+s ago: injected outage of b$/);
});

test('200 concurrent Decrypts through the socket all succeed', async (t) => {
  const h = await startHarness(t);
  const plaintexts = Array.from({ length: 4 }, (_, i) => Buffer.alloc(32, i + 1));
  const envelopes = await Promise.all(plaintexts.map((p) => h.encrypt(p)));
  const results = await Promise.allSettled(Array.from({ length: 200 }, (_, i) => h.decrypt(envelopes[i % 4]!, 20_000)));
  const failed = results.filter((r) => r.status === 'rejected');
  t.is(failed.length, 0, failed.map((f) => String(f.reason)).slice(0, 3).join('; '));
  results.forEach((r, i) => {
    if (r.status === 'fulfilled') t.deepEqual(r.value, plaintexts[i % 4]);
  });
  t.is((await h.status()).healthz, 'ok');
});

test('Status, Encrypt and Decrypt of a plugin with every backend down fail with UNAVAILABLE, not healthz != ok', async (t) => {
  const h = await startHarness(t, { backends: [{ name: 'a', mode: { kind: 'error', code: 'unavailable' } }, { name: 'b', mode: { kind: 'error', code: 'unavailable' } }], quorum: 1 });
  t.is((await grpcError(t, h.status())).code, status.UNAVAILABLE);
  t.is((await grpcError(t, h.encrypt(Buffer.alloc(32)))).code, status.UNAVAILABLE);
});
