/**
 * Golden Azure copies (test/fixtures/golden/azure, written once by generate-azure.ts):
 * the current code must keep reading both layouts exactly. Layout 1's signature must
 * verify with the key's public half and fail for any other binding or any flipped byte;
 * layout 0 must still parse as an unsigned copy (refused by the backend unless
 * acceptUnsignedCopies, see test/backends/azure.test.ts).
 */
import { constants, createPrivateKey, createPublicKey, privateDecrypt } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import test from 'ava';
import { parseAzureCopy, verifyCopySignature } from '../../src/backends/azure-copy.ts';
import { errorCodeOf } from '../../src/errors.ts';
import { GOLDEN_DIR } from '../helpers/envelope-fixtures.ts';

interface Vector {
  layout: number;
  key: string;
  envelopeId: string;
  backendName: string;
  keyId: string;
  keyVersion: string;
  dataKey: string;
  copy: string;
}
const load = (file: string) => JSON.parse(readFileSync(path.join(GOLDEN_DIR, 'azure', file), 'utf8')) as Vector;
const b64 = (s: string) => Buffer.from(s, 'base64');

for (const file of ['copy-layout0-unsigned.json', 'copy-layout1-signed.json']) {
  test(`golden Azure copy ${file} parses and unwraps to its data key`, (t) => {
    const v = load(file);
    const privateKey = createPrivateKey(readFileSync(path.join(GOLDEN_DIR, v.key), 'utf8'));
    const parsed = parseAzureCopy(b64(v.copy));
    t.is(parsed.layout, v.layout as 0 | 1);
    const binding = { context: { envelopeId: b64(v.envelopeId), backendName: v.backendName }, keyId: v.keyId, keyVersion: v.keyVersion };
    if (parsed.layout === 1) {
      const publicKey = createPublicKey(privateKey);
      t.true(verifyCopySignature(publicKey, binding, parsed.wrapped, parsed.signature));
      // Any other envelope, backend, key, version or wrapped bytes: refused.
      const others = [
        { ...binding, context: { ...binding.context, envelopeId: Buffer.alloc(16) } },
        { ...binding, context: { ...binding.context, backendName: 'azure-neu' } },
        { ...binding, keyId: binding.keyId.replace('trousseau-kek', 'other') },
        { ...binding, keyVersion: 'f'.repeat(32) },
      ];
      for (const other of others) t.false(verifyCopySignature(publicKey, other, parsed.wrapped, parsed.signature));
      const copy = b64(v.copy);
      for (const at of [8, 8 + 300, copy.length - 1]) {
        const flipped = Buffer.from(copy);
        flipped[at]! ^= 0x01;
        const p = parseAzureCopy(flipped);
        t.false(p.layout === 1 && verifyCopySignature(publicKey, binding, p.wrapped, p.signature), `byte ${at} flipped`);
      }
    }
    const dataKey = privateDecrypt({ key: privateKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, parsed.wrapped);
    t.deepEqual(dataKey, b64(v.dataKey));
  });
}

test('Azure copy parser: malformed copies are rejected copies, never a crash', (t) => {
  const signed = b64(load('copy-layout1-signed.json').copy);
  for (const bad of [Buffer.alloc(0), Buffer.alloc(7), signed.subarray(0, 600), Buffer.concat([signed, Buffer.alloc(1)]), Buffer.from('AZ\x02\x01', 'latin1')]) {
    t.is(errorCodeOf(t.throws(() => parseAzureCopy(bad))), 'BACKEND_REJECTED');
  }
  const wrongAlgorithm = Buffer.from(signed);
  wrongAlgorithm[3] = 2;
  t.is(errorCodeOf(t.throws(() => parseAzureCopy(wrongAlgorithm))), 'BACKEND_REJECTED');
});
