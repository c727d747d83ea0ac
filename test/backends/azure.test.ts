/**
 * Azure Key Vault backend against lowkey-vault, the open-source Key Vault emulator that
 * test/servers/lowkey-vault.server.sh starts (the env file's AZURE_KV_SERVER names it;
 * every title carries it).
 *
 * Authentication is the production managedIdentity method: IDENTITY_ENDPOINT points
 * the real ManagedIdentityCredential at the server's token port (App Service style),
 * so no test-only credential is involved.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Agent } from 'node:https';
import test from 'ava';
import { ManagedIdentityCredential } from '@azure/identity';
import { KeyClient } from '@azure/keyvault-keys';
import { AzureKeyVaultBackend, azureConfigSchema } from '../../src/backends/azure.ts';
import { parseAzureCopy } from '../../src/backends/azure-copy.ts';
import type { KeyBackend, WrapContext } from '../../src/backends/backend.ts';
import { errorCodeOf } from '../../src/errors.ts';
import { httpsPoolNamesDuring } from '../helpers/https-pool-names.ts';
import { requireServer } from '../helpers/servers.ts';
import { runBackendConformance } from './conformance.ts';

const server = requireServer('lowkey-vault');

if ('missing' in server) {
  test.skip(`azure: ${server.missing}`, () => {});
} else {
  const env = server.env;
  const vaultUrl = env.AZURE_KV_URL!;
  const caFile = env.AZURE_KV_CA_FILE!;
  const label = `azure (${env.AZURE_KV_SERVER ?? 'unknown server'})`;
  process.env.IDENTITY_ENDPOINT = env.AZURE_KV_IDENTITY_ENDPOINT;
  process.env.IDENTITY_HEADER = 'trousseau-test';

  const signal = () => AbortSignal.timeout(10_000);
  const context = (backend: KeyBackend): WrapContext => ({ envelopeId: randomBytes(16), backendName: backend.name });
  const adminAgent = new Agent({ ca: readFileSync(caFile) });
  const admin = new KeyClient(vaultUrl, new ManagedIdentityCredential(), { disableChallengeResourceVerification: true, agent: adminAgent });

  const make = (overrides: Record<string, unknown> = {}) =>
    new AzureKeyVaultBackend(
      azureConfigSchema.parse({
        name: 'azure-test',
        type: 'azure',
        vaultUrl,
        keyName: env.AZURE_KV_KEY_NAME,
        caFile,
        disableChallengeResourceVerification: true,
        credential: { method: 'managedIdentity' },
        timeoutMs: 2900,
        ...overrides,
      }),
      { baseDir: process.cwd() },
    );

  async function freshKey(prefix: string, keySize = 3072, keyType: 'RSA' | 'RSA-HSM' = 'RSA'): Promise<{ name: string; version: string }> {
    const name = `${prefix}-${randomBytes(4).toString('hex')}`;
    const create = () => admin.createKey(name, keyType, { keySize, keyOps: ['wrapKey', 'unwrapKey', 'encrypt', 'decrypt', 'sign', 'verify'] });
    // Test set-up, not the backend under test: under CI load lowkey-vault once answered
    // the SDK's create request 400 "Required request body is missing" (its log) after
    // the challenge round trip; the same request made again is fine. One retry, only then.
    const key = await create().catch((error: { statusCode?: number; code?: string }) => {
      if (error.statusCode === 400 && error.code === undefined) return create();
      throw error;
    });
    return { name, version: key.properties.version! };
  }

  // The token the server hands out must never show up in an error message.
  const token = await fetch(`${env.AZURE_KV_IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=https://vault.azure.net`)
    .then(async (r) => ((await r.json()) as { access_token?: string }).access_token ?? '')
    .catch(() => '');

  runBackendConformance(test, {
    label,
    create: () => make(),
    createUnreachable: () => make({ vaultUrl: env.AZURE_KV_UNREACHABLE_URL }),
    secrets: [token],
    // RSA-OAEP has no associated data, but each copy's signature names its envelope and backend.
    bindsContext: true,
  });

  test(`${label}: an RSA-4096 copy is the 512-byte wrapped key and its 512-byte signature`, async (t) => {
    const backend = make();
    try {
      const { wrapped } = await backend.wrap(randomBytes(32), context(backend), signal());
      t.is(wrapped.length, 8 + 512 + 512);
      t.deepEqual([...wrapped.subarray(0, 4)], [0x41, 0x5a, 1, 1], 'magic "AZ", layout 1, PS256');
    } finally {
      await backend.close();
    }
  });

  test(`${label}: rotation is followed by "latest", old copies still unwrap, a pinned version stays`, async (t) => {
    const { name, version: v1 } = await freshKey('rot');
    const latest = make({ keyName: name, keyRefreshIntervalMs: 1000 });
    // Key generation on a loaded machine can outlast a short interval: this one cannot.
    const sticky = make({ keyName: name, keyRefreshIntervalMs: 600_000 });
    const pinned = make({ keyName: name, keyVersion: v1 });
    try {
      t.is(await latest.currentKeyVersion(signal()), v1);
      const oldKey = randomBytes(32);
      const ctx = context(latest);
      const before = await latest.wrap(oldKey, ctx, signal());
      t.is(before.keyVersion, v1);
      t.is(await sticky.currentKeyVersion(signal()), v1);

      const rotated = await admin.rotateKey(name);
      const v2 = rotated.properties.version!;
      t.not(v2, v1);
      // Within the refresh interval the resolved version is kept.
      t.is(await sticky.currentKeyVersion(signal()), v1);
      await new Promise((resolve) => setTimeout(resolve, 1100));
      t.is(await latest.currentKeyVersion(signal()), v2);

      const newKey = randomBytes(32);
      const after = await latest.wrap(newKey, ctx, signal());
      t.is(after.keyVersion, v2);
      t.true(Buffer.from(await latest.unwrap(after.wrapped, v2, ctx, signal())).equals(newKey));
      t.true(Buffer.from(await latest.unwrap(before.wrapped, v1, ctx, signal())).equals(oldKey));

      // A copy unwrapped with the wrong version's key is refused, not mis-decrypted.
      const wrong = await t.throwsAsync(latest.unwrap(before.wrapped, v2, ctx, signal()));
      t.is(errorCodeOf(wrong), 'BACKEND_REJECTED');

      t.is(await pinned.currentKeyVersion(signal()), v1);
      const pinnedWrap = await pinned.wrap(newKey, ctx, signal());
      t.is(pinnedWrap.keyVersion, v1);
      t.true(Buffer.from(await latest.unwrap(pinnedWrap.wrapped, v1, ctx, signal())).equals(newKey));
    } finally {
      await latest.close();
      await sticky.close();
      await pinned.close();
    }
  });

  test(`${label}: an unsigned copy (written before signing) is refused by default, accepted with acceptUnsignedCopies`, async (t) => {
    const strict = make();
    const migrating = make({ acceptUnsignedCopies: true });
    try {
      const dataKey = randomBytes(32);
      const ctx = context(strict);
      const copy = await strict.wrap(dataKey, ctx, signal());
      const parsed = parseAzureCopy(copy.wrapped);
      if (parsed.layout !== 1) throw new Error('wrap must make a signed copy');
      const unsigned = Buffer.from(parsed.wrapped); // exactly what the backend stored before signing
      const refused = await t.throwsAsync(strict.unwrap(unsigned, copy.keyVersion, ctx, signal()));
      t.is(errorCodeOf(refused), 'BACKEND_REJECTED');
      t.regex(refused.message, /unsigned Azure copy refused/);
      t.true(Buffer.from(await migrating.unwrap(unsigned, copy.keyVersion, ctx, signal())).equals(dataKey));
      // During migration, an unsigned copy the vault cannot decrypt is still a rejection
      // (lowkey-vault answers 500, Azure 400), not an outage, and the SDK does not retry it.
      const started = performance.now();
      const garbage = await t.throwsAsync(migrating.unwrap(randomBytes(512), copy.keyVersion, ctx, signal()));
      t.is(errorCodeOf(garbage), 'BACKEND_REJECTED');
      t.true(performance.now() - started < 2900, 'within the backend timeout: no SDK retry of the 500');
    } finally {
      await strict.close();
      await migrating.close();
    }
  });

  test(`${label}: a disabled key version is a rejection, for wrap and unwrap`, async (t) => {
    const { name, version } = await freshKey('dis');
    const backend = make({ keyName: name });
    try {
      const ctx = context(backend);
      const copy = await backend.wrap(randomBytes(32), ctx, signal());
      await admin.updateKeyProperties(name, version, { enabled: false });
      const wrapError = await t.throwsAsync(backend.wrap(randomBytes(32), ctx, signal()));
      t.is(errorCodeOf(wrapError), 'BACKEND_REJECTED');
      // Azure answers 403; lowkey-vault 500 "is not enabled" (classified the same).
      t.regex(wrapError.message, /HTTP (403|500)/);
      const unwrapError = await t.throwsAsync(backend.unwrap(copy.wrapped, copy.keyVersion, ctx, signal()));
      t.is(errorCodeOf(unwrapError), 'BACKEND_REJECTED');
      // A fresh backend (no cached key) reaches the same verdict.
      const fresh = make({ keyName: name, keyVersion: version });
      const freshError = await t.throwsAsync(fresh.wrap(randomBytes(32), ctx, signal()));
      t.is(errorCodeOf(freshError), 'BACKEND_REJECTED');
      await fresh.close();
    } finally {
      await backend.close();
    }
  });

  test(`${label}: an unknown key or key version is a rejection`, async (t) => {
    const missingKey = make({ keyName: `absent-${randomBytes(4).toString('hex')}` });
    const backend = make();
    try {
      const error = await t.throwsAsync(missingKey.currentKeyVersion(signal()));
      t.is(errorCodeOf(error), 'BACKEND_REJECTED');
      t.regex((error).message, /HTTP 404/);
      const versionError = await t.throwsAsync(backend.unwrap(randomBytes(512), 'f'.repeat(32), context(backend), signal()));
      t.is(errorCodeOf(versionError), 'BACKEND_REJECTED');
      const badVersion = await t.throwsAsync(backend.unwrap(randomBytes(512), '../other-key', context(backend), signal()));
      t.is(errorCodeOf(badVersion), 'BACKEND_REJECTED');
    } finally {
      await missingKey.close();
      await backend.close();
    }
  });

  test(`${label}: TLS is verified: without the CA file the vault is not trusted`, async (t) => {
    const backend = make({ caFile: undefined });
    try {
      const error = await t.throwsAsync(backend.wrap(randomBytes(32), context(backend), signal()));
      t.is(errorCodeOf(error), 'BACKEND_UNAVAILABLE');
    } finally {
      await backend.close();
    }
  });

  test(`${label}: the CA bundle is parsed once: the connection pool is named by address, not by every root certificate`, async (t) => {
    // caFile extends Node's ~145 roots. Given to an agent as `ca`, that bundle (~180,000 characters)
    // was concatenated into the pool's name on every request (test/helpers/https-pool-names.ts).
    // The admin client's own agent is left out.
    const backend = make();
    try {
      const ctx = context(backend);
      const names = await httpsPoolNamesDuring(async () => {
        const copy = await backend.wrap(randomBytes(32), ctx, signal());
        await backend.unwrap(copy.wrapped, copy.keyVersion, ctx, signal());
      }, (agent) => agent === adminAgent);
      t.true(names.length > 0, 'the backend sent through a keep-alive agent');
      for (const name of names) t.true(name.length < 512, `pool name of ${name.length} characters`);
    } finally {
      await backend.close();
    }
  });

  test(`${label}: an RSA-HSM (Managed HSM type) key wraps and unwraps`, async (t) => {
    let key: { name: string; version: string };
    try {
      key = await freshKey('hsm', 3072, 'RSA-HSM');
    } catch (error) {
      t.log(`server refused to create an RSA-HSM key: ${(error as Error).message}`);
      t.fail('RSA-HSM key creation is not supported by this server');
      return;
    }
    const backend = make({ keyName: key.name });
    try {
      const dataKey = randomBytes(32);
      const ctx = context(backend);
      const { wrapped, keyVersion } = await backend.wrap(dataKey, ctx, signal());
      t.is(keyVersion, key.version);
      t.true(Buffer.from(await backend.unwrap(wrapped, keyVersion, ctx, signal())).equals(dataKey));
    } finally {
      await backend.close();
    }
  });
}

test('azure config: only https vaults, no unknown fields, no inline secrets', (t) => {
  const base = { name: 'az', type: 'azure', vaultUrl: 'https://v.vault.azure.net', keyName: 'kek' };
  const parsed = azureConfigSchema.parse(base);
  t.is(parsed.keyVersion, 'latest');
  t.is(parsed.keyRefreshIntervalMs, 300_000);
  t.deepEqual(parsed.credential, { method: 'default' });
  t.false(parsed.disableChallengeResourceVerification);
  t.false(parsed.acceptUnsignedCopies, 'unsigned Azure copies are refused unless a migration says otherwise');
  t.false(azureConfigSchema.safeParse({ ...base, vaultUrl: 'http://v.vault.azure.net' }).success);
  t.false(azureConfigSchema.safeParse({ ...base, insecureSkipVerify: true }).success);
  t.false(azureConfigSchema.safeParse({ ...base, keyVersion: '../x' }).success);
  t.false(
    azureConfigSchema.safeParse({ ...base, credential: { method: 'clientSecret', tenantId: 't', clientId: 'c', clientSecret: 's' } }).success,
  );
  t.true(
    azureConfigSchema.safeParse({ ...base, credential: { method: 'workloadIdentity', tenantId: 't', clientId: 'c', tokenFile: '/var/run/token' } })
      .success,
  );
  t.true(azureConfigSchema.safeParse({ ...base, credential: { method: 'managedIdentity' } }).success);
});
