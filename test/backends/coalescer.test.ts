/**
 * The coalescer that turns concurrent backend calls into batch requests
 * (src/backends/coalescer.ts). The batch sender here is a scripted function: what is
 * under test is the coalescer's own bookkeeping (who goes in which request, how many
 * requests are in flight, who is answered what, aborts). The Vault backend's use of it
 * against the real OpenBao server is tested in vault.test.ts.
 */
import { setImmediate as nextTurn } from 'node:timers/promises';
import test from 'ava';
import { Coalescer } from '../../src/backends/coalescer.ts';

interface Sent {
  items: readonly number[];
  signal: AbortSignal;
  answer: (results: ReadonlyArray<number | Error>) => void;
  fail: (error: Error) => void;
}

/** A sender whose requests stay open until the test answers them. */
function scriptedSender() {
  const sent: Sent[] = [];
  const send = (items: readonly number[], signal: AbortSignal) =>
    new Promise<ReadonlyArray<number | Error>>((resolve, reject) => {
      sent.push({ items, signal, answer: resolve, fail: reject });
    });
  return { sent, send };
}

const never = () => new AbortController().signal;
const doubled = (items: readonly number[]) => items.map((n) => n * 2);

test('calls made in one turn go together, at most maxItems per request, and each gets its own result', async (t) => {
  const { sent, send } = scriptedSender();
  const coalescer = new Coalescer(send, { maxItems: 4, maxRequests: 8 });
  const calls = Array.from({ length: 10 }, (_, i) => coalescer.submit(i, never()));
  await nextTurn();
  t.deepEqual(
    sent.map((s) => s.items),
    [
      [0, 1, 2, 3],
      [4, 5, 6, 7],
      [8, 9],
    ],
  );
  for (const request of sent) request.answer(doubled(request.items));
  t.deepEqual(await Promise.all(calls), Array.from({ length: 10 }, (_, i) => i * 2));
});

test('one call at a time: each is sent alone, in the turn it was made', async (t) => {
  const { sent, send } = scriptedSender();
  const coalescer = new Coalescer(send, { maxItems: 32, maxRequests: 8 });
  for (let i = 0; i < 5; i++) {
    const call = coalescer.submit(i, never());
    await nextTurn();
    t.is(sent.length, i + 1, 'sent without waiting for anything');
    sent[i]!.answer(doubled(sent[i]!.items));
    t.is(await call, i * 2);
  }
  t.deepEqual(
    sent.map((s) => s.items.length),
    [1, 1, 1, 1, 1],
  );
});

test('never more than maxRequests in flight; calls that waited go together when one returns', async (t) => {
  const { sent, send } = scriptedSender();
  const coalescer = new Coalescer(send, { maxItems: 32, maxRequests: 2 });
  const first = [coalescer.submit(1, never())];
  await nextTurn();
  first.push(coalescer.submit(2, never()));
  await nextTurn();
  t.is(sent.length, 2);
  t.is(coalescer.requestsInFlight, 2);
  const waiting = [3, 4, 5].map((n) => coalescer.submit(n, never()));
  await nextTurn();
  t.is(sent.length, 2, 'a third request waits for a slot');
  t.is(coalescer.waiting, 3);
  sent[0]!.answer(doubled(sent[0]!.items));
  t.is(await first[0], 2);
  t.deepEqual(sent[2]?.items, [3, 4, 5], 'the three that waited share the freed slot');
  t.is(coalescer.requestsInFlight, 2);
  sent[1]!.answer(doubled(sent[1]!.items));
  sent[2]!.answer(doubled(sent[2]!.items));
  t.deepEqual(await Promise.all([...first, ...waiting]), [2, 4, 6, 8, 10]);
  t.is(coalescer.requestsInFlight, 0);
});

test('a call aborted while it waits is never sent', async (t) => {
  const { sent, send } = scriptedSender();
  const coalescer = new Coalescer(send, { maxItems: 32, maxRequests: 1 });
  const busy = coalescer.submit(0, never());
  await nextTurn();
  const gaveUp = new AbortController();
  const abandoned = coalescer.submit(1, gaveUp.signal);
  const kept = coalescer.submit(2, never());
  gaveUp.abort(new Error('caller gave up'));
  await t.throwsAsync(abandoned, { message: 'caller gave up' });
  sent[0]!.answer([0]);
  await busy;
  t.deepEqual(sent[1]?.items, [2], 'only the call still waiting is sent');
  sent[1]!.answer([4]);
  t.is(await kept, 4);
});

test('a call aborted while its request is in flight is answered at once; the request goes on for the others and is aborted when nobody waits', async (t) => {
  const { sent, send } = scriptedSender();
  const wiped: number[] = [];
  const coalescer = new Coalescer(send, { maxItems: 32, maxRequests: 8 }, (late) => wiped.push(late));
  const controllers = [new AbortController(), new AbortController(), new AbortController()];
  const calls = controllers.map((c, i) => coalescer.submit(i + 1, c.signal));
  await nextTurn();
  t.is(sent.length, 1);
  controllers[0]!.abort(new Error('first gave up'));
  await t.throwsAsync(calls[0]!, { message: 'first gave up' });
  t.false(sent[0]!.signal.aborted, 'two calls still wait for the request');
  sent[0]!.answer(doubled(sent[0]!.items));
  t.deepEqual(await Promise.all(calls.slice(1)), [4, 6]);
  t.deepEqual(wiped, [2], 'the result nobody took is handed to discard');

  const second = [new AbortController(), new AbortController()];
  const more = second.map((c, i) => coalescer.submit(i, c.signal));
  await nextTurn();
  for (const c of second) c.abort(new Error('gave up'));
  for (const call of more) await t.throwsAsync(call);
  t.true(sent[1]!.signal.aborted, 'the request is aborted once every call in it gave up');
});

test('an error for one item fails that call alone; a failed request fails every call in it', async (t) => {
  const { sent, send } = scriptedSender();
  const coalescer = new Coalescer(send, { maxItems: 32, maxRequests: 8 });
  const calls = [1, 2, 3].map((n) => coalescer.submit(n, never()));
  await nextTurn();
  sent[0]!.answer([2, new Error('item 2 refused'), 6]);
  t.is(await calls[0], 2);
  await t.throwsAsync(calls[1]!, { message: 'item 2 refused' });
  t.is(await calls[2], 6);

  const failing = [1, 2].map((n) => coalescer.submit(n, never()));
  await nextTurn();
  sent[1]!.fail(new Error('connection reset'));
  for (const call of failing) await t.throwsAsync(call, { message: 'connection reset' });

  const short = [1, 2].map((n) => coalescer.submit(n, never()));
  await nextTurn();
  sent[2]!.answer([2]);
  for (const call of short) await t.throwsAsync(call, { message: 'batch answer has 1 results for 2 items' });
  t.is(coalescer.requestsInFlight, 0, 'every failed request gave its slot back');
});

test('failAll answers every waiting call; an already aborted signal is refused without a request', async (t) => {
  const { sent, send } = scriptedSender();
  const coalescer = new Coalescer(send, { maxItems: 32, maxRequests: 1 });
  const busy = coalescer.submit(0, never());
  await nextTurn();
  const waiting = [1, 2].map((n) => coalescer.submit(n, never()));
  coalescer.failAll(new Error('closed'));
  for (const call of waiting) await t.throwsAsync(call, { message: 'closed' });
  await t.throwsAsync(coalescer.submit(9, AbortSignal.abort(new Error('already aborted'))), { message: 'already aborted' });
  sent[0]!.answer([0]);
  t.is(await busy, 0);
  await nextTurn();
  t.is(sent.length, 1, 'nothing else was sent');
});

test('limits are checked', (t) => {
  const send = () => Promise.resolve([]);
  t.throws(() => new Coalescer(send, { maxItems: 0, maxRequests: 1 }), { instanceOf: RangeError });
  t.throws(() => new Coalescer(send, { maxItems: 1.5, maxRequests: 1 }), { instanceOf: RangeError });
  t.throws(() => new Coalescer(send, { maxItems: 1, maxRequests: 0 }), { instanceOf: RangeError });
});
