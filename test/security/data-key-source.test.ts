/**
 * Data keys never pass through the random pool (issue 10, item 18). The pool
 * (src/envelope/random.ts) holds up to 4 KiB of random bytes before they are handed
 * out, so only public values (envelope ids, nonces) may come from it. Checked
 * structurally with the pool's own counter: drawing a data key leaves the pool
 * untouched, and a whole Encrypt takes exactly its public values from it.
 */
import test from 'ava';
import { newDataKey, newEnvelopeId } from '../../src/envelope/crypto.ts';
import { pooledBytesLeft, pooledRandomBytes } from '../../src/envelope/random.ts';
import { freshLocalBackends, makePlugin, makeTempDir } from '../helpers/envelope-fixtures.ts';

/** Make sure the next `bytes` pooled bytes come without a refill, so the counter tells all. */
function roomInPool(bytes: number): void {
  while (pooledBytesLeft() < bytes) pooledRandomBytes(16);
}

test.serial('drawing a data key takes nothing from the pool; an envelope id does', (t) => {
  roomInPool(512);
  const before = pooledBytesLeft();
  const keys = Array.from({ length: 8 }, () => newDataKey());
  t.is(pooledBytesLeft(), before, 'data keys were drawn from the pool');
  t.true(keys.every((k) => k.length === 32));
  t.is(new Set(keys.map((k) => k.toString('hex'))).size, 8);
  // Each key owns its memory, so wiping one wipes exactly that key.
  t.is(new Set(keys.map((k) => k.buffer)).size, 8);
  t.true(keys.every((k) => k.byteOffset === 0 && k.buffer.byteLength === 32));
  newEnvelopeId();
  t.is(pooledBytesLeft(), before - 16, 'the envelope id (public) still comes from the pool');
});

test.serial('a whole Encrypt takes only its public values from the pool: envelope id, payload nonce, one nonce per local wrap', async (t) => {
  const temp = await makeTempDir();
  t.teardown(temp.remove);
  const backends = await freshLocalBackends(temp.dir, 3);
  const { plugin, close } = makePlugin(backends, { quorum: 3, stragglerGraceMs: 0 });
  t.teardown(close);
  const signal = new AbortController().signal;
  await plugin.encrypt(Buffer.alloc(64, 1), 'v2', signal); // loads the key files
  for (let i = 0; i < 5; i++) {
    roomInPool(1024);
    const before = pooledBytesLeft();
    await plugin.encrypt(Buffer.alloc(64, 1), 'v2', signal);
    t.is(before - pooledBytesLeft(), 16 + 12 + 3 * 12, 'an Encrypt took more than its id and nonces from the pool: a data key?');
  }
});
