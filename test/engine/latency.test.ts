/**
 * LatencyWindow against the plain definition: the nearest-rank percentile of the last
 * 256 samples, sorted afresh. Percentiles are read on every call (admission, hedging,
 * the straggler grace), so they must be current after every sample, through the ring's
 * wrap-around, with repeated values and extremes.
 */
import test from 'ava';
import { LatencyWindow } from '../../src/engine/latency.ts';

const CAPACITY = 256;

function reference(samples: readonly number[], p: number): number | undefined {
  const recent = samples.slice(-CAPACITY).sort((a, b) => a - b);
  if (recent.length === 0) return undefined;
  return recent[Math.min(recent.length - 1, Math.max(0, Math.ceil((p / 100) * recent.length) - 1))];
}

/** A small deterministic generator, so a failure can be replayed. */
function generator(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state / 2 ** 32;
  };
}

test('every percentile equals the sorted last 256 samples after every record, through wrap-around', (t) => {
  const window = new LatencyWindow();
  const random = generator(7);
  const samples: number[] = [];
  t.is(window.percentile(50), undefined);
  let checked = 0;
  for (let i = 0; i < 3 * CAPACITY + 17; i++) {
    // Repeated values (rounded), a heavy tail, zeros and an occasional Infinity.
    const r = random();
    const value = r < 0.01 ? Infinity : r < 0.1 ? 0 : Math.round(-Math.log(r) * 10) / 2;
    window.record(value);
    samples.push(value);
    t.is(window.size, Math.min(samples.length, CAPACITY));
    for (const p of [0, 1, 50, 90, 95, 99, 100]) {
      if (window.percentile(p) !== reference(samples, p)) {
        t.fail(`after ${samples.length} samples, p${p} is ${window.percentile(p)}, expected ${reference(samples, p)}`);
        return;
      }
      checked++;
    }
  }
  t.log(`${checked} percentiles checked`);
  t.pass();
});

test('a change of pace shows at once: the newest samples count in the next percentile', (t) => {
  const window = new LatencyWindow();
  for (let i = 0; i < CAPACITY; i++) window.record(1);
  // 13 of 256 is just over 5 %: p95 must be the new pace after exactly 13 slow calls.
  for (let i = 0; i < 12; i++) window.record(100);
  t.is(window.percentile(95), 1);
  window.record(100);
  t.is(window.percentile(95), 100);
  t.is(window.percentile(50), 1);
});

test('a value that is not a number is ignored', (t) => {
  const window = new LatencyWindow();
  window.record(Number.NaN);
  t.is(window.size, 0);
  window.record(3);
  window.record(Number.NaN);
  t.is(window.size, 1);
  t.is(window.percentile(99), 3);
});
