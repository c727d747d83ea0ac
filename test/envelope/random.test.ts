/**
 * The pooled random source (src/envelope/random.ts) hands out envelope ids and nonces
 * (public values; data keys come straight from the CSPRNG, see
 * test/security/data-key-source.test.ts). A bug there (zeroing before copying,
 * handing out a region twice, an off-by-one at the refill) would repeat AES-GCM
 * nonces or envelope ids, catastrophic and silent, so: no repeats, the right lengths
 * across refills, and bytes that look uniformly random. The data key source gets the
 * same uniformity check.
 */
import test from 'ava';
import { newDataKey } from '../../src/envelope/crypto.ts';
import { pooledBytesLeft, pooledRandomBytes } from '../../src/envelope/random.ts';

test('values have the requested length, across many pool refills, and never repeat', (t) => {
  const seen = new Set<string>();
  const sizes = [12, 16, 32, 1, 7, 512];
  for (let i = 0; i < 20_000; i++) {
    const size = sizes[i % sizes.length]!;
    const value = pooledRandomBytes(size);
    t.is(value.length, size);
    if (size >= 12) {
      const hex = value.toString('hex');
      t.false(seen.has(hex), `value ${i} repeated`);
      seen.add(hex);
    }
  }
});

test('the pool is consumed exactly: each value takes its size, a refill starts a fresh pool', (t) => {
  pooledRandomBytes(1);
  const before = pooledBytesLeft();
  if (before >= 32) {
    pooledRandomBytes(32);
    t.is(pooledBytesLeft(), before - 32);
  }
  // Drain to below one value, then the next one refills.
  while (pooledBytesLeft() >= 32) pooledRandomBytes(32);
  pooledRandomBytes(32);
  t.is(pooledBytesLeft(), 4096 - 32);
});

test('every value owns its memory: wiping one leaves the next untouched', (t) => {
  const a = pooledRandomBytes(32);
  const b = pooledRandomBytes(32);
  t.not(a.buffer, b.buffer);
  const copy = Buffer.from(b);
  a.fill(0);
  t.deepEqual(b, copy);
});

test('large and invalid sizes: direct from the CSPRNG, or refused', (t) => {
  t.is(pooledRandomBytes(4096).length, 4096);
  t.is(pooledRandomBytes(0).length, 0);
  t.throws(() => pooledRandomBytes(-1), { instanceOf: RangeError });
  t.throws(() => pooledRandomBytes(1.5), { instanceOf: RangeError });
});

function chiSquareOf(draw: () => Buffer): number {
  const counts = new Float64Array(256);
  const values = (1024 * 1024) / 32;
  for (let i = 0; i < values; i++) for (const byte of draw()) counts[byte]!++;
  const expected = (values * 32) / 256;
  let chiSquare = 0;
  for (const count of counts) chiSquare += (count - expected) ** 2 / expected;
  return chiSquare;
}

for (const [name, draw] of [
  ['pooled values', () => pooledRandomBytes(32)],
  ['data keys', () => newDataKey()],
] as const) {
  test(`${name} are uniform: chi-square over 1 MiB of 32-byte values is far from any bias`, (t) => {
    const chiSquare = chiSquareOf(draw);
    // 255 degrees of freedom: mean 255, sd ~22.6. 450 is beyond 8 sd (p < 1e-12); an
    // all-zero or half-zeroed output gives millions.
    t.true(chiSquare < 450, `chi-square ${chiSquare.toFixed(1)}`);
    t.true(chiSquare > 100, `chi-square ${chiSquare.toFixed(1)} is too good to be random`);
  });
}
