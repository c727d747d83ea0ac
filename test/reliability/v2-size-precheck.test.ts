/**
 * The KMS v2 size pre-check (issue 10, item 7) must count the copies that will
 * actually be requested: every usable backend is asked to wrap, and each copy it
 * returns takes header space even when moved to an annotation. A plaintext that fits
 * with a quorum of copies but not with all of them used to pay for every (billed)
 * wrap, then fail with INVALID_ARGUMENT.
 */
import test from 'ava';
import { status } from '@grpc/grpc-js';
import { envelopeSize } from '../../src/envelope/crypto.ts';
import { V2_MAX_CIPHERTEXT_BYTES } from '../../src/envelope/limits.ts';
import { unavailable } from '../helpers/fault-backend.ts';
import { grpcError, startHarness, type Harness } from '../helpers/plugin-harness.ts';

/** Bytes of the smallest envelope (every copy in an annotation) holding copies of `names`. */
async function smallestEnvelope(h: Harness, names: string[], plaintextLength: number): Promise<number> {
  const versions = new Map((await h.admin()).backends.map((b) => [b.name, b.keyVersion ?? 'x']));
  return envelopeSize(
    names.map((name) => ({ backendName: name, keyVersion: versions.get(name)!, wrapped: new Uint8Array(0), location: 'annotation' as const })),
    plaintextLength,
  );
}

/** The largest plaintext whose envelope fits with copies of `fitting` but not with those of `tooMany`. */
async function boundaryLength(h: Harness, fitting: string[], tooMany: string[]): Promise<number> {
  for (let length = V2_MAX_CIPHERTEXT_BYTES; length > 0; length--) {
    if ((await smallestEnvelope(h, fitting, length)) <= V2_MAX_CIPHERTEXT_BYTES) {
      if ((await smallestEnvelope(h, tooMany, length)) > V2_MAX_CIPHERTEXT_BYTES) return length;
      break;
    }
  }
  throw new Error('no plaintext length separates the two sets');
}

test('a v2 plaintext that fits a quorum of copies but not every requested one is refused before any wrap', async (t) => {
  const h = await startHarness(t, { backends: ['a', 'b', 'c'], quorum: 2 });
  const length = await boundaryLength(h, ['a', 'b'], ['a', 'b', 'c']);
  h.resetCounts();
  const error = await grpcError(t, h.encrypt(Buffer.alloc(length, 1)));
  t.is(error.code, status.INVALID_ARGUMENT, error.details);
  t.is(h.backendCalls(), 0, `${h.backendCalls()} backend calls were paid for a plaintext that could never be sealed`);
  // A plaintext that fits with all three copies still goes through.
  const fitting = await h.encrypt(Buffer.alloc((await boundaryLength(h, ['a', 'b', 'c'], ['a', 'b', 'c', 'c'])), 1));
  t.true(fitting.ciphertext.length <= V2_MAX_CIPHERTEXT_BYTES);
});

test('a spare is started only when its copy could still be placed; one that could not waits for the next failure', async (t) => {
  // quorum 2 of 4; c and d are down at start, so a and b are asked first. The plaintext
  // fits two copies but not three. When a fails, one spare (c) can join b; d could not
  // be placed next to b and c, so it is not called until c fails too.
  const h = await startHarness(t, {
    backends: ['a', 'b', { name: 'c', mode: unavailable }, { name: 'd', mode: unavailable }],
    quorum: 2,
    config: { breaker: { volumeThreshold: 1000 } },
  });
  const length = await boundaryLength(h, ['a', 'b'], ['a', 'b', 'c']);
  h.fault('a').setMode(unavailable);
  h.fault('d').setMode(unavailable);
  h.resetCounts();
  await grpcError(t, h.encrypt(Buffer.alloc(length, 1)));
  t.is(h.fault('c').calls.wrap, 1, 'the spare that fits was not tried');
  t.is(h.fault('d').calls.wrap, 1, 'the second spare was not tried after the first failed');
  // Now with c answering: b + c reach quorum and d is never called.
  h.fault('c').setMode({ kind: 'ok' });
  h.resetCounts();
  const encrypted = await h.encrypt(Buffer.alloc(length, 1));
  t.true(encrypted.ciphertext.length <= V2_MAX_CIPHERTEXT_BYTES);
  t.is(h.fault('d').calls.wrap, 0, 'a spare whose copy could not be placed was paid for');
});
