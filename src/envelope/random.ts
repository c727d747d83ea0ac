/**
 * Small random values (data keys, envelope ids, nonces) from a pool refilled 4 KiB at
 * a time, the way Node caches entropy for crypto.randomUUID.
 *
 * Why not crypto.randomBytes per value: each call makes a native job and a fresh
 * ArrayBuffer, and an Encrypt needs six small values (data key, envelope id, payload
 * nonce, a nonce per local wrap). Under load those calls took ~10 % of the plugin's
 * CPU per Encrypt (docs/performance.md). The bytes still come from the same CSPRNG;
 * each value is copied out and its bytes in the pool are zeroed at once, so the pool
 * never holds a value that was handed out.
 */
import { randomBytes, randomFillSync } from 'node:crypto';

const POOL_BYTES = 4096;
const pool = Buffer.allocUnsafeSlow(POOL_BYTES);
let next = POOL_BYTES;

export function pooledRandomBytes(size: number): Buffer {
  if (!Number.isInteger(size) || size < 0) throw new RangeError(`invalid random size ${size}`);
  if (size > POOL_BYTES / 8) return randomBytes(size);
  if (next + size > POOL_BYTES) {
    randomFillSync(pool);
    next = 0;
  }
  // Its own memory (not a slice of a shared slab): callers wipe keys with fill(0).
  const value = Buffer.allocUnsafeSlow(size);
  pool.copy(value, 0, next, next + size);
  pool.fill(0, next, next + size);
  next += size;
  return value;
}

/** Test hook: how many pooled bytes are left before the next refill. */
export function pooledBytesLeft(): number {
  return POOL_BYTES - next;
}
