/**
 * What each configured backend adds to an Encrypt and a Decrypt in the engine itself,
 * with the backends' own work taken out: in-process (no gRPC), backends that answer at
 * once (a copy is the data key itself), 16 calls in flight, CPU time of this process
 * per call. The rows differ only in the number of backends and the quorum, so the
 * differences are the engine's cost per backend: its guard (admission, breaker,
 * timeout, metrics, latency window), the fan-out and the envelope's extra copy.
 * `node bench/engine-per-backend.ts [rounds] [backends]`; run it from another checkout
 * (same file copied there) to compare two builds.
 *
 * CPU time per call moves by ±20 % between rounds on a shared VM. Instruction counts
 * do not: `BENCH_CALLS=1000` and `BENCH_CALLS=5000` under `valgrind --tool=callgrind`,
 * one round and one shape (`... engine-per-backend.ts 1 3`): the difference of the
 * two totals divided by 8,000 (the warm-up makes as many calls as the round) is the
 * instructions of one Encrypt plus one Decrypt, start-up cancelled out.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { KeyBackend } from '../src/backends/backend.ts';
import { parseConfig } from '../src/config/load.ts';
import { silentLogger } from '../src/observability/logger.ts';
import { Metrics } from '../src/observability/metrics.ts';
import { Plugin } from '../src/plugin.ts';

/** A backend with no work of its own: the copy is the key (never do this outside a benchmark). */
class InstantBackend implements KeyBackend {
  readonly kind = 'local';
  readonly name: string;
  constructor(name: string) {
    this.name = name;
  }
  async currentKeyVersion(): Promise<string> {
    return '1';
  }
  async wrap(dataKey: Uint8Array): Promise<{ wrapped: Uint8Array; keyVersion: string }> {
    return { wrapped: Buffer.from(dataKey), keyVersion: '1' };
  }
  async unwrap(wrapped: Uint8Array): Promise<Uint8Array> {
    return Buffer.from(wrapped);
  }
  async close(): Promise<void> {}
}

const rounds = Number(process.argv[2] ?? 5);
const onlyBackends = process.argv[3] === undefined ? undefined : Number(process.argv[3]);
const CALLS = Number(process.env.BENCH_CALLS ?? 20_000);
const IN_FLIGHT = 16;
const shapes = [
  { label: '1 backend, quorum 1', backends: 1, quorum: 1 },
  { label: '2 backends, quorum 2', backends: 2, quorum: 2 },
  { label: '3 backends, quorum 2', backends: 3, quorum: 2 },
].filter((shape) => onlyBackends === undefined || shape.backends === onlyBackends);

const dir = await mkdtemp(path.join(tmpdir(), 'trousseau-per-backend-'));
const signal = new AbortController().signal;
const seed = Buffer.alloc(32, 1);

/** CPU microseconds per call of `fn`, `IN_FLIGHT` callers in a closed loop. */
async function cpuPerCall(fn: () => Promise<unknown>): Promise<number> {
  let left = CALLS;
  const before = process.cpuUsage();
  await Promise.all(
    Array.from({ length: IN_FLIGHT }, async () => {
      while (left-- > 0) await fn();
    }),
  );
  const used = process.cpuUsage(before);
  return (used.user + used.system) / CALLS;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

try {
  const results: Record<string, { encrypt: number[]; decrypt: number[] }> = {};
  for (const shape of shapes) {
    const names = Array.from({ length: shape.backends }, (_, i) => `b${i}`);
    const config = parseConfig({ quorum: shape.quorum, backends: names.map((name) => ({ name, type: 'local', keyFile: `${name}.key` })) });
    const plugin = new Plugin({ config, baseDir: dir, logger: silentLogger(), metrics: new Metrics(), backends: names.map((n) => new InstantBackend(n)) });
    await plugin.start();
    const { ciphertext, annotations } = await plugin.encrypt(seed, 'v2', signal);
    const encrypt = () => plugin.encrypt(seed, 'v2', signal);
    const decrypt = () => plugin.decrypt(ciphertext, annotations, signal);
    await cpuPerCall(encrypt); // warm-up: JIT and caches
    await cpuPerCall(decrypt);
    const r = { encrypt: [] as number[], decrypt: [] as number[] };
    for (let i = 0; i < rounds; i++) {
      r.encrypt.push(await cpuPerCall(encrypt));
      r.decrypt.push(await cpuPerCall(decrypt));
    }
    results[shape.label] = r;
    await plugin.close();
  }
  for (const [label, r] of Object.entries(results)) {
    console.log(`${label.padEnd(22)} Encrypt ${median(r.encrypt).toFixed(1).padStart(6)} µs CPU per call (${r.encrypt.map((x) => x.toFixed(0)).join(' ')}), Decrypt ${median(r.decrypt).toFixed(1).padStart(6)} (${r.decrypt.map((x) => x.toFixed(0)).join(' ')})`);
  }
} finally {
  await rm(dir, { recursive: true, force: true });
}
