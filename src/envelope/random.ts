/**
 * Small random values that are NOT secret (envelope ids, AES-GCM nonces) from a pool
 * refilled 4 KiB at a time, the way Node caches entropy for crypto.randomUUID.
 *
 * Never for keys: the pool holds up to 4 KiB of values before they are handed out,
 * so a key drawn from it would lie in memory before it was used and outside the
 * buffer that is wiped after use. Data keys come straight from the CSPRNG
 * (crypto.ts newDataKey); test/security/data-key-source.test.ts checks that no key
 * passes through here.
 *
 * Why a pool at all: each crypto.randomBytes call makes a native job and a fresh
 * ArrayBuffer, and an Encrypt needs several small public values (envelope id, payload
 * nonce, a nonce per local wrap). The bytes come from the same CSPRNG; each value is
 * copied out into its own memory and its bytes in the pool are zeroed at once.
 */
import { randomBytes, randomFillSync } from 'node:crypto';

const POOL_BYTES = 4096;
const pool = Buffer.allocUnsafeSlow(POOL_BYTES);
let next = POOL_BYTES;

/** `size` random bytes for a public value (an id, a nonce); never for a key. */
export function pooledRandomBytes(size: number): Buffer {
  if (!Number.isInteger(size) || size < 0) throw new RangeError(`invalid random size ${size}`);
  if (size > POOL_BYTES / 8) return randomBytes(size);
  if (next + size > POOL_BYTES) {
    randomFillSync(pool);
    next = 0;
  }
  // Its own memory (not a slice of a shared slab), so no two values share an ArrayBuffer.
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
