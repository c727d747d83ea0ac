/**
 * KMS v2 placement with real RSA-OAEP-256 (4096-bit, 512-byte copies) next to local
 * AES backends: the ciphertext stays within the apiserver's 1024 bytes, the largest
 * copies move to annotations named `<backend>.wrapped-key.trousseau.io`, and the
 * envelope still round-trips through each copy. KMS v1beta1 keeps everything inline.
 */
import test from 'ava';
import fc from 'fast-check';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { KeyBackend } from '../../src/backends/backend.ts';
import { errorCodeOf } from '../../src/errors.ts';
import { envelopeSize } from '../../src/envelope/crypto.ts';
import { annotationKeyFor, headerSize, parseEnvelope, TAG_BYTES, type CopyToEncode } from '../../src/envelope/format.ts';
import { MAX_COPIES, MAX_WRAPPED_BYTES, V2_MAX_ANNOTATION_BYTES, V2_MAX_CIPHERTEXT_BYTES } from '../../src/envelope/limits.ts';
import { placeCopies } from '../../src/envelope/placement.ts';
import {
  SharedBackend,
  freshLocalBackends,
  goldenRsaBackend,
  makePlugin,
  makeTempDir,
  tryDecrypt,
  type TempDir,
} from '../helpers/envelope-fixtures.ts';

let temp: TempDir | undefined;
let five: KeyBackend[] = [];
test.before(async () => {
  temp = await makeTempDir();
  const locals = await freshLocalBackends(temp.dir, 3);
  // Test-only RSA-4096 keys shared with the golden vectors (generating two takes seconds).
  const rsa = [await goldenRsaBackend('rsa-a', 'keys/rsa-a.pem'), await goldenRsaBackend('rsa-b', 'keys/rsa-b.pem')];
  five = [...locals, ...rsa].map((b) => new SharedBackend(b));
});
test.after.always(() => temp?.remove());

const signal = () => AbortSignal.timeout(5000);
const asInline = (copies: readonly CopyToEncode[]) => copies.map((c) => ({ ...c, location: 'inline' as const }));

test.serial('RSA-4096 OAEP copies are 512 bytes', async (t) => {
  const rsa = five[3]!;
  const { wrapped } = await rsa.wrap(randomBytes(32), { envelopeId: randomBytes(16), backendName: rsa.name }, signal());
  t.is(wrapped.length, 512);
});

test.serial('KMS v2, five backends (two RSA-4096): within 1024 bytes, largest copies in annotations, round trip through every copy', async (t) => {
  await fc.assert(
    fc.asyncProperty(fc.uint8Array({ minLength: 1, maxLength: 700 }), fc.integer({ min: 1, max: 5 }), async (plaintext, quorum) => {
      const writer = makePlugin(five, { quorum, stragglerGraceMs: 2000 });
      let result;
      try {
        result = await writer.plugin.engine.encrypt(plaintext, 'v2', signal());
      } catch (error) {
        assert.equal(errorCodeOf(error), 'INVALID_INPUT');
        return;
      } finally {
        await writer.close();
      }
      const { ciphertext, annotations } = result;
      assert.deepEqual(result.wrappedBy, five.map((b) => b.name));
      assert.ok(ciphertext.length <= V2_MAX_CIPHERTEXT_BYTES, `ciphertext of ${ciphertext.length} bytes`);

      const envelope = parseEnvelope(ciphertext, annotations);
      const moved = envelope.copies.filter((c) => c.location === 'annotation');
      const stayed = envelope.copies.filter((c) => c.location === 'inline');
      // Two 512-byte copies cannot both be inline in 1024 bytes.
      assert.ok(moved.some((c) => c.wrappedLength === 512));
      // Largest first: nothing inline is larger than anything moved.
      assert.ok(Math.max(0, ...stayed.map((c) => c.wrappedLength)) <= Math.min(...moved.map((c) => c.wrappedLength)));
      // Fewest moved: bringing back the smallest moved copy would overflow.
      const copies: CopyToEncode[] = envelope.copies.map((c) => ({ backendName: c.backendName, keyVersion: c.keyVersion, wrapped: c.wrapped!, location: c.location }));
      const smallestMoved = [...moved].sort((a, b) => a.wrappedLength - b.wrappedLength)[0]!;
      const oneFewer = copies.map((c) => (c.backendName === smallestMoved.backendName ? { ...c, location: 'inline' as const } : c));
      assert.ok(envelopeSize(oneFewer, plaintext.length) > V2_MAX_CIPHERTEXT_BYTES);

      assert.deepEqual([...annotations.keys()].sort(), moved.map((c) => annotationKeyFor(c.backendName)).sort());
      let total = 0;
      for (const [key, value] of annotations) {
        assert.match(key, /^[a-z0-9-]+\.wrapped-key\.trousseau\.io$/);
        total += key.length + value.length;
      }
      assert.ok(total <= V2_MAX_ANNOTATION_BYTES);

      // Each backend alone, so every copy (inline or annotation) is proven to open it.
      for (const backend of five) {
        const reader = makePlugin([backend]);
        try {
          const decrypted = await reader.plugin.engine.decrypt(ciphertext, annotations, signal());
          assert.equal(decrypted.unwrappedBy, backend.name);
          assert.deepEqual(decrypted.plaintext, Buffer.from(plaintext));
        } finally {
          await reader.close();
        }
      }
    }),
    { numRuns: 25 },
  );
  t.pass();
});

test.serial('KMS v2 refuses, as INVALID_INPUT, exactly the plaintexts that cannot fit even with every copy in annotations', async (t) => {
  const writer = makePlugin(five, { quorum: 5, stragglerGraceMs: 2000 });
  t.teardown(writer.close);
  const probe = await writer.plugin.engine.encrypt(randomBytes(1), 'v2', signal());
  const copies = parseEnvelope(probe.ciphertext, probe.annotations).copies.map((c) => ({
    backendName: c.backendName,
    keyVersion: c.keyVersion,
    wrapped: c.wrapped!,
    location: 'annotation' as const,
  }));
  const largest = V2_MAX_CIPHERTEXT_BYTES - headerSize(copies) - TAG_BYTES;
  t.true(largest > 32 && largest < 700, `largest plaintext that fits: ${largest}`);
  const fits = await writer.plugin.engine.encrypt(randomBytes(largest), 'v2', signal());
  t.is(fits.ciphertext.length, V2_MAX_CIPHERTEXT_BYTES);
  t.is(fits.annotations.size, 5);
  const refused = await t.throwsAsync(writer.plugin.engine.encrypt(randomBytes(largest + 1), 'v2', signal()));
  t.is(errorCodeOf(refused), 'INVALID_INPUT');
});

test.serial('KMS v1beta1 keeps every copy inline, whatever the size', async (t) => {
  const writer = makePlugin(five, { quorum: 5, stragglerGraceMs: 2000 });
  t.teardown(writer.close);
  for (const size of [1, 32, 700, 4096]) {
    const plaintext = randomBytes(size);
    const { ciphertext, annotations } = await writer.plugin.encrypt(plaintext, 'v1', signal());
    t.is(annotations.size, 0);
    const envelope = parseEnvelope(ciphertext);
    t.true(envelope.copies.every((c) => c.location === 'inline' && c.wrapped !== undefined));
    t.true(ciphertext.length > V2_MAX_CIPHERTEXT_BYTES);
    const decrypted = await tryDecrypt(writer.plugin, ciphertext);
    t.true(decrypted.ok && decrypted.plaintext.equals(plaintext));
  }
});

test('placeCopies: small envelopes stay inline; placement never changes the copies themselves', (t) => {
  const copies = [1, 2, 3].map((i) => ({ backendName: `b${i}`, keyVersion: 'v1', wrapped: randomBytes(60) }));
  const placed = placeCopies(copies, 32, 'v2');
  t.is(placed.annotations.size, 0);
  t.deepEqual(placed.copies, asInline(placed.copies));
  t.deepEqual(placed.copies.map((c) => c.wrapped), copies.map((c) => c.wrapped));
});

test('placeCopies: copies that cannot fit the KMS v2 annotation budget are refused, never emitted', (t) => {
  const copies = Array.from({ length: MAX_COPIES }, (_, i) => ({ backendName: `backend-${i}`, keyVersion: 'v1', wrapped: randomBytes(MAX_WRAPPED_BYTES) }));
  const error = t.throws(() => placeCopies(copies, 32, 'v2'));
  t.true(['INVALID_INPUT', 'INTERNAL'].includes(errorCodeOf(error)));
});
