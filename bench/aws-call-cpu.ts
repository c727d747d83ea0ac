/**
 * CPU per AWS KMS Decrypt in this process (`node bench/aws-call-cpu.ts [calls]`), against
 * a local-kms of its own, 16 calls in flight, process.cpuUsage() per call (so the
 * machine's other load matters less than for ops/s). Variants (VARIANTS=a,b):
 *   backend      AwsKmsBackend.unwrap: the backend's own call path (KmsCalls)
 *   sdk-default  KMSClient.send(DecryptCommand, { abortSignal }), configured as the
 *                backend configured its client before issue 15 goal 2
 *   sdk-cached   the same with cacheMiddleware and no per-call options
 *   raw          node:http keep-alive + the SDK's SignatureV4 + JSON.stringify/parse:
 *                no retries, no error mapping; the floor a Node process can reach
 * Used to measure each change to the aws backend's call path (docs/performance.md).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { DecryptCommand, EncryptCommand, KMSClient } from '@aws-sdk/client-kms';
import { SignatureV4 } from '@smithy/signature-v4';
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

/** One signed Decrypt over a keep-alive agent, nothing else. */
function rawDecrypt(endpoint: string, sha256: KMSClient['config']['sha256']): (input: { KeyId: string; CiphertextBlob: Uint8Array }) => Promise<unknown> {
  const url = new URL(endpoint);
  const agent = new http.Agent({ keepAlive: true, maxSockets: 50 });
  const signer = new SignatureV4({ credentials: { accessKeyId: 'test', secretAccessKey: 'test' }, region: REGION, service: 'kms', sha256 });
  return async (input) => {
    const body = JSON.stringify({ KeyId: input.KeyId, CiphertextBlob: Buffer.from(input.CiphertextBlob).toString('base64') });
    const signed = await signer.sign({
      method: 'POST',
      protocol: 'http:',
      hostname: url.hostname,
      port: Number(url.port),
      path: '/',
      query: {},
      headers: { host: url.host, 'content-type': 'application/x-amz-json-1.1', 'x-amz-target': 'TrentService.Decrypt', 'content-length': String(Buffer.byteLength(body)) },
      body,
    });
    return new Promise((resolve, reject) => {
      const req = http.request({ host: url.hostname, port: url.port, method: 'POST', path: '/', headers: signed.headers, agent }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const out = JSON.parse(Buffer.concat(chunks).toString('utf8')) as { KeyId: string; Plaintext: string };
          resolve({ KeyId: out.KeyId, Plaintext: Buffer.from(out.Plaintext, 'base64') });
        });
      });
      req.on('error', reject);
      req.end(body);
    });
  };
}

const dir = await mkdtemp(path.join(os.tmpdir(), 'trousseau-aws-cpu-'));
const kms = await startOwnLocalKms(dir);
try {
  const context = { envelopeId: Buffer.alloc(16, 1), backendName: 'aws' };
  const backend = await awsBackend.create(awsBackend.configSchema.parse({ name: 'aws', type: 'aws', keyId: KEY_ARN, region: REGION, endpoint: kms.endpoint, timeoutMs: 1000 }), { logger: silentLogger(), baseDir: dir });
  const dataKey = Buffer.alloc(32, 7);
  const wrapped = await backend.wrap(dataKey, context, new AbortController().signal);
  const variants = (process.env.VARIANTS ?? 'backend,sdk-default,raw').split(',');
  for (let repeat = 0; repeat < 2; repeat++) {
    for (const variant of variants) {
      if (variant === 'raw') {
        const client = new KMSClient({ region: REGION, endpoint: kms.endpoint });
        const raw = rawDecrypt(kms.endpoint, client.config.sha256);
        const sdkWrapped = await client.send(new EncryptCommand({ KeyId: KEY_ARN, Plaintext: dataKey }));
        client.destroy();
        await cpuPerCall('raw signed HTTP request', () => raw({ KeyId: KEY_ARN, CiphertextBlob: sdkWrapped.CiphertextBlob! }));
        continue;
      }
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
