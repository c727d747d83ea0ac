/**
 * The least-privilege policy files against what the backends really send.
 *
 * Every AWS KMS and Azure Key Vault operation the backends send during a
 * representative run (key version, wrap, unwrap, refused calls) is recorded on the
 * way to the real test server, and the test checks both directions: each recorded
 * operation is allowed by policies/aws/*.json or policies/azure/*.json, and each
 * permission those files grant was used. (The vault policy is proven by
 * test/backends/vault.test.ts, which logs in only with tokens bound to it.)
 *
 * AWS: a recording HTTP proxy in front of local-kms reads X-Amz-Target and the
 * encryption context of each request. Azure: a pipeline policy on the backend's SDK
 * clients (AzureBackendOptions.additionalPolicies) records method and path, since
 * the server speaks TLS.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync, readdirSync } from 'node:fs';
import { createServer, request as httpRequest } from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import test from 'ava';
import { CreateKeyCommand, DisableKeyCommand, KMSClient } from '@aws-sdk/client-kms';
import type { CryptographyClientOptions } from '@azure/keyvault-keys';
import { AwsKmsBackend, awsConfigSchema, loadAwsSdk } from '../../src/backends/aws.ts';
import { AzureKeyVaultBackend, azureConfigSchema } from '../../src/backends/azure.ts';
import type { KeyBackend, WrapContext } from '../../src/backends/backend.ts';
import { errorCodeOf } from '../../src/errors.ts';
import { requireServer } from '../helpers/servers.ts';

// Built directly below, not through the backend's definition, which loads the SDK itself.
await loadAwsSdk();

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const signal = (): AbortSignal => AbortSignal.timeout(10_000);
const contextFor = (backend: KeyBackend): WrapContext => ({ envelopeId: randomBytes(16), backendName: backend.name });

async function using<T>(backend: KeyBackend, body: (b: KeyBackend) => Promise<T>): Promise<T> {
  try {
    return await body(backend);
  } finally {
    await backend.close();
  }
}

/** @azure/core-rest-pipeline's PipelinePolicy, named through the SDK the project depends on. */
type PipelinePolicy = NonNullable<CryptographyClientOptions['additionalPolicies']>[number]['policy'];

const sorted = (values: Iterable<string>): string[] => [...new Set(values)].sort();

// ---------------------------------------------------------------- AWS

interface AwsStatement {
  Sid?: string;
  Effect: string;
  Principal?: { AWS: string | string[] };
  Action: string | string[];
  Resource: string | string[];
  Condition?: Record<string, Record<string, unknown>>;
}

const PLUGIN_PRINCIPAL = /:role\/TROUSSEAU_ROLE$/;
const list = (value: string | string[] | undefined): string[] => (value === undefined ? [] : Array.isArray(value) ? value : [value]);

/** The plugin's statements in each policies/aws file: all of an IAM policy, the TROUSSEAU_ROLE ones of a key policy. */
function awsPluginStatements(): { file: string; statements: AwsStatement[] }[] {
  const dir = path.join(root, 'policies/aws');
  return readdirSync(dir)
    .filter((f) => f.endsWith('.json'))
    .map((file) => {
      const doc = JSON.parse(readFileSync(path.join(dir, file), 'utf8')) as { Statement: AwsStatement[] };
      const isKeyPolicy = doc.Statement.some((s) => s.Principal !== undefined);
      return {
        file,
        statements: isKeyPolicy ? doc.Statement.filter((s) => list(s.Principal?.AWS).some((p) => PLUGIN_PRINCIPAL.test(p))) : doc.Statement,
      };
    });
}

interface AwsCall {
  action: string;
  contextKeys: string[] | undefined;
}

/** An HTTP proxy to local-kms that records each request's action and encryption context keys. */
async function recordingKmsProxy(upstream: string): Promise<{ endpoint: string; calls: AwsCall[]; close: () => Promise<void> }> {
  const target = new URL(upstream);
  const calls: AwsCall[] = [];
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const header = req.headers['x-amz-target'];
      const action = typeof header === 'string' ? header.replace(/^TrentService\./, 'kms:') : '(no X-Amz-Target)';
      let contextKeys: string[] | undefined;
      try {
        const parsed = JSON.parse(body.toString('utf8')) as { EncryptionContext?: Record<string, string> };
        contextKeys = parsed.EncryptionContext ? Object.keys(parsed.EncryptionContext) : undefined;
      } catch {
        contextKeys = undefined;
      }
      calls.push({ action, contextKeys });
      const forward = httpRequest(
        { host: target.hostname, port: target.port, method: req.method, path: req.url, headers: req.headers },
        (answer) => {
          res.writeHead(answer.statusCode ?? 502, answer.headers);
          answer.pipe(res);
        },
      );
      forward.on('error', () => res.destroy());
      forward.end(body);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    endpoint: `http://127.0.0.1:${port}`,
    calls,
    close: () => new Promise<void>((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve());
    }),
  };
}

test('aws: the IAM and key policies give the plugin role exactly the three actions on one key', (t) => {
  const files = awsPluginStatements();
  t.deepEqual(sorted(files.map((f) => f.file)), ['trousseau-key-policy.json', 'trousseau-kms-policy.json']);
  for (const { file, statements } of files) {
    t.deepEqual(sorted(statements.flatMap((s) => list(s.Action))), ['kms:Decrypt', 'kms:DescribeKey', 'kms:Encrypt'], file);
    for (const s of statements) {
      t.is(s.Effect, 'Allow', file);
      if (file === 'trousseau-key-policy.json') t.deepEqual(list(s.Resource), ['*'], `${file}: in a key policy "*" is the key itself`);
    }
  }
  // The administrators' statement stays, but never names the plugin's role nor lets anyone use the key.
  const keyPolicy = JSON.parse(readFileSync(path.join(root, 'policies/aws/trousseau-key-policy.json'), 'utf8')) as { Statement: AwsStatement[] };
  const admins = keyPolicy.Statement.filter((s) => !list(s.Principal?.AWS).some((p) => PLUGIN_PRINCIPAL.test(p)));
  t.true(admins.length >= 1);
  for (const s of admins) {
    t.false(list(s.Action).some((a) => /^kms:(\*|Encrypt|Decrypt|ReEncrypt|GenerateDataKey)/.test(a)), `${s.Sid ?? 'admin statement'} must not use the key`);
  }
});

const kmsServer = requireServer('local-kms');
if ('missing' in kmsServer) {
  test.skip(`aws policies: ${kmsServer.missing}`, () => {});
} else {
  const env = kmsServer.env;
  process.env.AWS_ACCESS_KEY_ID = env.LOCAL_KMS_ACCESS_KEY_ID ?? 'test';
  process.env.AWS_SECRET_ACCESS_KEY = env.LOCAL_KMS_SECRET_ACCESS_KEY ?? 'test';
  delete process.env.AWS_SESSION_TOKEN;
  delete process.env.AWS_PROFILE;
  process.env.AWS_EC2_METADATA_DISABLED = 'true';

  test('aws: every KMS call of the backend is allowed by policies/aws, and every allowed action is used', async (t) => {
    const proxy = await recordingKmsProxy(env.LOCAL_KMS_ENDPOINT!);
    t.teardown(proxy.close);
    const make = (keyId: string) =>
      new AwsKmsBackend(awsConfigSchema.parse({ name: 'aws', type: 'aws', keyId, region: env.LOCAL_KMS_REGION, endpoint: proxy.endpoint, timeoutMs: 2900 }));

    // Through an alias: DescribeKey, then wrap and unwrap, and a refused unwrap (wrong context).
    await using(make(env.LOCAL_KMS_ALIAS_ARN!), async (backend) => {
      const keyVersion = await backend.currentKeyVersion(signal());
      const context = contextFor(backend);
      const dataKey = randomBytes(32);
      const { wrapped } = await backend.wrap(dataKey, context, signal());
      t.deepEqual(Buffer.from(await backend.unwrap(wrapped, keyVersion, context, signal())), dataKey);
      const refused = await backend.unwrap(wrapped, keyVersion, contextFor(backend), signal()).catch((e: unknown) => e);
      t.is(errorCodeOf(refused), 'BACKEND_REJECTED');
    });
    // A disabled key, by ARN: the refused Encrypt is a call the role must still be allowed to make.
    const admin = new KMSClient({ region: env.LOCAL_KMS_REGION, endpoint: env.LOCAL_KMS_ENDPOINT, credentials: { accessKeyId: 'test', secretAccessKey: 'test' } });
    t.teardown(() => admin.destroy());
    const created = await admin.send(new CreateKeyCommand({ Description: 'trousseau policies test (disabled)' }));
    await admin.send(new DisableKeyCommand({ KeyId: created.KeyMetadata!.KeyId! }));
    await using(make(created.KeyMetadata!.Arn!), async (backend) => {
      const refused = await backend.wrap(randomBytes(32), contextFor(backend), signal()).catch((e: unknown) => e);
      t.is(errorCodeOf(refused), 'BACKEND_REJECTED');
      t.is(errorCodeOf(await backend.currentKeyVersion(signal()).catch((e: unknown) => e)), 'BACKEND_REJECTED');
    });

    const recorded = sorted(proxy.calls.map((c) => c.action));
    t.log(`recorded: ${recorded.join(', ')} (${proxy.calls.length} requests)`);
    for (const { file, statements } of awsPluginStatements()) {
      const allowed = sorted(statements.flatMap((s) => list(s.Action)));
      t.deepEqual(recorded.filter((a) => !allowed.includes(a)), [], `${file} must allow every call the backend makes`);
      t.deepEqual(allowed.filter((a) => !recorded.includes(a)), [], `${file} must allow nothing the backend never calls`);
      // Each request meets the condition of the statement that allows its action.
      for (const call of proxy.calls) {
        for (const s of statements.filter((st) => list(st.Action).includes(call.action))) {
          const keys = s.Condition?.['ForAllValues:StringEquals']?.['kms:EncryptionContextKeys'] as string[] | undefined;
          if (keys === undefined) continue;
          t.true(call.contextKeys !== undefined && call.contextKeys.length > 0, `${file}: ${call.action} without encryption context would be denied`);
          t.deepEqual(call.contextKeys?.filter((k) => !keys.includes(k)), [], `${file}: ${call.action} sends context keys outside the condition`);
          t.is(s.Condition?.Null?.['kms:EncryptionContextKeys'], 'false', file);
        }
      }
    }
  });
}

// ---------------------------------------------------------------- Azure

const ROLE_FILE = path.join(root, 'policies/azure/trousseau-key-wrap.role.json');
const ACCESS_POLICY_FILE = path.join(root, 'policies/azure/trousseau-key-wrap.access-policy.json');
/** Key Vault access-policy key permissions and the RBAC data actions they correspond to. */
const PERMISSION_TO_DATA_ACTION: Record<string, string> = {
  get: 'Microsoft.KeyVault/vaults/keys/read',
  wrapKey: 'Microsoft.KeyVault/vaults/keys/wrap/action',
  unwrapKey: 'Microsoft.KeyVault/vaults/keys/unwrap/action',
  // Each copy is signed at Encrypt (docs/envelope.md); the signature is verified locally.
  sign: 'Microsoft.KeyVault/vaults/keys/sign/action',
};

/** The data action a Key Vault keys request needs (REST API: Get Key, Get Key Versions, Wrap Key, Unwrap Key, Sign). */
function dataActionOf(method: string, pathname: string): string {
  if (method === 'GET' && /^\/keys\/[0-9A-Za-z-]+(\/[0-9A-Za-z]+)?\/?$/.test(pathname)) return PERMISSION_TO_DATA_ACTION.get!;
  if (method === 'GET' && /^\/keys\/[0-9A-Za-z-]+\/versions\/?$/.test(pathname)) return PERMISSION_TO_DATA_ACTION.get!;
  if (method === 'POST' && /^\/keys\/[0-9A-Za-z-]+\/[0-9A-Za-z]+\/sign$/i.test(pathname)) return PERMISSION_TO_DATA_ACTION.sign!;
  if (method === 'POST' && /^\/keys\/[0-9A-Za-z-]+\/[0-9A-Za-z]+\/wrapkey$/i.test(pathname)) return PERMISSION_TO_DATA_ACTION.wrapKey!;
  if (method === 'POST' && /^\/keys\/[0-9A-Za-z-]+\/[0-9A-Za-z]+\/unwrapkey$/i.test(pathname)) return PERMISSION_TO_DATA_ACTION.unwrapKey!;
  return `(unmapped: ${method} ${pathname})`;
}

test('azure: the role and the access policy grant the same four key permissions and nothing else', (t) => {
  const role = JSON.parse(readFileSync(ROLE_FILE, 'utf8')) as { Actions: string[]; NotActions: string[]; DataActions: string[]; AssignableScopes: string[] };
  t.deepEqual(role.Actions, []);
  t.deepEqual(sorted(role.DataActions), sorted(Object.values(PERMISSION_TO_DATA_ACTION)));
  for (const scope of role.AssignableScopes) t.regex(scope, /\/vaults\/[^/]+\/keys\/[^/*]+$/, 'assignable at one key only');
  const access = JSON.parse(readFileSync(ACCESS_POLICY_FILE, 'utf8')) as {
    properties: { accessPolicies: { permissions: Record<string, string[]> }[] };
  };
  for (const entry of access.properties.accessPolicies) {
    t.deepEqual(sorted(entry.permissions.keys ?? []), sorted(Object.keys(PERMISSION_TO_DATA_ACTION)));
    for (const [kind, permissions] of Object.entries(entry.permissions)) if (kind !== 'keys') t.deepEqual(permissions, [], kind);
  }
});

const kvServer = requireServer('lowkey-vault');
if ('missing' in kvServer) {
  test.skip(`azure policies: ${kvServer.missing}`, () => {});
} else {
  const env = kvServer.env;
  const label = `azure (${env.AZURE_KV_SERVER ?? 'unknown server'})`;
  process.env.IDENTITY_ENDPOINT = env.AZURE_KV_IDENTITY_ENDPOINT;
  process.env.IDENTITY_HEADER = 'trousseau-test';

  test(`${label}: every Key Vault call of the backend is allowed by policies/azure, and every permission is used`, async (t) => {
    const requests: string[] = [];
    const recorder: PipelinePolicy = {
      name: 'trousseauRecordOperations',
      sendRequest: (request, next) => {
        requests.push(dataActionOf(request.method, new URL(request.url).pathname));
        return next(request);
      },
    };
    const make = (overrides: Record<string, unknown> = {}) =>
      new AzureKeyVaultBackend(
        azureConfigSchema.parse({
          name: 'azure',
          type: 'azure',
          vaultUrl: env.AZURE_KV_URL,
          keyName: env.AZURE_KV_KEY_NAME,
          caFile: env.AZURE_KV_CA_FILE,
          disableChallengeResourceVerification: true,
          credential: { method: 'managedIdentity' },
          timeoutMs: 2900,
          ...overrides,
        }),
        { baseDir: root, additionalPolicies: [{ policy: recorder, position: 'perRetry' }] },
      );

    let version = '';
    await using(make(), async (backend) => {
      version = await backend.currentKeyVersion(signal());
      const context = contextFor(backend);
      const dataKey = randomBytes(32);
      const { wrapped, keyVersion } = await backend.wrap(dataKey, context, signal());
      t.deepEqual(Buffer.from(await backend.unwrap(wrapped, keyVersion, context, signal())), dataKey);
      const refused = await backend.unwrap(randomBytes(wrapped.length), keyVersion, context, signal()).catch((e: unknown) => e);
      t.is(errorCodeOf(refused), 'BACKEND_REJECTED');
      // A version this instance has not seen: the backend lists the key's versions.
      const unknown = await backend.unwrap(wrapped, 'f'.repeat(32), context, signal()).catch((e: unknown) => e);
      t.is(errorCodeOf(unknown), 'BACKEND_REJECTED');
    });
    // A pinned version: the clients start cold, as after a restart.
    await using(make({ keyVersion: version }), async (backend) => {
      const context = contextFor(backend);
      const { wrapped } = await backend.wrap(randomBytes(32), context, signal());
      t.is((await backend.unwrap(wrapped, version, context, signal())).length, 32);
    });

    const recorded = sorted(requests);
    t.log(`recorded: ${recorded.join(', ')} (${requests.length} requests)`);
    const role = JSON.parse(readFileSync(ROLE_FILE, 'utf8')) as { DataActions: string[] };
    const access = JSON.parse(readFileSync(ACCESS_POLICY_FILE, 'utf8')) as { properties: { accessPolicies: { permissions: { keys: string[] } }[] } };
    const grants: [string, string[]][] = [
      ['role definition', sorted(role.DataActions)],
      ...access.properties.accessPolicies.map((p, i): [string, string[]] => [`access policy ${i}`, sorted(p.permissions.keys.map((k) => PERMISSION_TO_DATA_ACTION[k] ?? `(unknown permission ${k})`))]),
    ];
    for (const [what, allowed] of grants) {
      t.deepEqual(recorded.filter((a) => !allowed.includes(a)), [], `${what} must allow every call the backend makes`);
      t.deepEqual(allowed.filter((a) => !recorded.includes(a)), [], `${what} must allow nothing the backend never calls`);
    }
  });
}
