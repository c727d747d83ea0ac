/**
 * In-process micro-benchmark of the decrypt and encrypt paths (no gRPC, no socket):
 * the ceiling the engine itself allows. `node bench/engine.ts`
 */
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { LocalKeyBackend, generateKeyFile } from '../src/backends/local.ts';
import { parseConfig } from '../src/config/load.ts';
import { silentLogger } from '../src/observability/logger.ts';
import { Metrics } from '../src/observability/metrics.ts';
import { Plugin } from '../src/plugin.ts';

const dir = await mkdtemp(path.join(tmpdir(), 'trousseau-engine-bench-'));
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

const operations: [string, () => Promise<unknown>][] = [
  ['decrypt', () => plugin.decrypt(ciphertext, annotations, signal)],
  ['encrypt', () => plugin.encrypt(seed, 'v2', signal)],
];
for (const [label, fn] of operations) {
  for (let round = 0; round < 2; round++) {
    const n = 20000;
    const started = performance.now();
    const batch = 16;
    for (let i = 0; i < n; i += batch) await Promise.all(Array.from({ length: batch }, fn));
    const seconds = (performance.now() - started) / 1000;
    console.log(`${label}: ${Math.round(n / seconds)} ops/s (in-process, concurrency 16)`);
  }
}
await plugin.close();
