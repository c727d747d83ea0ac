/**
 * CPU cost of one in-process Encrypt (and Decrypt), measured as process CPU time per
 * operation rather than wall time, so that a machine shared with other work still
 * gives comparable numbers across runs. Also the cost of one 32-byte random value
 * from the pool and straight from the CSPRNG. Used to price drawing data keys
 * directly from the CSPRNG (docs/performance.md). `node bench/encrypt-cpu.ts [rounds]`
 */
import { randomFillSync } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { LocalKeyBackend, generateKeyFile } from '../src/backends/local.ts';
import { parseConfig } from '../src/config/load.ts';
import { pooledRandomBytes } from '../src/envelope/random.ts';
import { silentLogger } from '../src/observability/logger.ts';
import { Metrics } from '../src/observability/metrics.ts';
import { Plugin } from '../src/plugin.ts';

const rounds = Number(process.argv[2] ?? 5);
const dir = await mkdtemp(path.join(tmpdir(), 'trousseau-cpu-bench-'));
const names = ['a', 'b', 'c'];
for (const n of names) await generateKeyFile(path.join(dir, `${n}.key`));
const config = parseConfig({ quorum: 2, backends: names.map((name) => ({ name, type: 'local', keyFile: `${name}.key` })) });
const plugin = new Plugin({
  config,
  baseDir: dir,
  logger: silentLogger(),
  metrics: new Metrics(),
  backends: names.map((n) => new LocalKeyBackend(n, path.join(dir, `${n}.key`))),
});
await plugin.start();
const signal = new AbortController().signal;
const seed = Buffer.alloc(32, 1);
const { ciphertext, annotations } = await plugin.encrypt(seed, 'v2', signal);

/** CPU microseconds (user + system) per call of `fn`, over `n` calls at concurrency 16. */
async function cpuPerOp(n: number, fn: () => Promise<unknown>): Promise<number> {
  const before = process.cpuUsage();
  for (let i = 0; i < n; i += 16) await Promise.all(Array.from({ length: 16 }, fn));
  const used = process.cpuUsage(before);
  return (used.user + used.system) / n;
}

function cpuPerValue(n: number, fn: () => Buffer): number {
  const before = process.cpuUsage();
  for (let i = 0; i < n; i++) fn().fill(0);
  const used = process.cpuUsage(before);
  return ((used.user + used.system) * 1000) / n;
}

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
const results: Record<string, number[]> = { encrypt: [], decrypt: [], pool: [], direct: [] };
await cpuPerOp(4000, () => plugin.encrypt(seed, 'v2', signal)); // warm-up
for (let round = 0; round < rounds; round++) {
  results.encrypt!.push(await cpuPerOp(10_000, () => plugin.encrypt(seed, 'v2', signal)));
  results.decrypt!.push(await cpuPerOp(10_000, () => plugin.decrypt(ciphertext, annotations, signal)));
  results.pool!.push(cpuPerValue(200_000, () => pooledRandomBytes(32)));
  results.direct!.push(cpuPerValue(200_000, () => randomFillSync(Buffer.allocUnsafeSlow(32))));
}
console.log(`encrypt: ${median(results.encrypt!).toFixed(1)} us CPU per op (median of ${rounds}; ${results.encrypt!.map((v) => v.toFixed(1)).join(' ')})`);
console.log(`decrypt: ${median(results.decrypt!).toFixed(1)} us CPU per op (median of ${rounds}; ${results.decrypt!.map((v) => v.toFixed(1)).join(' ')})`);
console.log(`32 random bytes from the pool: ${median(results.pool!).toFixed(0)} ns CPU; straight from the CSPRNG: ${median(results.direct!).toFixed(0)} ns CPU`);
await plugin.close();
await rm(dir, { recursive: true, force: true });
