/**
 * CPU per AWS KMS Decrypt in this process (`node bench/aws-call-cpu.ts [calls]`): the
 * SDK client as the aws backend configures it, and through AwsKmsBackend.unwrap,
 * against a local-kms of its own, 16 calls in flight. process.cpuUsage() per call, so
 * the machine's other load matters less than for ops/s. Used to measure each change
 * to the aws backend's client configuration (docs/performance.md, "Peers").
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { DecryptCommand, EncryptCommand, KMSClient } from '@aws-sdk/client-kms';
import { awsBackend } from '../src/backends/aws.ts';
import { silentLogger } from '../src/observability/logger.ts';
import { OWN_KMS_KEY_ARN as KEY_ARN, OWN_KMS_REGION as REGION, startOwnLocalKms } from '../test/helpers/own-local-kms.ts';

process.env.AWS_ACCESS_KEY_ID = 'test';
process.env.AWS_SECRET_ACCESS_KEY = 'test';
process.env.AWS_EC2_METADATA_DISABLED = 'true';
const CALLS = Number(process.argv[2] ?? 3000);
const CONCURRENCY = 16;

async function cpuPerCall(label: string, call: () => Promise<unknown>): Promise<void> {
  const run = async (n: number) => {
    let left = n;
    await Promise.all(Array.from({ length: CONCURRENCY }, async () => {
      while (left-- > 0) await call();
    }));
  };
  await run(500); // warm-up: JIT, connections
  const before = process.cpuUsage();
  const t0 = performance.now();
  await run(CALLS);
  const used = process.cpuUsage(before);
  const seconds = (performance.now() - t0) / 1000;
  console.log(`${label.padEnd(44)} ${((used.user + used.system) / CALLS).toFixed(0).padStart(5)} µs CPU/call  ${Math.round(CALLS / seconds)}/s  (load ${os.loadavg()[0]!.toFixed(2)})`);
}

const dir = await mkdtemp(path.join(os.tmpdir(), 'trousseau-aws-cpu-'));
const kms = await startOwnLocalKms(dir);
try {
  const context = { envelopeId: Buffer.alloc(16, 1), backendName: 'aws' };
  const backend = await awsBackend.create(awsBackend.configSchema.parse({ name: 'aws', type: 'aws', keyId: KEY_ARN, region: REGION, endpoint: kms.endpoint, timeoutMs: 1000 }), { logger: silentLogger(), baseDir: dir });
  const dataKey = Buffer.alloc(32, 7);
  const wrapped = await backend.wrap(dataKey, context, new AbortController().signal);
  const variants = (process.env.VARIANTS ?? 'backend,sdk-default,sdk-cached').split(',');
  for (let repeat = 0; repeat < 2; repeat++) {
    for (const variant of variants) {
      if (variant === 'backend') {
        await cpuPerCall('AwsKmsBackend.unwrap', () => backend.unwrap(wrapped.wrapped, wrapped.keyVersion, context, new AbortController().signal));
        continue;
      }
      const client = new KMSClient({
        region: REGION,
        endpoint: kms.endpoint,
        maxAttempts: 2,
        retryMode: 'standard',
        requestHandler: { connectionTimeout: 1000, requestTimeout: 1000 },
        ...(variant === 'sdk-cached' ? { cacheMiddleware: true } : {}),
      });
      const sdkWrapped = await client.send(new EncryptCommand({ KeyId: KEY_ARN, Plaintext: dataKey }));
      const input = { KeyId: KEY_ARN, CiphertextBlob: sdkWrapped.CiphertextBlob! };
      await cpuPerCall(`KMSClient.send, ${variant}`, () =>
        variant === 'sdk-cached' ? client.send(new DecryptCommand(input)) : client.send(new DecryptCommand(input), { abortSignal: new AbortController().signal }),
      );
      client.destroy();
    }
  }
  await backend.close();
} finally {
  await kms.stop();
  await rm(dir, { recursive: true, force: true });
}
