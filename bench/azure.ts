/**
 * `node bench/azure.ts [--seconds 10] [--json] [--out bench/results.jsonl]`: the Azure
 * Key Vault backend through lowkey-vault (start it with test/servers/up.sh lowkey-vault).
 *
 * 1. Through the plugin's unix socket (a real Plugin and KmsServer with the Azure
 *    backend alone, quorum 1; a Node gRPC client): KMS v2 Encrypt and Decrypt, ops/s,
 *    p50 / p99, at concurrency 1 and 8.
 * 2. The cost of signing a copy, at concurrency 1: the SDK's wrapKey alone (what an
 *    Encrypt cost before copies were signed) against the backend's wrap (wrapKey, then
 *    sign, then the local check), and the local signature check alone (what Decrypt
 *    adds). Each vault operation's own latency comes from a pipeline policy.
 *
 * lowkey-vault is an emulator doing RSA-4096 in Java on the same two cores as the
 * plugin and the client: the absolute numbers are the emulator's, the differences are
 * what the signing step adds. docs/performance.md ("Azure Key Vault through lowkey-vault").
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import type { PipelinePolicy } from '@azure/core-rest-pipeline';
import { AzureKeyVaultBackend, azureConfigSchema } from '../src/backends/azure.ts';
import { parseAzureCopy, verifyCopySignature, rsaPublicKeyFromJwk } from '../src/backends/azure-copy.ts';
import { call, clientsFor } from '../src/cli/client.ts';
import { parseConfig } from '../src/config/load.ts';
import { KmsServer } from '../src/kms/server.ts';
import type * as T from '../src/kms/types.ts';
import { silentLogger } from '../src/observability/logger.ts';
import { Metrics } from '../src/observability/metrics.ts';
import { Plugin } from '../src/plugin.ts';
import { serverEnv } from '../test/helpers/servers.ts';
import { emit } from './record.ts';

const { values: args } = parseArgs({
  options: { seconds: { type: 'string', default: '10' }, json: { type: 'boolean', default: false }, out: { type: 'string' } },
});
const seconds = Number(args.seconds);
const env = serverEnv('lowkey-vault');
if (!env) {
  console.error('lowkey-vault is not running: start it with test/servers/up.sh lowkey-vault');
  process.exit(2);
}
process.env.IDENTITY_ENDPOINT = env.AZURE_KV_IDENTITY_ENDPOINT;
process.env.IDENTITY_HEADER = 'trousseau-bench';

const opTimes = new Map<string, number[]>();
const timer: PipelinePolicy = {
  name: 'trousseauBenchTimer',
  sendRequest: async (request, next) => {
    const started = performance.now();
    const response = await next(request);
    if (response.status < 300) {
      const op = new URL(request.url).pathname.split('/').pop()!.toLowerCase();
      if (['wrapkey', 'unwrapkey', 'sign'].includes(op)) (opTimes.get(op) ?? opTimes.set(op, []).get(op)!).push(performance.now() - started);
    }
    return response;
  },
};

const backend = new AzureKeyVaultBackend(
  azureConfigSchema.parse({
    name: 'azure',
    type: 'azure',
    vaultUrl: env.AZURE_KV_URL,
    keyName: env.AZURE_KV_KEY_NAME,
    caFile: env.AZURE_KV_CA_FILE,
    disableChallengeResourceVerification: true,
    credential: { method: 'managedIdentity' },
    timeoutMs: 2900,
  }),
  { baseDir: process.cwd(), additionalPolicies: [{ policy: timer, position: 'perRetry' }] },
);

function summary(samples: number[], elapsedMs?: number) {
  const sorted = [...samples].sort((a, b) => a - b);
  const at = (q: number) => Number((sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? NaN).toFixed(1));
  return { n: sorted.length, ...(elapsedMs ? { opsPerSec: Number(((sorted.length * 1000) / elapsedMs).toFixed(1)) } : {}), p50: at(0.5), p99: at(0.99) };
}

async function timed(concurrency: number, body: () => Promise<unknown>) {
  const samples: number[] = [];
  const started = performance.now();
  const until = started + seconds * 1000;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < until) {
        const t0 = performance.now();
        await body();
        samples.push(performance.now() - t0);
      }
    }),
  );
  return summary(samples, performance.now() - started);
}

const dir = await mkdtemp(path.join(tmpdir(), 'trs-bench-'));
const socketPath = path.join(dir, 'kms.sock');
const config = parseConfig({
  socket: { path: socketPath },
  quorum: 1,
  backends: [{ name: 'azure', type: 'local', keyFile: 'injected', timeoutMs: 2900 }],
  encrypt: { deadlineMs: 2900 },
  decrypt: { deadlineMs: 2900 },
  health: { probeIntervalMs: 3_600_000 },
  escrow: { enabled: false },
});
const metrics = new Metrics();
const plugin = new Plugin({ config, baseDir: dir, logger: silentLogger(), metrics, backends: [backend] });
const kms = new KmsServer(plugin, { path: socketPath, mode: config.socket.mode, group: config.socket.group }, metrics, silentLogger());
await plugin.start();
await kms.start();
const clients = clientsFor(socketPath);

const encrypt = () => call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext: randomBytes(32), uid: 'bench' });
const sample = await encrypt();
const decrypt = () =>
  call<T.V2DecryptRequest, T.V2DecryptResponse>(clients.v2, 'Decrypt', {
    ciphertext: sample.ciphertext,
    uid: 'bench',
    key_id: sample.key_id,
    annotations: sample.annotations,
  });
// Warm-up: JIT on both sides, connections, token.
for (let i = 0; i < 10; i++) await encrypt().then(decrypt);

const plugin_: Record<string, unknown> = {};
for (const concurrency of [1, 8]) {
  plugin_[`encrypt_c${concurrency}`] = await timed(concurrency, encrypt);
  plugin_[`decrypt_c${concurrency}`] = await timed(concurrency, decrypt);
}

// The signing step, at concurrency 1, backend level.
const { KeyClient, CryptographyClient } = await import('@azure/keyvault-keys');
const { ManagedIdentityCredential } = await import('@azure/identity');
const { Agent } = await import('node:https');
const { readFileSync } = await import('node:fs');
const sdkOptions = { disableChallengeResourceVerification: true, agent: new Agent({ ca: readFileSync(env.AZURE_KV_CA_FILE!), keepAlive: true }), retryOptions: { maxRetries: 0 } };
const credential = new ManagedIdentityCredential();
const version = await backend.currentKeyVersion(AbortSignal.timeout(5000));
const key = await new KeyClient(env.AZURE_KV_URL!, credential, sdkOptions).getKey(env.AZURE_KV_KEY_NAME!, { version });
const plain = new CryptographyClient(key, credential, sdkOptions);
opTimes.clear();
const wrapOnly = await timed(1, () => plain.wrapKey('RSA-OAEP-256', randomBytes(32)));
const context = { envelopeId: randomBytes(16), backendName: 'azure' };
const signedWrap = await timed(1, () => backend.wrap(randomBytes(32), context, AbortSignal.timeout(5000)));
const copy = await backend.wrap(randomBytes(32), context, AbortSignal.timeout(5000));
const parsed = parseAzureCopy(copy.wrapped);
if (parsed.layout !== 1) throw new Error('expected a signed copy');
const publicKey = rsaPublicKeyFromJwk(key.key ?? {});
const keyId = `${env.AZURE_KV_URL!.replace(/\/+$/, '')}/keys/${env.AZURE_KV_KEY_NAME}`;
const verifySamples: number[] = [];
for (let i = 0; i < 2000; i++) {
  const t0 = performance.now();
  if (!verifyCopySignature(publicKey, { context, keyId, keyVersion: version }, parsed.wrapped, parsed.signature)) throw new Error('signature check failed');
  verifySamples.push(performance.now() - t0);
}
const signing = {
  sdkWrapKeyOnly: wrapOnly,
  backendWrapSigned: signedWrap,
  addedByWrapSigningP50Ms: Number((signedWrap.p50 - wrapOnly.p50).toFixed(1)),
  vaultOps: Object.fromEntries([...opTimes].map(([op, times]) => [op, summary(times)])),
  localVerify: { ...summary(verifySamples.map((x) => x * 1000)), unit: 'us' },
};

clients.close();
await kms.stop(1000);
await plugin.close();
await rm(dir, { recursive: true, force: true });

const result = { server: env.AZURE_KV_SERVER, key: 'RSA-4096', seconds, plugin: plugin_, signing };
const line = emit('azure', result, { json: args.json, out: args.out });
if (!args.json) console.log(JSON.stringify(JSON.parse(line), null, 2));
process.exit(0);
