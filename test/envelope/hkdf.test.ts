/**
 * The envelope's own HKDF-SHA256 (src/envelope/hkdf.ts) must give exactly what Node's
 * hkdfSync and createHmac give: every envelope ever written depends on these bytes
 * (the golden vectors check the same from the other side).
 */
import test from 'ava';
import fc from 'fast-check';
import { createHmac, hkdfSync } from 'node:crypto';
import { EnvelopeKeys, keyCommitment } from '../../src/envelope/crypto.ts';
import { hkdfExpand32, hkdfExtract, hmacSha256 } from '../../src/envelope/hkdf.ts';

const bytes = (max: number) => fc.uint8Array({ minLength: 0, maxLength: max });

test('hmacSha256 equals createHmac for keys up to one block and any message split', (t) => {
  t.notThrows(() =>
    fc.assert(
      fc.property(bytes(64), fc.array(bytes(100), { maxLength: 4 }), (key, parts) => {
        const expected = createHmac('sha256', key).update(Buffer.concat(parts)).digest();
        return hmacSha256(key, ...parts).equals(expected);
      }),
      { numRuns: 300 },
    ),
  );
});

test('hmacSha256 refuses keys longer than one block rather than hashing them silently', (t) => {
  t.throws(() => hmacSha256(new Uint8Array(65), new Uint8Array(1)), { instanceOf: RangeError });
});

test('extract + expand equals hkdfSync for 32-byte outputs', (t) => {
  t.notThrows(() =>
    fc.assert(
      fc.property(bytes(64), fc.uint8Array({ minLength: 1, maxLength: 64 }), bytes(80), (inputKey, salt, info) => {
        const expected = Buffer.from(hkdfSync('sha256', inputKey, salt, info, 32));
        return hkdfExpand32(hkdfExtract(salt, inputKey), info).equals(expected);
      }),
      { numRuns: 300 },
    ),
  );
});

test('RFC 5869 test case 1: the first 32 bytes of the OKM', (t) => {
  const ikm = Buffer.alloc(22, 0x0b);
  const salt = Buffer.from('000102030405060708090a0b0c', 'hex');
  const info = Buffer.from('f0f1f2f3f4f5f6f7f8f9', 'hex');
  const prk = hkdfExtract(salt, ikm);
  t.is(prk.toString('hex'), '077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5');
  t.is(hkdfExpand32(prk, info).toString('hex'), '3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf');
});

test('EnvelopeKeys derives the commitment and payload key of format version 1', (t) => {
  const dataKey = Buffer.alloc(32, 7);
  const envelopeId = Buffer.alloc(16, 9);
  const keys = new EnvelopeKeys(dataKey, envelopeId);
  t.deepEqual(keys.commitment, Buffer.from(hkdfSync('sha256', dataKey, envelopeId, 'trousseau/v1 key commitment', 32)));
  t.deepEqual(keyCommitment(dataKey, envelopeId), keys.commitment);
  const payloadKey = keys.payloadKey().export();
  t.deepEqual(payloadKey, Buffer.from(hkdfSync('sha256', dataKey, envelopeId, 'trousseau/v1 payload key', 32)));
  t.true(keys.matches(keys.commitment));
  t.false(keys.matches(Buffer.alloc(32)));
  t.false(keys.matches(keys.commitment.subarray(0, 31)));
  keys.wipe();
});
