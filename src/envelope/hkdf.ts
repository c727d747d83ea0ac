/**
 * HKDF-SHA256 (RFC 5869) for outputs of at most one hash length, built on Node's
 * one-shot `crypto.hash`. Why not `hkdfSync`: it makes a native KeyObject and a native
 * job per call, and every native object costs the young-generation GC a weak handle to
 * process; under load those scavenges dominated the plugin's tail latency. This file
 * makes no native object, and wipes every buffer that held key material.
 *
 * Tested byte for byte against `hkdfSync` (test/envelope/hkdf.test.ts).
 */
import { hash } from 'node:crypto';

const BLOCK_BYTES = 64;
export const HASH_BYTES = 32;
const IPAD = 0x36;
const OPAD = 0x5c;

/**
 * Scratch memory shared by every call: the function is synchronous, so no two calls
 * can use it at once, and it is wiped before each call returns. One allocation per
 * process instead of one per HMAC (three per Encrypt and per Decrypt).
 */
const SHARED_SCRATCH = Buffer.alloc(BLOCK_BYTES + 128);

/** HMAC-SHA256 (RFC 2104) of the concatenated `parts`, for keys of at most one block. */
export function hmacSha256(key: Uint8Array, ...parts: Uint8Array[]): Buffer {
  if (key.length > BLOCK_BYTES) throw new RangeError('HMAC key longer than one block');
  const messageLength = parts.reduce((sum, p) => sum + p.length, 0);
  // One scratch buffer: [K ^ ipad | message] for the inner hash, then reused as
  // [K ^ opad | inner digest] for the outer one.
  const needed = BLOCK_BYTES + Math.max(messageLength, HASH_BYTES);
  const scratch = needed <= SHARED_SCRATCH.length ? SHARED_SCRATCH : Buffer.alloc(needed);
  let inner: Buffer | undefined;
  try {
    for (let i = 0; i < BLOCK_BYTES; i++) scratch[i] = (key[i] ?? 0) ^ IPAD;
    let at = BLOCK_BYTES;
    for (const part of parts) {
      scratch.set(part, at);
      at += part.length;
    }
    inner = hash('sha256', scratch.subarray(0, at), 'buffer');
    for (let i = 0; i < BLOCK_BYTES; i++) scratch[i] = (key[i] ?? 0) ^ OPAD;
    scratch.set(inner, BLOCK_BYTES);
    return hash('sha256', scratch.subarray(0, BLOCK_BYTES + HASH_BYTES), 'buffer');
  } finally {
    scratch.fill(0, 0, needed);
    inner?.fill(0);
  }
}

/** HKDF-Extract: the pseudorandom key. The caller wipes it. */
export function hkdfExtract(salt: Uint8Array, inputKey: Uint8Array): Buffer {
  return hmacSha256(salt, inputKey);
}

const COUNTER_ONE = Uint8Array.of(1);

/** HKDF-Expand to exactly one hash length (T(1) of RFC 5869). */
export function hkdfExpand32(pseudorandomKey: Uint8Array, info: Uint8Array): Buffer {
  return hmacSha256(pseudorandomKey, info, COUNTER_ONE);
}
