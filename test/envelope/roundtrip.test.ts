/**
 * Round trips through the real paths: the envelope functions directly, then the
 * Plugin (quorum wrap in parallel, placement, seal; parse, ordering, commitment,
 * openPayload, failover) with real local key backends.
 */
import test from 'ava';
import fc from 'fast-check';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { KeyBackend } from '../../src/backends/backend.ts';
import { errorCodeOf } from '../../src/errors.ts';
import { envelopeSize, matchesCommitment, newDataKey, newEnvelopeId, openPayload, sealEnvelope } from '../../src/envelope/crypto.ts';
import { ANNOTATION_DOMAIN, parseEnvelope } from '../../src/envelope/format.ts';
import { V2_MAX_ANNOTATION_BYTES, V2_MAX_CIPHERTEXT_BYTES } from '../../src/envelope/limits.ts';
import { placeCopies, type WrappedCopy } from '../../src/envelope/placement.ts';
import { DownBackend, SharedBackend, freshLocalBackends, makePlugin, makeTempDir, tryDecrypt, type TempDir } from '../helpers/envelope-fixtures.ts';

const NAMES = ['local-0', 'local-1', 'local-2', 'local-3', 'local-4'];
let locals: SharedBackend[] = [];
const byName = new Map<string, KeyBackend>();
let temp: TempDir | undefined;
test.before(async () => {
  temp = await makeTempDir();
  locals = (await freshLocalBackends(temp.dir, NAMES.length)).map((b) => new SharedBackend(b));
  for (const b of locals) byName.set(b.name, b);
});
test.after.always(() => temp?.remove());

/** A random non-empty subset of the local backends, in random order. */
const subset = fc.shuffledSubarray(NAMES, { minLength: 1 });
const signal = () => AbortSignal.timeout(5000);

/** Smallest envelope these copies allow: every copy moved to an annotation. */
function smallestV2Size(copies: readonly WrappedCopy[], plaintextLength: number): number {
  return envelopeSize(copies.map((c) => ({ ...c, location: 'annotation' })), plaintextLength);
}

test.serial('direct: wrap, place, seal, parse, commitment, open return the exact plaintext', async (t) => {
  await fc.assert(
    fc.asyncProperty(subset, fc.uint8Array({ minLength: 1, maxLength: 4096 }), fc.constantFrom('v1' as const, 'v2' as const), async (names, plaintext, transport) => {
      const dataKey = newDataKey();
      const envelopeId = newEnvelopeId();
      const copies: WrappedCopy[] = [];
      for (const name of names) {
        const { wrapped, keyVersion } = await byName.get(name)!.wrap(dataKey, { envelopeId, backendName: name }, signal());
        copies.push({ backendName: name, keyVersion, wrapped });
      }
      if (transport === 'v2' && smallestV2Size(copies, plaintext.length) > V2_MAX_CIPHERTEXT_BYTES) {
        assert.throws(() => placeCopies(copies, plaintext.length, transport), (e) => errorCodeOf(e) === 'INVALID_INPUT');
        return;
      }
      const placement = placeCopies(copies, plaintext.length, transport);
      const ciphertext = sealEnvelope({ dataKey, envelopeId, quorum: 1, configuredBackends: names.length, copies: placement.copies, plaintext });
      const envelope = parseEnvelope(ciphertext, placement.annotations);
      for (const copy of envelope.copies) {
        const backend = byName.get(copy.backendName)!;
        const key = await backend.unwrap(copy.wrapped!, copy.keyVersion, { envelopeId: envelope.envelopeId, backendName: backend.name }, signal());
        assert.ok(matchesCommitment(key, envelope));
        assert.deepEqual(openPayload(envelope, key), Buffer.from(plaintext));
      }
      assert.equal(matchesCommitment(newDataKey(), envelope), false);
    }),
    { numRuns: 60 },
  );
  t.pass();
});

/**
 * Encrypt with one plugin (random backends and quorum), decrypt with another whose
 * configuration is a random subset of the local backends: exact plaintext whenever a
 * configured backend has a copy, INVALID_INPUT (and no backend call) otherwise.
 */
async function roundTripProperty(transport: 'v1' | 'v2', maxPlaintext: number, numRuns: number): Promise<void> {
  await fc.assert(
    fc.asyncProperty(
      subset,
      fc.integer({ min: 1, max: 5 }),
      fc.uint8Array({ minLength: 1, maxLength: maxPlaintext }),
      subset,
      async (writers, quorumSeed, plaintext, readers) => {
        const quorum = 1 + (quorumSeed % writers.length);
        // A long straggler grace: this property checks that healthy backends all wrap, even on a loaded CI machine.
        const writer = makePlugin(writers.map((n) => byName.get(n)!), { quorum, stragglerGraceMs: 2000 });
        let encrypted;
        try {
          encrypted = await writer.plugin.encrypt(Buffer.from(plaintext), transport, signal());
        } catch (error) {
          await writer.close();
          // Only a plaintext too large for a KMS v2 ciphertext may be refused.
          assert.equal(transport, 'v2');
          assert.equal(errorCodeOf(error), 'INVALID_INPUT');
          const copies = writers.map((n) => ({ backendName: n, keyVersion: 'x'.repeat(16), wrapped: new Uint8Array(60) }));
          assert.ok(smallestV2Size(copies, plaintext.length) > V2_MAX_CIPHERTEXT_BYTES);
          return;
        }
        await writer.close();
        const { ciphertext, annotations } = encrypted;
        const envelope = parseEnvelope(ciphertext, annotations);
        assert.equal(envelope.quorum, quorum);
        assert.equal(envelope.configuredBackends, writers.length);
        // Healthy backends all wrap; the header lists them in configuration order.
        assert.deepEqual(envelope.copies.map((c) => c.backendName), writers);
        if (transport === 'v1') assert.equal(annotations.size, 0);
        else {
          assert.ok(ciphertext.length <= V2_MAX_CIPHERTEXT_BYTES);
          let total = 0;
          for (const [key, value] of annotations) {
            total += key.length + value.length;
            assert.match(key, new RegExp(`^(${writers.join('|')})\\.${ANNOTATION_DOMAIN.replaceAll('.', '\\.')}$`));
          }
          assert.ok(total <= V2_MAX_ANNOTATION_BYTES);
        }

        const reader = makePlugin(readers.map((n) => byName.get(n)!));
        try {
          const callsBefore = locals.reduce((n, b) => n + b.unwrapCalls, 0);
          const result = await tryDecrypt(reader.plugin, ciphertext, annotations);
          if (readers.some((n) => writers.includes(n))) {
            assert.ok(result.ok, `decrypt failed: ${result.ok ? '' : result.code}`);
            assert.deepEqual(result.plaintext, Buffer.from(plaintext));
          } else {
            assert.ok(!result.ok && result.code === 'INVALID_INPUT');
            assert.equal(locals.reduce((n, b) => n + b.unwrapCalls, 0), callsBefore, 'no backend called for an envelope it has no copy in');
          }
        } finally {
          await reader.close();
        }
      },
    ),
    { numRuns },
  );
}

test.serial('plugin round trip, KMS v2 (1..700-byte plaintexts): exact plaintext, within the v2 limits', async (t) => {
  await roundTripProperty('v2', 700, 80);
  t.pass();
});

test.serial('plugin round trip, KMS v1beta1 (up to 4 KiB): exact plaintext, everything inline', async (t) => {
  await roundTripProperty('v1', 4096, 60);
  t.pass();
});

test.serial('plugin failover: decrypt succeeds while any backend holding a copy works, and fails as unavailable otherwise', async (t) => {
  await fc.assert(
    fc.asyncProperty(subset, fc.uint8Array({ minLength: 1, maxLength: 64 }), fc.func(fc.boolean()), async (writers, plaintext, isDown) => {
      const writer = makePlugin(writers.map((n) => byName.get(n)!), { stragglerGraceMs: 2000 });
      const { ciphertext, annotations } = await writer.plugin.encrypt(Buffer.from(plaintext), 'v2', signal());
      await writer.close();
      const down = new Set(NAMES.filter((n) => isDown(n)));
      const reader = makePlugin(NAMES.map((n) => (down.has(n) ? new DownBackend(n) : byName.get(n)!)));
      try {
        const result = await tryDecrypt(reader.plugin, ciphertext, annotations);
        if (writers.some((n) => !down.has(n))) {
          assert.ok(result.ok && result.plaintext.equals(Buffer.from(plaintext)));
        } else {
          assert.ok(!result.ok && result.code === 'NO_COPY_UNWRAPPED', `got ${result.ok ? 'plaintext' : result.code}`);
        }
      } finally {
        await reader.close();
      }
    }),
    { numRuns: 50 },
  );
  t.pass();
});

test.serial('quorum: encrypt succeeds with exactly quorum backends up and refuses below it', async (t) => {
  const backends = [...locals.slice(0, 3), new DownBackend('down-a'), new DownBackend('down-b')];
  const enough = makePlugin(backends, { quorum: 3 });
  t.teardown(enough.close);
  const result = await enough.plugin.engine.encrypt(randomBytes(32), 'v2', signal());
  t.deepEqual(result.wrappedBy, NAMES.slice(0, 3));
  t.deepEqual(result.missing, ['down-a', 'down-b']);
  const decrypted = await tryDecrypt(enough.plugin, result.ciphertext, result.annotations);
  t.true(decrypted.ok);

  const short = makePlugin(backends, { quorum: 4 });
  t.teardown(short.close);
  const refused = await t.throwsAsync(short.plugin.encrypt(randomBytes(32), 'v2', signal()));
  t.is(errorCodeOf(refused), 'QUORUM_NOT_MET');
});
