/**
 * What coalescing transit calls into batch requests saves (src/backends/coalescer.ts):
 * the Vault backend's wraps and unwraps against the real OpenBao of test/servers/up.sh,
 * with batching on (the defaults) and off (`batch.maxItems: 1`), at several numbers of
 * calls in flight. Reported per data key: the plugin process's CPU and OpenBao's CPU
 * (from /proc), calls per second, p50 and p99 latency. Variants alternate within each
 * round so that the machine's other load falls on both.
 *
 *   node bench/vault-batch.ts [--rounds 3] [--calls 6000] [--out bench/results.jsonl]
 *   (or npm run bench -- --scenario vault-batch)
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { loadVaultSdk, VaultBackend, vaultConfigSchema } from '../src/backends/vault.ts';
import { cpuSeconds, serverEnv } from './process-stats.ts';
import { emit } from './record.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

export interface VaultBatchRow {
  variant: 'batched' | 'unbatched';
  concurrency: number;
  op: 'wrap' | 'unwrap';
  opsPerSecond: number;
  p50Ms: number;
  p99Ms: number;
  pluginCpuUsPerKey: number;
  serverCpuUsPerKey: number;
}

const percentile = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))]!;
const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;

export async function runVaultBatch(options: { rounds: number; calls: number; concurrencies: number[] }): Promise<VaultBatchRow[]> {
  const env = serverEnv('openbao');
  const serverPid = Number(readFileSync(path.join(root, '.servers', 'openbao.pid'), 'utf8'));
  await loadVaultSdk();
  const make = (variant: VaultBatchRow['variant']) =>
    new VaultBackend(
      vaultConfigSchema.parse({
        name: 'vault',
        type: 'vault',
        address: env.VAULT_ADDR,
        transitMount: env.VAULT_TRANSIT_MOUNT,
        keyName: env.VAULT_KEY_NAME,
        auth: { method: 'token', tokenFile: env.VAULT_TOKEN_FILE },
        ...(variant === 'unbatched' ? { batch: { maxItems: 1 } } : {}),
      }),
      { baseDir: root },
    );
  const backends = { batched: make('batched'), unbatched: make('unbatched') };
  const signal = new AbortController().signal;
  const context = { envelopeId: randomBytes(16), backendName: 'vault' };
  const dataKey = randomBytes(32);
  const copy = await backends.batched.wrap(dataKey, context, signal);

  async function measure(variant: VaultBatchRow['variant'], op: VaultBatchRow['op'], concurrency: number, calls: number) {
    const backend = backends[variant];
    const call = op === 'wrap' ? () => backend.wrap(dataKey, context, signal) : () => backend.unwrap(copy.wrapped, copy.keyVersion, context, signal);
    const latencies: number[] = [];
    const run = async (n: number, record: boolean) => {
      let left = n;
      await Promise.all(
        Array.from({ length: concurrency }, async () => {
          while (left-- > 0) {
            const started = performance.now();
            await call();
            if (record) latencies.push(performance.now() - started);
          }
        }),
      );
    };
    await run(Math.min(500, calls), false); // warm-up: JIT, connections
    const serverBefore = cpuSeconds(serverPid);
    const before = process.cpuUsage();
    const started = performance.now();
    await run(calls, true);
    const seconds = (performance.now() - started) / 1000;
    const used = process.cpuUsage(before);
    const serverUsed = cpuSeconds(serverPid) - serverBefore;
    latencies.sort((a, b) => a - b);
    return {
      opsPerSecond: calls / seconds,
      p50Ms: percentile(latencies, 0.5),
      p99Ms: percentile(latencies, 0.99),
      pluginCpuUsPerKey: (used.user + used.system) / calls,
      serverCpuUsPerKey: (serverUsed * 1e6) / calls,
    };
  }

  const samples = new Map<string, Array<Awaited<ReturnType<typeof measure>>>>();
  for (let round = 0; round < options.rounds; round++) {
    for (const concurrency of options.concurrencies) {
      for (const op of ['wrap', 'unwrap'] as const) {
        const order = round % 2 === 0 ? (['batched', 'unbatched'] as const) : (['unbatched', 'batched'] as const);
        for (const variant of order) {
          const key = `${variant}/${concurrency}/${op}`;
          samples.set(key, [...(samples.get(key) ?? []), await measure(variant, op, concurrency, options.calls)]);
        }
      }
    }
  }
  await backends.batched.close();
  await backends.unbatched.close();

  const rows: VaultBatchRow[] = [];
  for (const [key, runs] of samples) {
    const [variant, concurrency, op] = key.split('/') as [VaultBatchRow['variant'], string, VaultBatchRow['op']];
    const pick = (field: keyof (typeof runs)[number]) => Math.round(median(runs.map((r) => r[field])) * 100) / 100;
    rows.push({
      variant,
      concurrency: Number(concurrency),
      op,
      opsPerSecond: Math.round(pick('opsPerSecond')),
      p50Ms: pick('p50Ms'),
      p99Ms: pick('p99Ms'),
      pluginCpuUsPerKey: pick('pluginCpuUsPerKey'),
      serverCpuUsPerKey: pick('serverCpuUsPerKey'),
    });
  }
  return rows;
}

export function printVaultBatch(rows: VaultBatchRow[]): void {
  console.log('| in flight | op | variant | keys/s | p50 / p99 ms | plugin CPU µs per key | OpenBao CPU µs per key |');
  console.log('|---:|---|---|---:|---|---:|---:|');
  for (const r of [...rows].sort((a, b) => a.concurrency - b.concurrency || a.op.localeCompare(b.op) || a.variant.localeCompare(b.variant))) {
    console.log(`| ${r.concurrency} | ${r.op} | ${r.variant} | ${r.opsPerSecond} | ${r.p50Ms} / ${r.p99Ms} | ${r.pluginCpuUsPerKey} | ${r.serverCpuUsPerKey} |`);
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const { values } = parseArgs({ options: { rounds: { type: 'string' }, calls: { type: 'string' }, out: { type: 'string' } } });
  const rows = await runVaultBatch({ rounds: Number(values.rounds ?? 3), calls: Number(values.calls ?? 6000), concurrencies: [1, 4, 16, 64] });
  printVaultBatch(rows);
  if (values.out) emit('scenario:vault-batch', { rows }, { json: false, out: values.out });
}
