/**
 * Malformed and hostile requests: each must end in a clean gRPC status (never a
 * crash, never UNKNOWN with a stack), cost ZERO backend calls (the fault backends
 * count them; background probes are off), never echo plaintext, and leave the
 * server answering.
 */
import test from 'ava';
import fc from 'fast-check';
import { status, type ServiceError } from '@grpc/grpc-js';
import { call } from '../../src/cli/client.ts';
import type * as T from '../../src/kms/types.ts';
import { grpcError, startHarness, type Harness } from '../helpers/plugin-harness.ts';

const MARKER = 'PLAINTEXT-MARKER-7f3a';

/** Runs `request`, expects one of `codes`, no backend call, and no plaintext in the error. */
async function expectRefused(t: Parameters<typeof grpcError>[0], h: Harness, request: Promise<unknown>, codes: status[] = [status.INVALID_ARGUMENT]) {
  const before = h.backendCalls();
  const error: ServiceError = await grpcError(t, request);
  t.true(codes.includes(error.code), `got ${status[error.code]} (${error.details})`);
  t.is(h.backendCalls(), before, `a malformed request reached a backend: ${error.details}`);
  for (const text of [error.details, error.message, JSON.stringify(error.metadata?.getMap() ?? {})]) {
    t.false(text.includes(MARKER), 'an error echoed the plaintext');
    t.false(text.includes(Buffer.from(MARKER).toString('base64')), 'an error echoed the plaintext (base64)');
    t.false(text.includes(Buffer.from(MARKER).toString('hex')), 'an error echoed the plaintext (hex)');
  }
  return error;
}

const v2Decrypt = (h: Harness, req: Partial<T.V2DecryptRequest>) =>
  call<Partial<T.V2DecryptRequest>, T.V2DecryptResponse>(h.clients.v2, 'Decrypt', { uid: 'hostile', ...req });
const v2Encrypt = (h: Harness, plaintext: Buffer) => call<T.V2EncryptRequest, T.V2EncryptResponse>(h.clients.v2, 'Encrypt', { plaintext, uid: 'hostile' });
const v1Encrypt = (h: Harness, version: string, plain: Buffer) => call<T.V1EncryptRequest, T.V1EncryptResponse>(h.clients.v1, 'Encrypt', { version, plain });
const v1Decrypt = (h: Harness, version: string, cipher: Buffer) => call<T.V1DecryptRequest, T.V1DecryptResponse>(h.clients.v1, 'Decrypt', { version, cipher });

async function stillServing(t: Parameters<typeof grpcError>[0], h: Harness) {
  const s = await h.status();
  t.is(s.healthz, 'ok');
  const plaintext = Buffer.alloc(32, 4);
  t.deepEqual(await h.decrypt(await h.encrypt(plaintext)), plaintext);
}

test('random bytes as a v2 or v1 ciphertext: INVALID_ARGUMENT, no backend call', async (t) => {
  const h = await startHarness(t);
  const magic = Buffer.from([0x54, 0x52, 0x01, 0x00]);
  const ciphertexts = fc.oneof(
    fc.uint8Array({ minLength: 1, maxLength: 2048 }),
    // Past the magic, so the parser's bounds checks are what is exercised.
    fc.uint8Array({ minLength: 0, maxLength: 600 }).map((b) => new Uint8Array([...magic, ...b])),
  );
  await fc.assert(
    fc.asyncProperty(ciphertexts, fc.boolean(), async (bytes, v1) => {
      const cipher = Buffer.from(bytes);
      await expectRefused(t, h, v1 ? v1Decrypt(h, 'v1beta1', cipher) : v2Decrypt(h, { ciphertext: cipher, key_id: 'x', annotations: {} }));
    }),
    { numRuns: 60 },
  );
  await stillServing(t, h);
});

test('a real envelope with bytes flipped in its header: INVALID_ARGUMENT', async (t) => {
  const h = await startHarness(t);
  const encrypted = await h.encrypt(Buffer.from(MARKER));
  await fc.assert(
    fc.asyncProperty(fc.integer({ min: 0, max: 22 }), fc.integer({ min: 1, max: 255 }), async (at, xor) => {
      // The first 23 bytes (magic, version, flags, envelope id, quorum, counts) never reach a backend unnoticed.
      const ciphertext = Buffer.from(encrypted.ciphertext);
      ciphertext[at]! ^= xor;
      const error = await grpcError(t, v2Decrypt(h, { ciphertext, key_id: encrypted.key_id, annotations: encrypted.annotations }));
      t.true([status.INVALID_ARGUMENT, status.FAILED_PRECONDITION].includes(error.code), `got ${status[error.code]}`);
      t.false(error.details.includes(MARKER));
    }),
    { numRuns: 30 },
  );
  await stillServing(t, h);
});

test('empty plaintext and empty ciphertext: INVALID_ARGUMENT, no backend call', async (t) => {
  const h = await startHarness(t);
  await expectRefused(t, h, v2Encrypt(h, Buffer.alloc(0)));
  await expectRefused(t, h, v1Encrypt(h, 'v1beta1', Buffer.alloc(0)));
  await expectRefused(t, h, v2Decrypt(h, { ciphertext: Buffer.alloc(0) }));
  await expectRefused(t, h, v1Decrypt(h, 'v1beta1', Buffer.alloc(0)));
  await stillServing(t, h);
});

test('oversized plaintext: 1 MiB on v1 and v2 is refused cleanly, the server survives', async (t) => {
  const h = await startHarness(t);
  const huge = Buffer.alloc(1024 * 1024, MARKER);
  await expectRefused(t, h, v1Encrypt(h, 'v1beta1', huge), [status.INVALID_ARGUMENT, status.RESOURCE_EXHAUSTED]);
  await expectRefused(t, h, v2Encrypt(h, huge), [status.INVALID_ARGUMENT, status.RESOURCE_EXHAUSTED]);
  // Under the transport limit but over the plugin's.
  await expectRefused(t, h, v1Encrypt(h, 'v1beta1', Buffer.alloc(20 * 1024, MARKER)));
  await stillServing(t, h);
});

test('v2 plaintext that can never fit a 1024-byte ciphertext is refused before any backend call', async (t) => {
  const h = await startHarness(t);
  const error = await expectRefused(t, h, v2Encrypt(h, Buffer.alloc(2000, MARKER)));
  t.regex(error.details, /1024/);
  // v1 has no such limit: the same plaintext is fine there.
  const { cipher } = await v1Encrypt(h, 'v1beta1', Buffer.alloc(2000, MARKER));
  t.deepEqual((await v1Decrypt(h, 'v1beta1', cipher)).plain, Buffer.alloc(2000, MARKER));
});

test('annotations: 100 of them, non-FQDN keys, oversized values: INVALID_ARGUMENT, no backend call', async (t) => {
  const h = await startHarness(t);
  const encrypted = await h.encrypt(Buffer.alloc(32, 1));
  h.resetCounts();
  const many = Object.fromEntries(Array.from({ length: 100 }, (_, i) => [`a${i}.example.io`, Buffer.from('x')]));
  await expectRefused(t, h, v2Decrypt(h, { ciphertext: encrypted.ciphertext, annotations: many }));
  await expectRefused(t, h, v2Decrypt(h, { ciphertext: encrypted.ciphertext, annotations: { 'a.example.io': Buffer.alloc(40 * 1024) } }));
  const nonFqdn = fc.oneof(
    fc.constantFrom('single', 'UPPER.example.io', '-lead.example.io', 'trail-.example.io', 'a..b', '.a.b', 'a.b.', 'space .a', 'ünï.code', 'a_b.io', 'x'.repeat(64) + '.io'),
    fc.string({ minLength: 1, maxLength: 40 }).filter((s) => !/^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)+$/.test(s)),
  );
  await fc.assert(
    fc.asyncProperty(nonFqdn, async (key) => {
      await expectRefused(t, h, v2Decrypt(h, { ciphertext: encrypted.ciphertext, annotations: { [key]: Buffer.from('v') } }));
    }),
    { numRuns: 40 },
  );
  await stillServing(t, h);
});

test('v2 Decrypt with a key_id over 1024 bytes: INVALID_ARGUMENT, no backend call', async (t) => {
  const h = await startHarness(t);
  const encrypted = await h.encrypt(Buffer.alloc(32, 1));
  h.resetCounts();
  await expectRefused(t, h, v2Decrypt(h, { ciphertext: encrypted.ciphertext, key_id: 'k'.repeat(1025), annotations: encrypted.annotations }));
});

test('v1beta1 with a wrong version field: INVALID_ARGUMENT, no backend call', async (t) => {
  const h = await startHarness(t);
  const { cipher } = await v1Encrypt(h, 'v1beta1', Buffer.from(MARKER));
  h.resetCounts();
  await fc.assert(
    fc.asyncProperty(
      fc.string({ minLength: 1, maxLength: 80 }).filter((v) => v !== 'v1beta1'),
      async (version) => {
        await expectRefused(t, h, v1Encrypt(h, version, Buffer.from(MARKER)));
        await expectRefused(t, h, v1Decrypt(h, version, cipher));
      },
    ),
    { numRuns: 25 },
  );
  await stillServing(t, h);
});

test('an unknown method is UNIMPLEMENTED and the server keeps answering', async (t) => {
  const h = await startHarness(t);
  const { makeGenericClientConstructor, credentials } = await import('@grpc/grpc-js');
  const Ctor = makeGenericClientConstructor(
    { Nope: { path: '/v2.KeyManagementService/Nope', requestStream: false, responseStream: false, requestSerialize: (b: Buffer) => b, requestDeserialize: (b: Buffer) => b, responseSerialize: (b: Buffer) => b, responseDeserialize: (b: Buffer) => b } },
    'Nope',
  );
  const client = new Ctor(`unix:${h.socketPath}`, credentials.createInsecure());
  t.teardown(() => client.close());
  const error = await grpcError(t, call<Buffer, Buffer>(client, 'Nope', Buffer.from('garbage')));
  t.is(error.code, status.UNIMPLEMENTED);
  await stillServing(t, h);
});
