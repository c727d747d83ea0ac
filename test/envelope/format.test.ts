/**
 * The parser is the first thing hostile input reaches: it must refuse every malformed
 * envelope with INVALID_INPUT (never a RangeError or any other exception), check
 * every length against the limits before reading, and never copy what it reads.
 */
import test from 'ava';
import fc from 'fast-check';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { isTrousseauError } from '../../src/errors.ts';
import { keyCommitment, newDataKey, newEnvelopeId, sealEnvelope } from '../../src/envelope/crypto.ts';
import {
  ANNOTATION_DOMAIN,
  COMMITMENT_BYTES,
  FORMAT_VERSION,
  MAGIC,
  NONCE_BYTES,
  TAG_BYTES,
  annotationKeyFor,
  encodeHeader,
  headerSize,
  parseEnvelope,
  type CopyToEncode,
} from '../../src/envelope/format.ts';
import { ENVELOPE_ID_BYTES, MAX_COPIES, MAX_PLAINTEXT_BYTES, MAX_WRAPPED_BYTES } from '../../src/envelope/limits.ts';
import { copiesOf, reencode } from '../helpers/envelope-fixtures.ts';

/** Parse, and let only INVALID_INPUT through; return the error message or the parse result. */
function parseOrInvalid(bytes: Uint8Array, annotations?: ReadonlyMap<string, Uint8Array>) {
  try {
    return { parsed: parseEnvelope(bytes, annotations) };
  } catch (error) {
    if (isTrousseauError(error) && error.code === 'INVALID_INPUT') return { message: error.message };
    throw error;
  }
}

function sample(copies: CopyToEncode[], plaintext = randomBytes(32)) {
  const dataKey = newDataKey();
  const envelopeId = newEnvelopeId();
  const annotations = new Map(copies.filter((c) => c.location === 'annotation').map((c) => [annotationKeyFor(c.backendName), c.wrapped]));
  const ciphertext = sealEnvelope({ dataKey, envelopeId, quorum: 1, configuredBackends: copies.length, copies, plaintext });
  return { ciphertext, annotations, dataKey, envelopeId, plaintext };
}

const inline = (name: string, size = 60): CopyToEncode => ({ backendName: name, keyVersion: `v-${name}`, wrapped: randomBytes(size), location: 'inline' });
const annotated = (name: string, size = 512): CopyToEncode => ({ ...inline(name, size), location: 'annotation' });

/** Offset of the copy count byte, and of the first copy. */
const COUNT_AT = MAGIC.length + 2 + ENVELOPE_ID_BYTES + 2;
const FIRST_COPY_AT = COUNT_AT + 1;

test('a sealed envelope parses back to what was encoded; every part is a view of the input', (t) => {
  const copies = [inline('alpha'), annotated('beta'), inline('gamma', MAX_WRAPPED_BYTES)];
  const { ciphertext, annotations, envelopeId, dataKey } = sample(copies, randomBytes(100));
  const parsed = parseEnvelope(ciphertext, annotations);
  t.is(parsed.formatVersion, FORMAT_VERSION);
  t.deepEqual(Buffer.from(parsed.envelopeId), envelopeId);
  t.deepEqual(Buffer.from(parsed.commitment), keyCommitment(dataKey, envelopeId));
  t.is(parsed.quorum, 1);
  t.is(parsed.configuredBackends, 3);
  t.deepEqual(
    parsed.copies.map((c) => [c.backendName, c.keyVersion, c.location, c.wrappedLength, Buffer.from(c.wrapped!)]),
    copies.map((c) => [c.backendName, c.keyVersion, c.location, c.wrapped.length, Buffer.from(c.wrapped)]),
  );
  t.is(parsed.headerBytes.length, headerSize(copies));
  t.is(parsed.sealedPayload.length, 100 + TAG_BYTES);
  // Views, not copies: a hostile length can never make the parser allocate.
  t.is(parsed.sealedPayload.buffer, ciphertext.buffer);
  t.is(parsed.headerBytes.buffer, ciphertext.buffer);
  t.is(parsed.copies[0]!.wrapped!.buffer, ciphertext.buffer);
  t.deepEqual(reencode(parsed), ciphertext, 'the test helper re-encodes an untouched envelope byte for byte');
});

test('annotation copies resolve only when the annotation matches the digest and length in the header', (t) => {
  const { ciphertext, annotations } = sample([inline('alpha'), annotated('beta')]);
  const key = annotationKeyFor('beta');
  t.is(key, `beta.${ANNOTATION_DOMAIN}`);
  const original = annotations.get(key)!;
  const resolved = (map: Map<string, Uint8Array>) => parseEnvelope(ciphertext, map).copies[1]!.wrapped;
  t.deepEqual(Buffer.from(resolved(annotations)!), Buffer.from(original));
  t.is(resolved(new Map()), undefined, 'missing');
  const flipped = Buffer.from(original);
  flipped[7] = flipped[7]! ^ 1;
  t.is(resolved(new Map([[key, flipped]])), undefined, 'altered');
  t.is(resolved(new Map([[key, original.subarray(1)]])), undefined, 'truncated');
  t.is(resolved(new Map([[key, Buffer.concat([original, Buffer.from([0])])]])), undefined, 'extended');
  t.is(resolved(new Map([[annotationKeyFor('alpha'), original]])), undefined, 'filed under another backend');
  t.is(resolved(new Map([['beta.wrapped-key.example.com', original]])), undefined, 'other domain');
});

test('limits are checked before reading: copy count', (t) => {
  const { ciphertext } = sample([inline('alpha')]);
  for (const count of [0, MAX_COPIES + 1, 100, 255]) {
    // Cut right after the count byte: a parser that read first would report truncation.
    const bytes = Buffer.from(ciphertext.subarray(0, FIRST_COPY_AT));
    bytes[COUNT_AT] = count;
    t.regex(parseOrInvalid(bytes).message ?? '', /copy count/, `count ${count}`);
  }
});

test('limits are checked before reading: wrapped length', (t) => {
  const { ciphertext } = sample([inline('alpha')]);
  const lengthAt = FIRST_COPY_AT + 1 + 'alpha'.length + 1 + 'v-alpha'.length + 1;
  t.is(ciphertext.readUInt16BE(lengthAt), 60);
  for (const length of [0, MAX_WRAPPED_BYTES + 1, 0xffff]) {
    const bytes = Buffer.from(ciphertext.subarray(0, lengthAt + 2));
    bytes.writeUInt16BE(length, lengthAt);
    t.regex(parseOrInvalid(bytes).message ?? '', /wrapped key length out of range/, `length ${length}`);
  }
});

test('limits are checked before reading: payload length', (t) => {
  const { ciphertext } = sample([inline('alpha')]);
  const at = headerSize([inline('alpha')]) - 2;
  for (const length of [0, TAG_BYTES - 1, MAX_PLAINTEXT_BYTES + TAG_BYTES + 1, 0xffff]) {
    const bytes = Buffer.from(ciphertext.subarray(0, at + 2));
    bytes.writeUInt16BE(length, at);
    t.regex(parseOrInvalid(bytes).message ?? '', /payload length out of range/, `length ${length}`);
  }
});

test('each structural rule refuses with INVALID_INPUT', (t) => {
  const { ciphertext } = sample([inline('alpha'), inline('beta')]);
  const mutate = (at: number, value: number) => {
    const bytes = Buffer.from(ciphertext);
    bytes[at] = value;
    return parseOrInvalid(bytes).message ?? '';
  };
  t.regex(mutate(0, 0x55), /not a Trousseau envelope/);
  for (const version of [0, 2, 255]) t.regex(mutate(2, version), /unsupported format version/);
  t.regex(mutate(3, 1), /unknown flags/);
  t.regex(mutate(COUNT_AT - 2, 0), /quorum/, 'quorum 0');
  t.regex(mutate(COUNT_AT - 2, 3), /quorum/, 'quorum above the configured backends');
  t.regex(mutate(FIRST_COPY_AT + 1, 'A'.charCodeAt(0)), /DNS label/, 'upper-case backend name');
  t.regex(mutate(FIRST_COPY_AT, 0), /DNS label|truncated/, 'empty backend name');
  t.regex(mutate(FIRST_COPY_AT + 1 + 5, 0), /key version length/);
  t.regex(mutate(FIRST_COPY_AT + 1 + 5 + 1, 0x20), /printable/, 'space in key version');
  t.regex(mutate(FIRST_COPY_AT + 1 + 5 + 1 + 7, 2), /unknown copy location/);
  const twice = encodeHeader({
    envelopeId: randomBytes(ENVELOPE_ID_BYTES),
    quorum: 1,
    configuredBackends: 2,
    copies: [inline('alpha'), inline('alpha')],
    commitment: randomBytes(COMMITMENT_BYTES),
    nonce: randomBytes(NONCE_BYTES),
    payloadLength: TAG_BYTES,
  });
  t.regex(parseOrInvalid(Buffer.concat([twice, randomBytes(TAG_BYTES)])).message ?? '', /named twice/);
  t.regex(parseOrInvalid(Buffer.concat([ciphertext, Buffer.from([0])])).message ?? '', /trailing bytes/);
});

test('every truncation of a valid envelope is refused with INVALID_INPUT', (t) => {
  const { ciphertext, annotations } = sample([inline('alpha'), annotated('beta'), inline('gamma')]);
  for (let length = 0; length < ciphertext.length; length++) {
    t.truthy(parseOrInvalid(ciphertext.subarray(0, length), annotations).message, `length ${length}`);
  }
});

test('fuzz: arbitrary bytes (with and without a valid prefix) only ever raise INVALID_INPUT', (t) => {
  const prefix = Buffer.from([...MAGIC, FORMAT_VERSION, 0]);
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 3000 }), fc.boolean(), (bytes, withPrefix) => {
      const input = withPrefix ? Buffer.concat([prefix, bytes]) : bytes;
      const result = parseOrInvalid(input);
      if (result.parsed) checkParsed(input, result.parsed);
    }),
    { numRuns: 3000 },
  );
  t.pass();
});

/** A parse that succeeded must respect every limit. */
function checkParsed(input: Uint8Array, parsed: ReturnType<typeof parseEnvelope>): void {
  if (parsed.copies.length < 1 || parsed.copies.length > MAX_COPIES) throw new Error('copy count escaped the limit');
  for (const copy of parsed.copies) {
    if (copy.wrappedLength < 1 || copy.wrappedLength > MAX_WRAPPED_BYTES) throw new Error('wrapped length escaped the limit');
    if (copy.wrapped && copy.wrapped.length !== copy.wrappedLength) throw new Error('wrapped bytes disagree with their length');
  }
  if (parsed.headerBytes.length + parsed.sealedPayload.length !== input.length) throw new Error('parse did not cover the input');
}

test('fuzz: mutated valid envelopes only ever raise INVALID_INPUT', (t) => {
  const bases = [
    sample([inline('alpha')]),
    sample([inline('alpha'), annotated('beta'), inline('gamma', 512)], randomBytes(300)),
    sample(Array.from({ length: MAX_COPIES }, (_, i) => inline(`b${i}`, 20)), randomBytes(1)),
  ];
  const edit = fc.oneof(
    fc.record({ kind: fc.constant('set' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
    fc.record({ kind: fc.constant('insert' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
    fc.record({ kind: fc.constant('delete' as const), at: fc.nat(), value: fc.constant(0) }),
    // Interesting values at interesting places: counts and lengths at their limits.
    fc.record({ kind: fc.constant('set' as const), at: fc.integer({ min: 0, max: 80 }), value: fc.constantFrom(0, 1, 2, 16, 17, 0x7f, 0x80, 0xff) }),
  );
  fc.assert(
    fc.property(fc.nat({ max: bases.length - 1 }), fc.array(edit, { minLength: 1, maxLength: 6 }), fc.boolean(), (which, edits, keepAnnotations) => {
      const base = bases[which]!;
      const bytes = [...base.ciphertext];
      for (const e of edits) {
        const at = e.at % (bytes.length + 1);
        if (e.kind === 'set') bytes[Math.min(at, bytes.length - 1)] = e.value;
        else if (e.kind === 'insert') bytes.splice(at, 0, e.value);
        else bytes.splice(at, 1);
      }
      const input = Uint8Array.from(bytes);
      const result = parseOrInvalid(input, keepAnnotations ? base.annotations : new Map());
      if (result.parsed) checkParsed(input, result.parsed);
    }),
    { numRuns: 3000 },
  );
  t.pass();
});

test('fuzz: structurally valid headers with arbitrary fields parse back exactly', (t) => {
  const name = fc.stringMatching(/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/);
  const copy = fc.record({
    backendName: name,
    keyVersion: fc.stringMatching(/^[\x21-\x7e]{1,255}$/),
    wrapped: fc.uint8Array({ minLength: 1, maxLength: MAX_WRAPPED_BYTES }),
    location: fc.constantFrom('inline' as const, 'annotation' as const),
  });
  fc.assert(
    fc.property(
      fc.uniqueArray(copy, { minLength: 1, maxLength: MAX_COPIES, selector: (c) => c.backendName }),
      fc.uint8Array({ maxLength: 200 }),
      (copies, plaintext) => {
        const { ciphertext, annotations } = sample(copies, Buffer.from(plaintext));
        const parsed = parseEnvelope(ciphertext, annotations);
        const normalise = (list: CopyToEncode[]) => list.map((c) => ({ ...c, wrapped: Buffer.from(c.wrapped) }));
        assert.deepEqual(normalise(copiesOf(parsed)), normalise(copies));
        assert.deepEqual(reencode(parsed), ciphertext);
      },
    ),
    { numRuns: 150 },
  );
  t.pass();
});
