/**
 * Opt-in tests against a real cloud tenant: `npm run test:live -- azure`.
 *
 * Never part of `npm test` (ava only picks up test/**\/*.test.ts). Each target reads
 * its vault and credentials from the environment and refuses to run without them, so
 * nothing here can pass by accident on a machine without a tenant.
 *
 * azure: TROUSSEAU_LIVE_AZURE_VAULT_URL (https://<vault>.vault.azure.net or a Managed
 *   HSM URL) and TROUSSEAU_LIVE_AZURE_KEY_NAME (an RSA key with wrapKey, unwrapKey and
 *   sign), credentials through DefaultAzureCredential's usual variables (AZURE_TENANT_ID,
 *   AZURE_CLIENT_ID and AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH, or workload
 *   or managed identity). The principal should hold exactly policies/azure's role.
 */
import assert from 'node:assert/strict';
import { constants, publicEncrypt, randomBytes } from 'node:crypto';
import { AzureKeyVaultBackend, azureConfigSchema } from '../../src/backends/azure.ts';
import { encodeSignedCopy, rsaPublicKeyFromJwk } from '../../src/backends/azure-copy.ts';
import { errorCodeOf } from '../../src/errors.ts';

type Check = [string, () => Promise<void>];

async function azureChecks(): Promise<Check[]> {
  const vaultUrl = process.env.TROUSSEAU_LIVE_AZURE_VAULT_URL;
  const keyName = process.env.TROUSSEAU_LIVE_AZURE_KEY_NAME;
  const hasCredential =
    Boolean(process.env.AZURE_CLIENT_ID && (process.env.AZURE_CLIENT_SECRET || process.env.AZURE_CLIENT_CERTIFICATE_PATH || process.env.AZURE_FEDERATED_TOKEN_FILE)) ||
    Boolean(process.env.IDENTITY_ENDPOINT || process.env.MSI_ENDPOINT || process.env.TROUSSEAU_LIVE_AZURE_MANAGED_IDENTITY);
  const missing = [
    !vaultUrl && 'TROUSSEAU_LIVE_AZURE_VAULT_URL',
    !keyName && 'TROUSSEAU_LIVE_AZURE_KEY_NAME',
    !hasCredential && 'Azure credentials (AZURE_TENANT_ID + AZURE_CLIENT_ID + AZURE_CLIENT_SECRET, a client certificate, workload identity, or TROUSSEAU_LIVE_AZURE_MANAGED_IDENTITY=1 on a VM)',
  ].filter((m): m is string => typeof m === 'string');
  if (missing.length > 0) throw new RefusedError(`azure live test needs: ${missing.join('; ')}`);

  const make = () =>
    new AzureKeyVaultBackend(azureConfigSchema.parse({ name: 'azure', type: 'azure', vaultUrl, keyName, credential: { method: 'default' }, timeoutMs: 2900 }), {
      baseDir: process.cwd(),
    });
  const signal = () => AbortSignal.timeout(10_000);
  const context = () => ({ envelopeId: randomBytes(16), backendName: 'azure' });
  const withBackend = async (body: (backend: AzureKeyVaultBackend) => Promise<void>) => {
    const backend = make();
    try {
      await body(backend);
    } finally {
      await backend.close();
    }
  };
  return [
    ['wrap (RSA-OAEP-256) + sign (PS256), then verify locally and unwrap', () =>
      withBackend(async (backend) => {
        const dataKey = randomBytes(32);
        const ctx = context();
        const copy = await backend.wrap(dataKey, ctx, signal());
        assert.ok(Buffer.from(await backend.unwrap(copy.wrapped, copy.keyVersion, ctx, signal())).equals(dataKey));
      })],
    ['a copy moved to another envelope is refused', () =>
      withBackend(async (backend) => {
        const copy = await backend.wrap(randomBytes(32), context(), signal());
        assert.equal(errorCodeOf(await backend.unwrap(copy.wrapped, copy.keyVersion, context(), signal()).catch((e: unknown) => e)), 'BACKEND_REJECTED');
      })],
    ['a copy minted with the public key alone is refused', () =>
      withBackend(async (backend) => {
        const version = await backend.currentKeyVersion(signal());
        const { KeyClient } = await import('@azure/keyvault-keys');
        const { DefaultAzureCredential } = await import('@azure/identity');
        const key = await new KeyClient(vaultUrl!, new DefaultAzureCredential()).getKey(keyName!, { version });
        const rsa = publicEncrypt({ key: rsaPublicKeyFromJwk(key.key ?? {}), padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, randomBytes(32));
        for (const forged of [rsa, encodeSignedCopy(rsa, randomBytes(rsa.length))]) {
          assert.equal(errorCodeOf(await backend.unwrap(forged, version, context(), signal()).catch((e: unknown) => e)), 'BACKEND_REJECTED');
        }
      })],
    ['an invented key version is a rejected copy', () =>
      withBackend(async (backend) => {
        const copy = await backend.wrap(randomBytes(32), context(), signal());
        const error = await backend.unwrap(copy.wrapped, 'f'.repeat(32), context(), signal()).catch((e: unknown) => e);
        assert.equal(errorCodeOf(error), 'BACKEND_REJECTED');
      })],
  ];
}

class RefusedError extends Error {}

const TARGETS: Record<string, () => Promise<Check[]>> = { azure: azureChecks };

const names = process.argv.slice(2);
if (names.length === 0 || names.some((n) => !(n in TARGETS))) {
  console.error(`usage: npm run test:live -- <${Object.keys(TARGETS).join('|')}> (reads the tenant from the environment)`);
  process.exit(2);
}
let failed = 0;
for (const name of names) {
  let checks: Check[];
  try {
    checks = await TARGETS[name]!();
  } catch (error) {
    if (!(error instanceof RefusedError)) throw error;
    console.error(`refusing to run: ${error.message}`);
    process.exit(2);
  }
  for (const [title, check] of checks) {
    const started = performance.now();
    try {
      await check();
      console.log(`ok   ${name}: ${title} (${Math.round(performance.now() - started)} ms)`);
    } catch (error) {
      failed += 1;
      console.log(`FAIL ${name}: ${title}: ${error instanceof Error ? error.message : String(error)}`);
    }
  }
}
process.exit(failed > 0 ? 1 : 0);
