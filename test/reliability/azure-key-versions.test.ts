/**
 * Azure backend defects of issue 11, against lowkey-vault:
 *
 * (a) Envelopes naming thousands of invented key versions used to create one SDK client
 *     each (an unbounded map) and cost two server calls each (getKey + unwrapKey). Now
 *     only versions the vault lists create clients; an unknown one is a rejected copy,
 *     remembered, and costs at most one listing per interval for all of them together.
 * (b) After the key was deleted and created again, wraps kept using the vanished version
 *     until the next refresh (5 minutes by default). Now a 404 re-resolves at once.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Agent } from 'node:https';
import test from 'ava';
import type { PipelinePolicy } from '@azure/core-rest-pipeline';
import { ManagedIdentityCredential } from '@azure/identity';
import { KeyClient } from '@azure/keyvault-keys';
import { AzureKeyVaultBackend, azureConfigSchema } from '../../src/backends/azure.ts';
import { encodeSignedCopy } from '../../src/backends/azure-copy.ts';
import { newDataKey, newEnvelopeId, sealEnvelope } from '../../src/envelope/crypto.ts';
import { errorCodeOf } from '../../src/errors.ts';
import { makePlugin, tryDecrypt } from '../helpers/envelope-fixtures.ts';
import { requireServer, requireVar } from '../helpers/servers.ts';

const server = requireServer('lowkey-vault');

if ('missing' in server) {
  test.skip(`azure key versions: ${server.missing}`, () => {});
} else {
  const env = server.env;
  process.env.IDENTITY_ENDPOINT = env.AZURE_KV_IDENTITY_ENDPOINT;
  process.env.IDENTITY_HEADER = 'trousseau-test';
  const caFile = requireVar(env, 'AZURE_KV_CA_FILE', 'lowkey-vault');
  const KEY_OPS = ['wrapKey', 'unwrapKey', 'encrypt', 'decrypt', 'sign', 'verify'] as const;
  const signal = () => AbortSignal.timeout(10_000);

  const recorder = () => {
    const requests: string[] = [];
    const policy: PipelinePolicy = {
      name: 'trousseauCountRequests',
      sendRequest: (request, next) => {
        requests.push(`${request.method} ${new URL(request.url).pathname}`);
        return next(request);
      },
    };
    return { requests, policy };
  };

  const make = (vaultUrl: string, keyName: string, policy: PipelinePolicy) =>
    new AzureKeyVaultBackend(
      azureConfigSchema.parse({
        name: 'azure',
        type: 'azure',
        vaultUrl,
        keyName,
        caFile,
        disableChallengeResourceVerification: true,
        credential: { method: 'managedIdentity' },
        timeoutMs: 2900,
      }),
      { baseDir: process.cwd(), additionalPolicies: [{ policy, position: 'perRetry' }] },
    );

  test('azure (lowkey-vault): invented key versions are rejected copies that cost almost no server calls', async (t) => {
    const { requests, policy } = recorder();
    const backend = make(env.AZURE_KV_URL!, env.AZURE_KV_KEY_NAME!, policy);
    t.teardown(() => backend.close());
    await backend.currentKeyVersion(signal());
    requests.length = 0;
    // Well-formed signed copies, each naming a version the vault never issued.
    const forged = () => encodeSignedCopy(randomBytes(512), randomBytes(512));
    const context = { envelopeId: randomBytes(16), backendName: 'azure' };
    const codes = new Map<string, number>();
    const started = Date.now();
    for (let batch = 0; batch < 6; batch++) {
      const results = await Promise.all(
        Array.from({ length: 50 }, () => backend.unwrap(forged(), randomBytes(16).toString('hex'), context, signal()).then(() => 'OK', errorCodeOf)),
      );
      for (const code of results) codes.set(code, (codes.get(code) ?? 0) + 1);
    }
    const elapsedMs = Date.now() - started;
    t.deepEqual([...codes], [['BACKEND_REJECTED', 300]], 'every invented version is a rejected copy, never an outage');
    // One listing per 2 s at most (plus its token round trip); before the fix: 600 calls.
    const allowed = 2 * (Math.ceil(elapsedMs / 2000) + 1);
    t.log(`300 invented versions in ${elapsedMs} ms cost ${requests.length} requests: ${[...new Set(requests)].join(', ')}`);
    t.true(requests.length <= allowed, `${requests.length} requests for 300 invented versions (allowed ${allowed})`);
    t.deepEqual(
      requests.filter((r) => /unwrapkey$/i.test(r)),
      [],
      'no unwrapKey for a version the vault does not list',
    );
    // The same invented version again costs nothing: it is remembered.
    const version = randomBytes(16).toString('hex');
    await backend.unwrap(forged(), version, context, signal()).catch(() => undefined);
    const before = requests.length;
    t.is(errorCodeOf(await backend.unwrap(forged(), version, context, signal()).catch((e: unknown) => e)), 'BACKEND_REJECTED');
    t.is(requests.length, before, 'a refused version is cached negatively');
  });

  test('azure (lowkey-vault): 300 envelopes naming invented versions through a real plugin leave the Azure breaker closed', async (t) => {
    const { requests, policy } = recorder();
    const backend = make(env.AZURE_KV_URL!, env.AZURE_KV_KEY_NAME!, policy);
    const { plugin, close } = makePlugin([backend]);
    t.teardown(close);
    await plugin.start();
    const genuine = await plugin.encrypt(randomBytes(32), 'v1', AbortSignal.timeout(10_000));
    requests.length = 0;
    const codes = new Map<string, number>();
    for (let batch = 0; batch < 6; batch++) {
      const outcomes = await Promise.all(
        Array.from({ length: 50 }, () => {
          const envelope = sealEnvelope({
            dataKey: newDataKey(),
            envelopeId: newEnvelopeId(),
            quorum: 1,
            configuredBackends: 1,
            copies: [{ backendName: 'azure', keyVersion: randomBytes(16).toString('hex'), wrapped: encodeSignedCopy(randomBytes(512), randomBytes(512)), location: 'inline' }],
            plaintext: randomBytes(32),
          });
          return tryDecrypt(plugin, envelope);
        }),
      );
      for (const o of outcomes) codes.set(o.ok ? 'OK' : o.code, (codes.get(o.ok ? 'OK' : o.code) ?? 0) + 1);
    }
    t.log(`outcomes ${JSON.stringify([...codes])}, ${requests.length} vault requests`);
    t.deepEqual([...codes.keys()], ['BACKEND_REJECTED'], 'each a rejected copy: never accepted, never an outage or a timeout');
    const azure = plugin.describe().backends.find((b) => b.name === 'azure')!;
    t.is(azure.breaker, 'closed', 'rejected copies never count against the breaker');
    t.true(requests.length <= 10, `${requests.length} vault requests for 300 forged envelopes`);
    // And the genuine envelope still decrypts.
    const back = await tryDecrypt(plugin, genuine.ciphertext, genuine.annotations);
    t.true(back.ok);
  });

  test('azure (lowkey-vault): a version rotated in by another instance is found through the listing', async (t) => {
    const admin = new KeyClient(env.AZURE_KV_URL!, new ManagedIdentityCredential(), {
      disableChallengeResourceVerification: true,
      agent: new Agent({ ca: readFileSync(caFile) }),
    });
    const name = `lst-${randomBytes(4).toString('hex')}`;
    await admin.createKey(name, 'RSA', { keySize: 2048, keyOps: [...KEY_OPS] });
    const reader = make(env.AZURE_KV_URL!, name, recorder().policy);
    t.teardown(() => reader.close());
    await reader.currentKeyVersion(signal()); // knows v1 only, for the next 5 minutes
    await admin.rotateKey(name);
    const writer = make(env.AZURE_KV_URL!, name, recorder().policy);
    t.teardown(() => writer.close());
    const dataKey = randomBytes(32);
    const context = { envelopeId: randomBytes(16), backendName: 'azure' };
    const copy = await writer.wrap(dataKey, context, signal());
    t.not(copy.keyVersion, await reader.currentKeyVersion(signal()));
    t.true(Buffer.from(await reader.unwrap(copy.wrapped, copy.keyVersion, context, signal())).equals(dataKey));
  });

  test('azure (lowkey-vault): after the key is deleted and created again, the next wrap uses the new version', async (t) => {
    const vaultUrl = requireVar(env, 'AZURE_KV_PURGEABLE_URL', 'lowkey-vault');
    const admin = new KeyClient(vaultUrl, new ManagedIdentityCredential(), {
      disableChallengeResourceVerification: true,
      agent: new Agent({ ca: readFileSync(caFile) }),
    });
    const name = `rec-${randomBytes(4).toString('hex')}`;
    const first = await admin.createKey(name, 'RSA', { keySize: 2048, keyOps: [...KEY_OPS] });
    const { requests, policy } = recorder();
    const backend = make(vaultUrl, name, policy);
    t.teardown(() => backend.close());
    const context = { envelopeId: randomBytes(16), backendName: 'azure' };
    t.is((await backend.wrap(randomBytes(32), context, signal())).keyVersion, first.properties.version!);

    // On a purgeable vault lowkey-vault deletes at once, then answers 404 for the deleted key.
    await admin.beginDeleteKey(name).catch(() => undefined);
    t.is(await admin.getKey(name).then(() => 200, (e: { statusCode?: number }) => e.statusCode), 404, 'the key is gone');
    const second = await admin.createKey(name, 'RSA', { keySize: 2048, keyOps: [...KEY_OPS] });
    t.not(second.properties.version, first.properties.version);

    // Within the 5-minute refresh interval: the vanished version must not be used again.
    const dataKey = randomBytes(32);
    const copy = await backend.wrap(dataKey, context, signal());
    t.is(copy.keyVersion, second.properties.version!);
    t.is(await backend.currentKeyVersion(signal()), second.properties.version!);
    t.true(Buffer.from(await backend.unwrap(copy.wrapped, copy.keyVersion, context, signal())).equals(dataKey));
    t.log(`requests: ${requests.join(', ')}`);
  });
}
