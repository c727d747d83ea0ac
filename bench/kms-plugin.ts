/**
 * `npm run bench -- --scenario kms-plugin` (or `node bench/kms-plugin.ts [--seconds 3]`):
 * wraps and unwraps per second through the kms-plugin backend over the real
 * aws-encryption-provider (over local-kms), started by
 * `test/servers/up.sh local-kms aws-encryption-provider`.
 *
 * Two ways in, in interleaved rounds so that machine load hits both alike:
 * - direct: KMS v2 Encrypt / Decrypt to the inner plugin from a plain grpc-js client, as
 *   kube-apiserver would call it (what the inner plugin and its KMS cost);
 * - backend: KmsPluginBackend.wrap / unwrap (what the kms-plugin backend adds: the socket
 *   check, the copy layout, the mapping of answers).
 * Reported per mode and concurrency (1 and 16): ops/s, p50 / p99, and CPU time per
 * operation of this process and of the inner plugin (from /proc), with the load average.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { KmsPluginBackend, kmsPluginConfigSchema } from '../src/backends/kms-plugin.ts';
import { call } from '../src/cli/client.ts';
import { V2Service } from '../src/kms/proto.ts';
import type * as T from '../src/kms/types.ts';
import { serverEnv } from '../test/helpers/servers.ts';

const root = path.resolve(import.meta.dirname, '..');
const CLOCK_TICKS = 100; // USER_HZ on Linux

interface Row {
  mode: 'direct' | 'backend';
  op: 'wrap' | 'unwrap';
  concurrency: number;
  opsPerSecond: number;
  p50Ms: number;
  p99Ms: number;
  /** CPU milliseconds per operation of this process (client side). */
  clientCpuMsPerOp: number;
  /** CPU milliseconds per operation of the inner plugin, or undefined when its pid is unknown. */
  innerCpuMsPerOp: number | undefined;
  errors: number;
}

function processCpuMs(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / CLOCK_TICKS; // utime + stime
  } catch {
    return undefined;
  }
}

function percentile(sorted: number[], p: number): number {
  return sorted.length === 0 ? 0 : sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
}

async function measure(fn: () => Promise<unknown>, concurrency: number, seconds: number, innerPid: number | undefined) {
  const latencies: number[] = [];
  let errors = 0;
  const cpuBefore = process.cpuUsage();
  const innerBefore = processCpuMs(innerPid);
  const started = performance.now();
  const until = started + seconds * 1000;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < until) {
        const t0 = performance.now();
        try {
          await fn();
          latencies.push(performance.now() - t0);
        } catch {
          errors++;
        }
      }
    }),
  );
  const elapsed = (performance.now() - started) / 1000;
  const cpu = process.cpuUsage(cpuBefore);
  const innerAfter = processCpuMs(innerPid);
  latencies.sort((a, b) => a - b);
  const ops = latencies.length;
  return {
    opsPerSecond: Math.round(ops / elapsed),
    p50Ms: Number(percentile(latencies, 50).toFixed(2)),
    p99Ms: Number(percentile(latencies, 99).toFixed(2)),
    clientCpuMsPerOp: Number(((cpu.user + cpu.system) / 1000 / Math.max(ops, 1)).toFixed(3)),
    innerCpuMsPerOp: innerBefore === undefined || innerAfter === undefined ? undefined : Number(((innerAfter - innerBefore) / Math.max(ops, 1)).toFixed(3)),
    errors,
  };
}

export async function runKmsPlugin(options: { seconds?: number; rounds?: number } = {}): Promise<Record<string, unknown>> {
  const env = serverEnv('aws-encryption-provider');
  if (!env?.AWS_ENCRYPTION_PROVIDER_SOCKET) throw new Error('aws-encryption-provider is not running: start it with test/servers/up.sh local-kms aws-encryption-provider');
  const socket = env.AWS_ENCRYPTION_PROVIDER_SOCKET;
  const pidText = (() => {
    try {
      return readFileSync(path.join(root, '.servers', 'aws-encryption-provider.pid'), 'utf8').trim();
    } catch {
      return undefined;
    }
  })();
  const innerPid = pidText && /^\d+$/.test(pidText) ? Number(pidText) : undefined;
  const seconds = options.seconds ?? 3;
  const rounds = options.rounds ?? 2;
  const loadAtStart = os.loadavg().map((l) => l.toFixed(2)).join(' ');

  const direct = new V2Service(`unix:${socket}`, grpc.credentials.createInsecure());
  const backend = new KmsPluginBackend(kmsPluginConfigSchema.parse({ name: 'bench', type: 'kms-plugin', socket, timeoutMs: 2900 }));
  const context = { envelopeId: randomBytes(16), backendName: 'bench' };
  const forever = new AbortController().signal;
  const key = randomBytes(32);
  const sample = await call<T.V2EncryptRequest, T.V2EncryptResponse>(direct, 'Encrypt', { plaintext: key, uid: 'bench' });
  const copy = await backend.wrap(key, context, forever);

  const ways = {
    direct: {
      wrap: () => call<T.V2EncryptRequest, T.V2EncryptResponse>(direct, 'Encrypt', { plaintext: key, uid: 'bench' }),
      unwrap: () =>
        call<T.V2DecryptRequest, T.V2DecryptResponse>(direct, 'Decrypt', { ciphertext: sample.ciphertext, key_id: sample.key_id, annotations: sample.annotations, uid: 'bench' }),
    },
    backend: {
      wrap: () => backend.wrap(key, context, AbortSignal.timeout(2900)),
      unwrap: () => backend.unwrap(copy.wrapped, copy.keyVersion, context, AbortSignal.timeout(2900)),
    },
  } as const;

  const rows: (Row & { round: number })[] = [];
  for (let round = 1; round <= rounds; round++) {
    for (const concurrency of [1, 16]) {
      for (const op of ['wrap', 'unwrap'] as const) {
        for (const mode of ['direct', 'backend'] as const) {
          const result = await measure(ways[mode][op], concurrency, seconds, innerPid);
          rows.push({ round, mode, op, concurrency, ...result });
          console.error(
            `round ${round} ${mode.padEnd(7)} ${op.padEnd(6)} c=${String(concurrency).padEnd(2)} ${String(result.opsPerSecond).padStart(5)} ops/s  p50 ${result.p50Ms} ms  p99 ${result.p99Ms} ms  cpu/op client ${result.clientCpuMsPerOp} ms, inner ${result.innerCpuMsPerOp ?? '?'} ms  errors ${result.errors}`,
          );
        }
      }
    }
  }
  direct.close();
  await backend.close();
  return { inner: 'aws-encryption-provider over local-kms', secondsPerRun: seconds, loadAtStart, loadAtEnd: os.loadavg().map((l) => l.toFixed(2)).join(' '), rows };
}

if (import.meta.main) {
  const { values } = parseArgs({ options: { seconds: { type: 'string', default: '3' }, rounds: { type: 'string', default: '2' } } });
  const result = await runKmsPlugin({ seconds: Number(values.seconds), rounds: Number(values.rounds) });
  console.log(JSON.stringify(result));
}
