/**
 * An Azure copy minted with the public key alone is refused (issue 11).
 *
 * The attacker is an etcd writer who can read the Azure key's public JWK (any
 * principal with keys/read can). They pick a data key, wrap it with RSA-OAEP-256
 * locally, seal an envelope around a plaintext of their choice and plant it. Before
 * copies were signed, such an envelope decrypted through v2 and v1. Here a real
 * plugin, with the real Azure backend against lowkey-vault, serves the KMS socket, and
 * the forged envelopes go through v2 Decrypt (the copy in an annotation) and v1
 * Decrypt (inline): every one must be refused, and none may cost an unwrapKey call.
 */
import { constants, generateKeyPairSync, publicEncrypt, randomBytes, sign } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import test from 'ava';
import type { PipelinePolicy } from '@azure/core-rest-pipeline';
import { AzureKeyVaultBackend, azureConfigSchema } from '../../src/backends/azure.ts';
import { encodeSignedCopy, rsaPublicKeyFromJwk, signedMessage } from '../../src/backends/azure-copy.ts';
import { call, clientsFor } from '../../src/cli/client.ts';
import { parseConfig } from '../../src/config/load.ts';
import { newDataKey, newEnvelopeId, sealEnvelope } from '../../src/envelope/crypto.ts';
import { annotationKeyFor } from '../../src/envelope/format.ts';
import { KmsServer } from '../../src/kms/server.ts';
import type * as T from '../../src/kms/types.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { Metrics } from '../../src/observability/metrics.ts';
import { Plugin } from '../../src/plugin.ts';
import { requireServer } from '../helpers/servers.ts';

const server = requireServer('lowkey-vault');

if ('missing' in server) {
  test.skip(`azure forged copies: ${server.missing}`, () => {});
} else {
  const env = server.env;
  process.env.IDENTITY_ENDPOINT = env.AZURE_KV_IDENTITY_ENDPOINT;
  process.env.IDENTITY_HEADER = 'trousseau-test';

  test('azure (lowkey-vault): an envelope minted with the public JWK alone is refused through v2 and v1', async (t) => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'trs-'));
    t.teardown(() => rm(dir, { recursive: true, force: true }));
    const operations: string[] = [];
    const recorder: PipelinePolicy = {
      name: 'trousseauRecordOperations',
      sendRequest: (request, next) => {
        operations.push(`${request.method} ${new URL(request.url).pathname}`);
        return next(request);
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
      { baseDir: dir, additionalPolicies: [{ policy: recorder, position: 'perRetry' }] },
    );
    const socketPath = path.join(dir, 'kms.sock');
    const config = parseConfig({
      socket: { path: socketPath },
      quorum: 1,
      backends: [{ name: 'azure', type: 'local', keyFile: 'injected', timeoutMs: 2900 }],
      health: { probeIntervalMs: 3_600_000 },
    });
    const metrics = new Metrics();
    const plugin = new Plugin({ config, baseDir: dir, logger: silentLogger(), metrics, backends: [backend] });
    const kms = new KmsServer(plugin, { path: socketPath, mode: config.socket.mode, group: config.socket.group }, metrics, silentLogger());
    await plugin.start();
    await kms.start();
    const clients = clientsFor(socketPath);
    t.teardown(async () => {
      clients.close();
      await kms.stop(1000);
      await plugin.close();
    });

    // A genuine envelope first: the plugin works, through both APIs.
    const secret = randomBytes(32);
    const genuine = await call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext: secret, uid: 'u' });
    const back = await call<T.V2DecryptRequest, T.V2DecryptResponse>(clients.v2, 'Decrypt', {
      ciphertext: genuine.ciphertext,
      uid: 'u',
      key_id: genuine.key_id,
      annotations: genuine.annotations,
    });
    t.true(Buffer.from(back.plaintext).equals(secret), 'genuine v2 envelope decrypts');
    const genuineV1 = await call<T.V1EncryptRequest, T.V1EncryptResponse>(clients.v1, 'Encrypt', { version: 'v1beta1', plain: secret });
    const backV1 = await call<T.V1DecryptRequest, T.V1DecryptResponse>(clients.v1, 'Decrypt', { version: 'v1beta1', cipher: genuineV1.cipher });
    t.true(Buffer.from(backV1.plain).equals(secret), 'genuine v1 envelope decrypts');

    // The attacker's material: the current version and its public JWK, as keys/read gives them.
    const version = await backend.currentKeyVersion(AbortSignal.timeout(5000));
    const jwk = await fetchPublicJwk(env, version);
    const publicKey = rsaPublicKeyFromJwk(jwk);
    const keyId = `${env.AZURE_KV_URL!.replace(/\/+$/, '')}/keys/${env.AZURE_KV_KEY_NAME}`;
    const { privateKey: attackerKey } = generateKeyPairSync('rsa', { modulusLength: 4096 });

    const planted = Buffer.from('attacker-chosen plaintext 32 byt');
    const mint = (shape: 'raw' | 'signed-by-attacker' | 'garbage-signature') => {
      const dataKey = newDataKey();
      const envelopeId = newEnvelopeId();
      const rsa = publicEncrypt({ key: publicKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, dataKey);
      const binding = { context: { envelopeId, backendName: 'azure' }, keyId, keyVersion: version };
      const wrapped =
        shape === 'raw'
          ? rsa
          : encodeSignedCopy(
              rsa,
              shape === 'garbage-signature'
                ? randomBytes(rsa.length)
                : sign('sha256', signedMessage(binding, rsa), { key: attackerKey, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 }),
            );
      const seal = (location: 'inline' | 'annotation') =>
        sealEnvelope({
          dataKey,
          envelopeId,
          quorum: 1,
          configuredBackends: 1,
          copies: [{ backendName: 'azure', keyVersion: version, wrapped, location }],
          plaintext: planted,
        });
      return { v2: seal('annotation'), v1: seal('inline'), wrapped };
    };

    for (const shape of ['raw', 'signed-by-attacker', 'garbage-signature'] as const) {
      const forged = mint(shape);
      operations.length = 0;
      const v2 = await call<T.V2DecryptRequest, T.V2DecryptResponse>(clients.v2, 'Decrypt', {
        ciphertext: forged.v2,
        uid: 'u',
        key_id: genuine.key_id,
        annotations: { [annotationKeyFor('azure')]: forged.wrapped },
      }).then(
        (r) => r.plaintext,
        (e: unknown) => e,
      );
      t.false(Buffer.isBuffer(v2) && v2.equals(planted), `${shape}: v2 Decrypt returned the attacker's plaintext`);
      t.true(v2 instanceof Error, `${shape}: v2 Decrypt must fail`);
      const v1 = await call<T.V1DecryptRequest, T.V1DecryptResponse>(clients.v1, 'Decrypt', { version: 'v1beta1', cipher: forged.v1 }).then(
        (r) => r.plain,
        (e: unknown) => e,
      );
      t.false(Buffer.isBuffer(v1) && v1.equals(planted), `${shape}: v1 Decrypt returned the attacker's plaintext`);
      t.true(v1 instanceof Error, `${shape}: v1 Decrypt must fail`);
      t.deepEqual(
        operations.filter((o) => /unwrapkey$/i.test(o)),
        [],
        `${shape}: a forged copy must be refused before any unwrapKey call`,
      );
    }
  });
}

async function fetchPublicJwk(env: Record<string, string>, version: string): Promise<{ kty: string; n: Uint8Array; e: Uint8Array }> {
  const { ManagedIdentityCredential } = await import('@azure/identity');
  const { KeyClient } = await import('@azure/keyvault-keys');
  const { Agent } = await import('node:https');
  const { readFileSync } = await import('node:fs');
  const reader = new KeyClient(env.AZURE_KV_URL!, new ManagedIdentityCredential(), {
    disableChallengeResourceVerification: true,
    agent: new Agent({ ca: readFileSync(env.AZURE_KV_CA_FILE!) }),
  });
  const key = await reader.getKey(env.AZURE_KV_KEY_NAME!, { version });
  return key.key as { kty: string; n: Uint8Array; e: Uint8Array };
}
