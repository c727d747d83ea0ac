/**
 * `node bench/pkcs11.ts [--seconds 3] [--rounds 3] [--json] [--out bench/results.jsonl]`:
 * the pkcs11 backend's wraps and unwraps per second against SoftHSM2 (start it with
 * test/servers/up.sh softhsm), at concurrency 1 and 8, with the local key backend
 * measured in the same rounds, interleaved, as the yardstick: on a shared machine
 * the ratio and the CPU time per operation say more than the raw rate.
 *
 * Backend calls directly (no gRPC): what one pkcs11 copy costs an Encrypt or a
 * Decrypt. CPU time is this process's (user + system), which includes the pkcs11
 * worker thread and SoftHSM2's own work inside it. docs/performance.md ("pkcs11").
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os, { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import type { KeyBackend } from '../src/backends/backend.ts';
import { LocalKeyBackend, generateKeyFile } from '../src/backends/local.ts';
import { Pkcs11Backend } from '../src/backends/pkcs11.ts';
import { privateSoftHsm } from '../test/backends/pkcs11-helpers.ts';
import { serverEnv } from '../test/helpers/servers.ts';
import { emit } from './record.ts';

const { values: args } = parseArgs({
  options: { seconds: { type: 'string', default: '3' }, rounds: { type: 'string', default: '3' }, json: { type: 'boolean', default: false }, out: { type: 'string' } },
});
const seconds = Number(args.seconds);
const rounds = Number(args.rounds);
const env = serverEnv('softhsm');
if (!env) {
  console.error('SoftHSM2 is not set up: run test/servers/up.sh softhsm');
  process.exit(2);
}

const hsm = await privateSoftHsm(env);
const dir = await mkdtemp(path.join(tmpdir(), 'trousseau-bench-p11-'));
await generateKeyFile(path.join(dir, 'local.key'));
const backends: Record<string, KeyBackend> = {
  pkcs11: new Pkcs11Backend(hsm.config({ timeoutMs: 2900 }), { baseDir: hsm.dir }),
  local: new LocalKeyBackend('local', path.join(dir, 'local.key')),
};
const signal = () => AbortSignal.timeout(5000);

interface Cell {
  backend: string;
  operation: 'wrap' | 'unwrap';
  concurrency: number;
  opsPerSec: number[];
  cpuUsPerOp: number[];
  errors: number;
}
const cells = new Map<string, Cell>();

async function measure(name: string, operation: Cell['operation'], concurrency: number): Promise<void> {
  const backend = backends[name]!;
  const context = { envelopeId: randomBytes(16), backendName: backend.name };
  const copy = await backend.wrap(randomBytes(32), context, signal());
  const fire = operation === 'wrap' ? () => backend.wrap(randomBytes(32), context, signal()) : () => backend.unwrap(copy.wrapped, copy.keyVersion, context, signal());
  let ops = 0;
  let errors = 0;
  const cpu0 = process.cpuUsage();
  const started = performance.now();
  const stopAt = started + seconds * 1000;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < stopAt) {
        try {
          await fire();
          ops++;
        } catch {
          errors++;
        }
      }
    }),
  );
  const elapsed = (performance.now() - started) / 1000;
  const cpu = process.cpuUsage(cpu0);
  const key = `${name}/${operation}/${concurrency}`;
  const cell = cells.get(key) ?? { backend: name, operation, concurrency, opsPerSec: [], cpuUsPerOp: [], errors: 0 };
  cell.opsPerSec.push(ops / elapsed);
  cell.cpuUsPerOp.push((cpu.user + cpu.system) / Math.max(1, ops));
  cell.errors += errors;
  cells.set(key, cell);
}

const load = os.loadavg().map((l) => l.toFixed(2)).join(' / ');
try {
  for (let round = 0; round < rounds; round++) {
    for (const concurrency of [1, 8]) {
      for (const operation of ['wrap', 'unwrap'] as const) {
        for (const name of ['pkcs11', 'local']) await measure(name, operation, concurrency);
      }
    }
  }
} finally {
  await Promise.all(Object.values(backends).map((b) => b.close()));
  await rm(dir, { recursive: true, force: true });
  await hsm.cleanup();
}

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
const rows = [...cells.values()].map((c) => ({
  backend: c.backend,
  operation: c.operation,
  concurrency: c.concurrency,
  opsPerSec: Math.round(median(c.opsPerSec)),
  cpuUsPerOp: Math.round(median(c.cpuUsPerOp)),
  errors: c.errors,
}));
const ratios = rows
  .filter((r) => r.backend === 'pkcs11')
  .map((r) => {
    const local = rows.find((l) => l.backend === 'local' && l.operation === r.operation && l.concurrency === r.concurrency)!;
    return { operation: r.operation, concurrency: r.concurrency, pkcs11OverLocalCpu: Math.round((r.cpuUsPerOp / local.cpuUsPerOp) * 10) / 10 };
  });
const result = { seconds, rounds, loadAtStart: load, loadAtEnd: os.loadavg().map((l) => l.toFixed(2)).join(' / '), rows, ratios };
emit('pkcs11', result, { json: args.json, out: args.out });
if (!args.json) {
  console.log(`pkcs11 (SoftHSM2) vs local, ${rounds} interleaved rounds of ${seconds} s, medians; load ${load} -> ${result.loadAtEnd}`);
  for (const r of rows) console.log(`  ${r.backend.padEnd(7)} ${r.operation.padEnd(7)} c=${String(r.concurrency).padEnd(2)} ${String(r.opsPerSec).padStart(7)} ops/s  ${String(r.cpuUsPerOp).padStart(5)} µs CPU/op  errors ${r.errors}`);
  for (const r of ratios) console.log(`  pkcs11/local CPU per ${r.operation} at c=${r.concurrency}: ${r.pkcs11OverLocalCpu}x`);
}
