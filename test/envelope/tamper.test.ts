/**
 * Attacks on stored envelopes (docs/envelope.md, "Attacks prevented"). Every altered
 * envelope must be refused or decrypt to the exact original plaintext, never to
 * anything else; malformed ones must cost no backend call.
 */
import test, { type ExecutionContext } from 'ava';
import fc from 'fast-check';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { KeyBackend } from '../../src/backends/backend.ts';
import { newDataKey, newEnvelopeId, sealEnvelope } from '../../src/envelope/crypto.ts';
import { annotationKeyFor, parseEnvelope, type CopyToEncode } from '../../src/envelope/format.ts';
import {
  REJECTION_CODES,
  SharedBackend,
  copiesOf,
  freshLocalBackends,
  goldenRsaBackend,
  makePlugin,
  makeTempDir,
  reencode,
  tryDecrypt,
  type TempDir,
  type TestPlugin,
} from '../helpers/envelope-fixtures.ts';

let temp: TempDir | undefined;
/** local-0..local-2 and rsa-a, rsa-b; wrapped per test so call counts do not mix. */
let inner: KeyBackend[] = [];
test.before(async () => {
  temp = await makeTempDir();
  inner = [...(await freshLocalBackends(temp.dir, 3)), await goldenRsaBackend('rsa-a', 'keys/rsa-a.pem'), await goldenRsaBackend('rsa-b', 'keys/rsa-b.pem')];
});
test.after.always(() => temp?.remove());

const signal = () => AbortSignal.timeout(5000);

interface Setup {
  backends: SharedBackend[];
  reader: TestPlugin;
  calls(): number;
}

/** Fresh counting wrappers and a reader plugin over the named backends (all by default). */
function setup(t: ExecutionContext, names?: string[], priorities?: Record<string, number>): Setup {
  const backends = inner.filter((b) => !names || names.includes(b.name)).map((b) => new SharedBackend(b));
  const reader = makePlugin(backends, { priorities });
  t.teardown(reader.close);
  return { backends, reader, calls: () => backends.reduce((n, b) => n + b.unwrapCalls, 0) };
}

async function seal(names: string[], transport: 'v1' | 'v2', plaintext: Buffer) {
  // SharedBackend: closing the writer must not make the shared local backends forget their keys.
  const writer = makePlugin(inner.filter((b) => names.includes(b.name)).map((b) => new SharedBackend(b)), { quorum: names.length, stragglerGraceMs: 2000 });
  try {
    const result = await writer.plugin.engine.encrypt(plaintext, transport, signal());
    return { ...result, plaintext };
  } finally {
    await writer.close();
  }
}

const LOCALS = ['local-0', 'local-1', 'local-2'];
const ALL = [...LOCALS, 'rsa-a', 'rsa-b'];

/**
 * Decrypt must fail with a rejection code (and, if malformed, without any backend
 * call), or return exactly `plaintext`. Returns whether it decrypted and what was wrong.
 */
async function judge(s: Setup, plaintext: Buffer, ciphertext: Uint8Array, annotations: ReadonlyMap<string, Uint8Array>): Promise<{ ok: boolean; problem?: string }> {
  const before = s.calls();
  const result = await tryDecrypt(s.reader.plugin, ciphertext, annotations);
  if (result.ok) return result.plaintext.equals(plaintext) ? { ok: true } : { ok: true, problem: 'returned a different plaintext' };
  if (!REJECTION_CODES.includes(result.code)) return { ok: false, problem: `unexpected ${result.code}: ${(result.error as Error).message}` };
  if (result.code === 'INVALID_INPUT' && s.calls() !== before) return { ok: false, problem: 'malformed envelope cost a backend call' };
  return { ok: false };
}

async function refusedOrExact(t: ExecutionContext, s: Setup, plaintext: Buffer, ciphertext: Uint8Array, annotations: ReadonlyMap<string, Uint8Array>, what: string) {
  const { ok, problem } = await judge(s, plaintext, ciphertext, annotations);
  t.is(problem, undefined, what);
  return ok;
}

test('every single-byte change of a v1 envelope (three local copies and one RSA copy inline) is refused', async (t) => {
  const s = setup(t, [...LOCALS, 'rsa-a']);
  const { ciphertext, plaintext } = await seal([...LOCALS, 'rsa-a'], 'v1', randomBytes(200));
  let accepted = 0;
  for (let i = 0; i < ciphertext.length; i++) {
    const mutated = Buffer.from(ciphertext);
    mutated[i] = mutated[i]! ^ 0xff;
    if (await refusedOrExact(t, s, plaintext, mutated, new Map(), `byte ${i}`)) accepted++;
  }
  t.is(accepted, 0);
});

test('sampled byte changes of random envelopes and of their annotations: refused or the exact plaintext', async (t) => {
  const s = setup(t);
  await fc.assert(
    fc.asyncProperty(
      fc.shuffledSubarray(ALL, { minLength: 1 }),
      fc.constantFrom('v1' as const, 'v2' as const),
      fc.integer({ min: 1, max: 400 }),
      fc.array(fc.record({ at: fc.nat(), mask: fc.integer({ min: 1, max: 255 }), inAnnotation: fc.boolean() }), { minLength: 1, maxLength: 3 }),
      async (names, transport, size, flips) => {
        const { ciphertext, annotations, plaintext } = await seal(names, transport, randomBytes(size));
        const mutated = Buffer.from(ciphertext);
        const mutatedAnnotations = new Map([...annotations].map(([k, v]) => [k, Buffer.from(v)]));
        for (const flip of flips) {
          const values = [...mutatedAnnotations.values()];
          const target = flip.inAnnotation && values.length > 0 ? values[flip.at % values.length]! : mutated;
          const at = flip.at % target.length;
          target[at] = target[at]! ^ flip.mask;
        }
        const { ok, problem } = await judge(s, plaintext, mutated, mutatedAnnotations);
        assert.equal(problem, undefined);
        // The header and payload are authenticated as a whole: any change there must be refused.
        if (!mutated.equals(ciphertext)) assert.equal(ok, false, 'a changed ciphertext was accepted');
      },
    ),
    { numRuns: 60 },
  );
  t.pass();
});

test('stripping any one copy is refused, even though the remaining copies are intact', async (t) => {
  const s = setup(t);
  for (const transport of ['v1', 'v2'] as const) {
    const { ciphertext, annotations, plaintext } = await seal(ALL, transport, randomBytes(32));
    const envelope = parseEnvelope(ciphertext, annotations);
    t.true(await refusedOrExact(t, s, plaintext, reencode(envelope), annotations, 'untouched re-encoding'));
    const copies = copiesOf(envelope);
    for (let i = 0; i < copies.length; i++) {
      const stripped = copies.filter((_, j) => j !== i);
      const what = `${transport} without ${copies[i]!.backendName}`;
      t.false(await refusedOrExact(t, s, plaintext, reencode(envelope, { copies: stripped }), annotations, what));
      // Also with the header's backend count adjusted to look consistent.
      t.false(await refusedOrExact(t, s, plaintext, reencode(envelope, { copies: stripped, configuredBackends: stripped.length, quorum: 1 }), annotations, `${what}, count adjusted`));
    }
  }
});

function permutations<T>(items: readonly T[]): T[][] {
  if (items.length <= 1) return [[...items]];
  return items.flatMap((item, i) => permutations([...items.slice(0, i), ...items.slice(i + 1)]).map((rest) => [item, ...rest]));
}

test('reordering the copies or swapping wrapped keys between them is refused', async (t) => {
  const s = setup(t, [...LOCALS, 'rsa-a']);
  const { ciphertext, annotations, plaintext } = await seal([...LOCALS, 'rsa-a'], 'v2', randomBytes(32));
  const envelope = parseEnvelope(ciphertext, annotations);
  const copies = copiesOf(envelope);
  for (const order of permutations(copies).slice(1)) {
    t.false(await refusedOrExact(t, s, plaintext, reencode(envelope, { copies: order }), annotations, order.map((c) => c.backendName).join(',')));
  }
  const swapped = copies.map((c, i) => (i === 0 ? { ...c, wrapped: copies[1]!.wrapped } : i === 1 ? { ...c, wrapped: copies[0]!.wrapped } : c));
  t.false(await refusedOrExact(t, s, plaintext, reencode(envelope, { copies: swapped }), annotations, 'local-0 and local-1 swapped'));
});

test('a copy spliced from another envelope (same backend) is refused, and so is another envelope\'s header', async (t) => {
  const s = setup(t, LOCALS);
  const a = await seal(LOCALS, 'v2', randomBytes(32));
  const b = await seal(LOCALS, 'v2', randomBytes(32));
  const envA = parseEnvelope(a.ciphertext);
  const envB = parseEnvelope(b.ciphertext);
  for (let i = 0; i < 3; i++) {
    const copies = copiesOf(envA).map((c, j) => (j === i ? copiesOf(envB)[j]! : c));
    t.false(await refusedOrExact(t, s, a.plaintext, reencode(envA, { copies }), new Map(), `copy ${i} from B`));
  }
  // B's whole header on A's payload: B's key opens nothing of A's.
  const spliced = Buffer.concat([envB.headerBytes, envA.sealedPayload]);
  t.false(await refusedOrExact(t, s, a.plaintext, spliced, new Map(), 'B header + A payload'));
  // A copy relabelled as another backend's: the wrap context names the backend.
  const relabelled = copiesOf(envA).map((c, j) => (j === 0 ? { ...c, wrapped: copiesOf(envA)[1]!.wrapped, keyVersion: copiesOf(envA)[1]!.keyVersion } : c));
  t.false(await refusedOrExact(t, s, a.plaintext, reencode(envA, { copies: relabelled }), new Map(), 'local-1 copy under local-0'));
});

/**
 * Key substitution: a writer able to call Encrypt on local-1 seals an envelope under K
 * but gives local-1 a copy of another key K'. Readers using local-1 must not get a
 * different plaintext: the commitment rejects K' and the next copy is tried.
 */
async function substituted(copiesFor: { name: string; key: 'right' | 'other' }[], plaintext: Buffer) {
  const dataKey = newDataKey();
  const otherKey = newDataKey();
  const envelopeId = newEnvelopeId();
  const copies: CopyToEncode[] = [];
  for (const { name, key } of copiesFor) {
    const backend = inner.find((b) => b.name === name)!;
    const { wrapped, keyVersion } = await backend.wrap(key === 'right' ? dataKey : otherKey, { envelopeId, backendName: name }, signal());
    copies.push({ backendName: name, keyVersion, wrapped, location: 'inline' });
  }
  return { ciphertext: sealEnvelope({ dataKey, envelopeId, quorum: 1, configuredBackends: copies.length, copies, plaintext }), dataKey, otherKey, envelopeId };
}

async function mismatches(plugin: TestPlugin, backend: string): Promise<number> {
  const metric = await plugin.metrics.commitmentMismatches.get();
  return metric.values.find((v) => v.labels.backend === backend)?.value ?? 0;
}

test('key substitution: the commitment rejects a copy wrapping another key and the next copy opens the envelope', async (t) => {
  const plaintext = randomBytes(32);
  const { ciphertext } = await substituted(
    [
      { name: 'local-0', key: 'right' },
      { name: 'local-1', key: 'other' },
      { name: 'rsa-a', key: 'right' },
    ],
    plaintext,
  );
  // local-1 is tried first, so the substituted copy is unwrapped successfully by its backend.
  const s = setup(t, ['local-0', 'local-1', 'rsa-a'], { 'local-1': 0, 'local-0': 10, 'rsa-a': 20 });
  const result = await s.reader.plugin.engine.decrypt(ciphertext, new Map(), signal());
  t.true(result.plaintext.equals(plaintext));
  t.is(result.unwrappedBy, 'local-0');
  t.is(s.backends.find((b) => b.name === 'local-1')!.unwrapCalls, 1);
  t.is(await mismatches(s.reader, 'local-1'), 1);

  // With only the substituted copy's backend, nothing may come out.
  const alone = setup(t, ['local-1']);
  const refused = await tryDecrypt(alone.reader.plugin, ciphertext);
  t.false(refused.ok);
  t.is(!refused.ok && refused.code, 'TAMPERED');
  t.is(await mismatches(alone.reader, 'local-1'), 1);
});

test('key substitution: when every copy wraps another key, decrypt fails as TAMPERED', async (t) => {
  const plaintext = randomBytes(32);
  const { ciphertext } = await substituted(
    [
      { name: 'local-0', key: 'other' },
      { name: 'local-1', key: 'other' },
      { name: 'rsa-a', key: 'other' },
    ],
    plaintext,
  );
  const s = setup(t, ['local-0', 'local-1', 'rsa-a']);
  const result = await tryDecrypt(s.reader.plugin, ciphertext);
  t.false(result.ok);
  t.is(!result.ok && result.code, 'TAMPERED');
  t.is(s.calls(), 3, 'every copy was tried');
});

test('key substitution after the fact (a copy replaced in a stored envelope) is refused: the header is authenticated', async (t) => {
  const s = setup(t, LOCALS);
  const { ciphertext, plaintext } = await seal(LOCALS, 'v1', randomBytes(32));
  const envelope = parseEnvelope(ciphertext);
  const backend = inner.find((b) => b.name === 'local-1')!;
  const replacement = await backend.wrap(newDataKey(), { envelopeId: envelope.envelopeId, backendName: 'local-1' }, signal());
  const copies = copiesOf(envelope).map((c) => (c.backendName === 'local-1' ? { ...c, ...replacement } : c));
  t.false(await refusedOrExact(t, s, plaintext, reencode(envelope, { copies }), new Map(), 'replaced local-1 copy'));
});

test('a payload sealed under a key other than the committed one never opens', async (t) => {
  const plaintext = randomBytes(32);
  const { ciphertext, otherKey, envelopeId } = await substituted(
    [
      { name: 'local-0', key: 'right' },
      { name: 'local-1', key: 'other' },
    ],
    plaintext,
  );
  // Re-seal the payload under K' while keeping the header that commits to K.
  const envelope = parseEnvelope(ciphertext);
  const forged = sealEnvelope({ dataKey: otherKey, envelopeId, quorum: 1, configuredBackends: 2, copies: copiesOf(envelope), plaintext: randomBytes(32) });
  const withOldCommitment = reencode(parseEnvelope(forged), { commitment: envelope.commitment });
  const s = setup(t, ['local-0', 'local-1']);
  const result = await tryDecrypt(s.reader.plugin, withOldCommitment);
  t.false(result.ok);
  t.is(!result.ok && result.code, 'TAMPERED');
});

test('annotation copies altered, removed or swapped between backends: only inline copies are used, never a wrong one', async (t) => {
  // 400 bytes of plaintext push both RSA copies to annotations.
  const { ciphertext, annotations, plaintext } = await seal(ALL, 'v2', randomBytes(400));
  const keyA = annotationKeyFor('rsa-a');
  const keyB = annotationKeyFor('rsa-b');
  t.deepEqual([...annotations.keys()].sort(), [keyA, keyB]);
  const valueA = annotations.get(keyA)!;
  const valueB = annotations.get(keyB)!;
  const flipped = Buffer.from(valueA);
  flipped[100] = flipped[100]! ^ 1;
  const variants: [string, Map<string, Uint8Array>][] = [
    ['rsa-a altered', new Map([[keyA, flipped], [keyB, valueB]])],
    ['rsa-a removed', new Map([[keyB, valueB]])],
    ['all removed', new Map()],
    ['swapped', new Map([[keyA, valueB], [keyB, valueA]])],
    ['rsa-a from another envelope', new Map([[keyA, (await seal(ALL, 'v2', randomBytes(400))).annotations.get(keyA)!], [keyB, valueB]])],
  ];
  const everyone = setup(t);
  const rsaOnly = setup(t, ['rsa-a']);
  for (const [what, map] of variants) {
    // Inline local copies still open the envelope, exactly.
    t.true(await refusedOrExact(t, everyone, plaintext, ciphertext, map, what), what);
    // rsa-a's altered copy is never sent to rsa-a: no copy usable, no call.
    const result = await tryDecrypt(rsaOnly.reader.plugin, ciphertext, map);
    t.false(result.ok, what);
    t.is(!result.ok && result.code, 'INVALID_INPUT', what);
  }
  t.is(rsaOnly.calls(), 0);
  // An unrelated annotation is ignored.
  t.true(await refusedOrExact(t, everyone, plaintext, ciphertext, new Map([...annotations, ['x.example.com', Buffer.from('y')]]), 'extra annotation'));
});

test('changing the quorum, backend count, format version or flags byte is refused', async (t) => {
  const s = setup(t, LOCALS);
  const { ciphertext, plaintext } = await seal(LOCALS, 'v2', randomBytes(32));
  const QUORUM_AT = 2 + 2 + 16;
  for (const [at, name] of [[2, 'version'], [3, 'flags'], [QUORUM_AT, 'quorum'], [QUORUM_AT + 1, 'backend count']] as const) {
    for (let value = 0; value < 256; value++) {
      if (value === ciphertext[at]) continue;
      const mutated = Buffer.from(ciphertext);
      mutated[at] = value;
      t.false(await refusedOrExact(t, s, plaintext, mutated, new Map(), `${name} = ${value}`));
    }
  }
});

test('trailing bytes and every truncation are refused before any backend call', async (t) => {
  const s = setup(t);
  const { ciphertext, annotations, plaintext } = await seal(ALL, 'v2', randomBytes(64));
  for (const extra of [1, 16, 1000]) {
    const result = await tryDecrypt(s.reader.plugin, Buffer.concat([ciphertext, randomBytes(extra)]), annotations);
    t.is(!result.ok && result.code, 'INVALID_INPUT');
  }
  for (let length = 0; length < ciphertext.length; length++) {
    const result = await tryDecrypt(s.reader.plugin, ciphertext.subarray(0, length), annotations);
    t.is(!result.ok && result.code, 'INVALID_INPUT', `length ${length}`);
  }
  t.is(s.calls(), 0);
  t.true(await refusedOrExact(t, s, plaintext, ciphertext, annotations, 'intact'));
});

test('discovery: copies of unconfigured backends are never called; only configured backends are', async (t) => {
  const { ciphertext, plaintext } = await seal(['local-0', 'local-1'], 'v2', randomBytes(32));
  const strangers = setup(t, ['local-2', 'rsa-a']);
  const result = await tryDecrypt(strangers.reader.plugin, ciphertext);
  t.is(!result.ok && result.code, 'INVALID_INPUT');
  t.is(strangers.calls(), 0);
  // A configured backend that shares a name but holds another key refuses its copy.
  const impostorDir = await makeTempDir();
  t.teardown(impostorDir.remove);
  const [impostor] = await freshLocalBackends(impostorDir.dir, 1);
  const reader = makePlugin([impostor!]);
  t.teardown(reader.close);
  const refused = await tryDecrypt(reader.plugin, ciphertext);
  t.is(!refused.ok && refused.code, 'BACKEND_REJECTED');
  t.true(await refusedOrExact(t, setup(t, ['local-1']), plaintext, ciphertext, new Map(), 'real local-1'));
});

test('malformed envelopes cost no backend call', async (t) => {
  const s = setup(t);
  const { ciphertext, annotations } = await seal(ALL, 'v2', randomBytes(32));
  await fc.assert(
    fc.asyncProperty(fc.array(fc.record({ at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }), { minLength: 1, maxLength: 4 }), async (edits) => {
      const mutated = Buffer.from(ciphertext);
      for (const e of edits) mutated[e.at % mutated.length] = e.value;
      const before = s.calls();
      const result = await tryDecrypt(s.reader.plugin, mutated, annotations);
      if (!result.ok && result.code === 'INVALID_INPUT') assert.equal(s.calls(), before);
      if (result.ok) assert.deepEqual(mutated, ciphertext);
    }),
    { numRuns: 300 },
  );
  t.pass();
});
