/**
 * Vault transit backend against a real OpenBao dev server (test/servers/openbao.server.sh).
 *
 * The backend logs in only with credentials bound to policies/vault/trousseau.hcl
 * (without the "default" policy), so passing the conformance kit proves that policy is
 * sufficient, and the policy tests below prove it grants nothing more.
 */
import { generateKeyPair, randomBytes, sign } from 'node:crypto';
import { promisify } from 'node:util';
import { mkdtempSync, readFileSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import test, { type ExecutionContext } from 'ava';
import { CountingProxy, vaultOperation } from '../../bench/counting-proxy.ts';
import { FaultProxy } from '../chaos/fault-proxy.ts';
import type { WrapContext } from '../../src/backends/backend.ts';
import { loadVaultSdk, VaultBackend, vaultConfigSchema } from '../../src/backends/vault.ts';
import type { BackendMetrics } from '../../src/backends/definition.ts';
import { errorCodeOf } from '../../src/errors.ts';
import { runBackendConformance } from './conformance.ts';
import { httpsPoolNamesDuring } from '../helpers/https-pool-names.ts';
import { requireServer, requireVar } from '../helpers/servers.ts';

// Built directly below, not through the backend's definition, which loads the SDK itself.
await loadVaultSdk();

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const policyText = readFileSync(path.join(root, 'policies/vault/trousseau.hcl'), 'utf8');

// ---------------------------------------------------------------- config (no server)

test('config: defaults apply and inline secrets are refused', (t) => {
  const parsed = vaultConfigSchema.parse({
    name: 'vault-a',
    type: 'vault',
    address: 'https://vault.example:8200',
    keyName: 'trousseau',
    auth: { method: 'approle', roleId: 'r', secretIdFile: 'secret-id' },
  });
  t.is(parsed.transitMount, 'transit');
  t.is(parsed.keyVersionRefreshMs, 5000);
  t.is(parsed.timeoutMs, 1000);
  t.like(parsed.auth, { method: 'approle', mount: 'approle' });
  const base = { name: 'v', type: 'vault', address: 'http://127.0.0.1:8200', keyName: 'k' };
  for (const auth of [
    { method: 'token', token: 'hvs.inline' },
    { method: 'token', tokenFile: 'f', token: 'hvs.inline' },
    { method: 'approle', roleId: 'r', secretId: 'inline', secretIdFile: 'f' },
    { method: 'approle', roleId: 'r', roleIdFile: 'f', secretIdFile: 'f' },
    { method: 'approle', secretIdFile: 'f' },
    { method: 'jwt', role: 'r', jwt: 'inline', tokenFile: 'f' },
    { method: 'userpass', username: 'u' },
  ]) {
    t.false(vaultConfigSchema.safeParse({ ...base, auth }).success, JSON.stringify(auth));
  }
  t.false(vaultConfigSchema.safeParse({ ...base, auth: { method: 'token', tokenFile: 'f' }, address: 'ftp://x' }).success);
  t.false(vaultConfigSchema.safeParse({ ...base, auth: { method: 'token', tokenFile: 'f' }, transitMount: '/transit/' }).success);
  t.false(vaultConfigSchema.safeParse({ ...base, auth: { method: 'token', tokenFile: 'f' }, tls: { certFile: 'c' } }).success);
  t.false(vaultConfigSchema.safeParse({ ...base, auth: { method: 'token', tokenFile: 'f' }, extra: 1 }).success);
  const k8s = vaultConfigSchema.parse({ ...base, auth: { method: 'kubernetes', role: 'trousseau' } });
  t.like(k8s.auth, { tokenFile: '/var/run/secrets/kubernetes.io/serviceaccount/token', mount: 'kubernetes' });
});

// ---------------------------------------------------------------- real server

const server = requireServer('openbao');
if ('missing' in server) {
  test.skip('vault (OpenBao): real server tests', () => {});
} else {
  const env = server.env;
  const need = (name: string): string => requireVar(env, name, 'openbao');
  const address = need('VAULT_ADDR');
  const rootToken = need('VAULT_ROOT_TOKEN');
  const tokenFile = need('VAULT_TOKEN_FILE');
  const roleIdFile = need('VAULT_APPROLE_ROLE_ID_FILE');
  const secretIdFile = need('VAULT_APPROLE_SECRET_ID_FILE');
  const mount = need('VAULT_TRANSIT_MOUNT');
  const keyName = need('VAULT_KEY_NAME');
  const policyName = need('VAULT_POLICY');
  const unreachable = need('VAULT_UNREACHABLE_ADDR');
  const tlsAddress = need('VAULT_TLS_ADDR');
  const tlsCaFile = need('VAULT_TLS_CA_FILE');
  const tlsTokenFile = need('VAULT_TLS_TOKEN_FILE');
  const restrictedToken = readFileSync(tokenFile, 'utf8').trim();
  const secrets = [rootToken, restrictedToken, readFileSync(secretIdFile, 'utf8').trim(), readFileSync(tlsTokenFile, 'utf8').trim()];
  const work = mkdtempSync(path.join(tmpdir(), 'trousseau-vault-'));
  test.after.always(async () => rm(work, { recursive: true, force: true }));

  const suffix = () => randomBytes(4).toString('hex');
  const signal = () => AbortSignal.timeout(5000);
  const contextFor = (b: VaultBackend): WrapContext => ({ envelopeId: randomBytes(16), backendName: b.name });

  /** The parts of Vault API answers these tests read. */
  interface ApiBody {
    data?: { policies?: string[]; role_id?: string; secret_id?: string; keys?: string[]; meta?: Record<string, string> | null; ttl?: number };
    auth?: { client_token?: string };
  }

  /** One raw API call; returns status and JSON body. */
  async function api(token: string, method: string, apiPath: string, body?: unknown, namespace?: string): Promise<{ status: number; body: ApiBody | undefined }> {
    const response = await fetch(`${address}/v1/${apiPath}`, {
      method,
      headers: { 'X-Vault-Token': token, 'content-type': 'application/json', ...(namespace ? { 'X-Vault-Namespace': namespace } : {}) },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      signal: signal(),
    });
    const text = await response.text();
    return { status: response.status, body: text ? (JSON.parse(text) as ApiBody) : undefined };
  }

  /** An admin call with the root token that must succeed. */
  async function admin(method: string, apiPath: string, body?: unknown, namespace?: string): Promise<ApiBody> {
    const result = await api(rootToken, method, apiPath, body, namespace);
    if (result.status >= 300) throw new Error(`admin ${method} ${apiPath}: HTTP ${result.status} ${JSON.stringify(result.body)}`);
    return result.body ?? {};
  }

  async function restrictedTokenFor(policies: string[], options: Record<string, unknown> = {}): Promise<string> {
    const body = await admin('POST', 'auth/token/create-orphan', { policies, no_default_policy: true, ttl: '10m', ...options });
    const token = body.auth?.client_token;
    if (!token) throw new Error('token create returned no token');
    return token;
  }

  async function writeSecret(name: string, value: string): Promise<string> {
    const file = path.join(work, name);
    await writeFile(file, `${value}\n`, { mode: 0o600 });
    return file;
  }

  /** A new transit key with a copy of the project policy rewritten for it. */
  async function keyWithPolicy(): Promise<{ key: string; policy: string }> {
    const key = `t-${suffix()}`;
    await admin('POST', `${mount}/keys/${key}`, { type: 'aes256-gcm96' });
    const policy = `trousseau-${key}`;
    await admin('PUT', `sys/policies/acl/${policy}`, { policy: policyText.replaceAll(`${mount}/encrypt/${keyName}"`, `${mount}/encrypt/${key}"`).replaceAll(`${mount}/decrypt/${keyName}"`, `${mount}/decrypt/${key}"`).replaceAll(`${mount}/keys/${keyName}"`, `${mount}/keys/${key}"`) });
    return { key, policy };
  }

  function backend(auth: Record<string, unknown>, overrides: Record<string, unknown> = {}, metrics?: BackendMetrics): VaultBackend {
    const config = vaultConfigSchema.parse({
      name: 'vault-test',
      type: 'vault',
      address,
      transitMount: mount,
      keyName,
      auth,
      ...overrides,
    });
    return new VaultBackend(config, { baseDir: work, metrics });
  }

  runBackendConformance(test, {
    label: 'vault (OpenBao, restricted token)',
    create: () => backend({ method: 'token', tokenFile }),
    createUnreachable: () => backend({ method: 'token', tokenFile }, { address: unreachable }),
    secrets,
    bindsContext: true,
  });

  runBackendConformance(test, {
    label: 'vault (OpenBao, AppRole)',
    create: () => backend({ method: 'approle', roleIdFile, secretIdFile }),
    createUnreachable: () => backend({ method: 'approle', roleIdFile, secretIdFile }, { address: unreachable }),
    secrets,
    bindsContext: true,
  });

  runBackendConformance(test, {
    label: 'vault (OpenBao over TLS, restricted token)',
    create: () => backend({ method: 'token', tokenFile: tlsTokenFile }, { address: tlsAddress, tls: { caFile: tlsCaFile } }),
    createUnreachable: () => backend({ method: 'token', tokenFile: tlsTokenFile }, { address: 'https://127.0.0.1:1', tls: { caFile: tlsCaFile } }),
    secrets,
    bindsContext: true,
  });

  test('TLS: the server certificate is verified against caFile and serverName', async (t) => {
    const tls = (settings: Record<string, unknown> | undefined) =>
      backend({ method: 'token', tokenFile: tlsTokenFile }, { address: tlsAddress, ...(settings ? { tls: settings } : {}) });
    const cases: Array<[string, Record<string, unknown> | undefined, RegExp | undefined]> = [
      ['system CAs only', undefined, /cannot reach .*\((SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)\)/],
      ['wrong serverName', { caFile: tlsCaFile, serverName: 'not-the-server.example' }, /ERR_TLS_CERT_ALTNAME_INVALID/],
      ['missing caFile', { caFile: path.join(work, 'no-such-ca.pem') }, /TLS CA file .* cannot be read \(ENOENT\)/],
      ['caFile and serverName localhost', { caFile: tlsCaFile, serverName: 'localhost' }, undefined],
    ];
    for (const [what, settings, failure] of cases) {
      const b = tls(settings);
      try {
        const call = b.wrap(randomBytes(32), contextFor(b), signal());
        if (failure) {
          const error = await t.throwsAsync(call, undefined, what);
          t.is(errorCodeOf(error), 'BACKEND_UNAVAILABLE', what);
          t.regex(error.message, failure, what);
        } else {
          t.regex((await call).keyVersion, /^1@\d+$/, what);
        }
      } finally {
        await b.close();
      }
    }
  });

  test('TLS: the CA and client certificate are parsed once, not named into the connection pool on every request', async (t) => {
    // Given to an agent as `ca`/`cert`/`key`, the PEM text was concatenated into the
    // pool's name on every request (test/helpers/https-pool-names.ts).
    const b = backend({ method: 'token', tokenFile: tlsTokenFile }, { address: tlsAddress, tls: { caFile: tlsCaFile } });
    try {
      const context = contextFor(b);
      const names = await httpsPoolNamesDuring(async () => {
        const copy = await b.wrap(randomBytes(32), context, signal());
        await b.unwrap(copy.wrapped, copy.keyVersion, context, signal());
      });
      t.true(names.length > 0, 'the backend sent through a keep-alive HTTPS agent');
      for (const name of names) t.true(name.length < 512, `pool name of ${name.length} characters`);
    } finally {
      await b.close();
    }
  });

  test('TLS: a client certificate OpenSSL refuses is BACKEND_UNAVAILABLE, its text never in the message', async (t) => {
    const dir = path.join(work, `bad-client-cert-${randomBytes(4).toString('hex')}`);
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const certFile = path.join(dir, 'client.pem');
    const keyFile = path.join(dir, 'client.key');
    await writeFile(certFile, 'not-a-certificate-SECRET-MARKER\n', { mode: 0o600 });
    await writeFile(keyFile, 'not-a-key-SECRET-MARKER\n', { mode: 0o600 });
    const b = backend({ method: 'token', tokenFile: tlsTokenFile }, { address: tlsAddress, tls: { caFile: tlsCaFile, certFile, keyFile } });
    try {
      const error = await t.throwsAsync(b.wrap(randomBytes(32), contextFor(b), signal()));
      t.is(errorCodeOf(error), 'BACKEND_UNAVAILABLE');
      t.regex(error.message, /TLS certificate or key cannot be used \(ERR_OSSL_[A-Z_]+\)/);
      t.notRegex(error.message, /SECRET-MARKER/);
    } finally {
      await b.close();
    }
  });

  test('the restricted token holds only the project policy', async (t) => {
    const self = await api(restrictedToken, 'GET', 'auth/token/lookup-self');
    t.is(self.status, 200);
    t.deepEqual(self.body?.data?.policies, [policyName]);
  });

  test('the policy is minimal: everything but wrap, unwrap, key metadata and token upkeep is refused', async (t) => {
    const other = `other-${suffix()}`;
    await admin('POST', `${mount}/keys/${other}`, { type: 'aes256-gcm96' });
    const plaintext = randomBytes(32).toString('base64');
    // Controls: what the plugin needs works with this very token, so the refusals below are the policy's.
    t.is((await api(restrictedToken, 'POST', `${mount}/encrypt/${keyName}`, { plaintext })).status, 200);
    t.is((await api(restrictedToken, 'GET', `${mount}/keys/${keyName}`)).status, 200);
    t.is((await api(restrictedToken, 'POST', 'auth/token/renew-self', {})).status, 200);
    const refused: Array<[string, string, unknown?]> = [
      ['POST', `${mount}/keys/${keyName}/rotate`, {}],
      ['POST', `${mount}/keys/${keyName}/config`, { deletion_allowed: true }],
      ['DELETE', `${mount}/keys/${keyName}`],
      ['GET', `${mount}/export/encryption-key/${keyName}`],
      ['POST', `${mount}/rewrap/${keyName}`, { ciphertext: 'vault:v1:AAAA' }],
      ['POST', `${mount}/datakey/plaintext/${keyName}`, {}],
      ['POST', `${mount}/encrypt/${other}`, { plaintext }],
      ['POST', `${mount}/decrypt/${other}`, { ciphertext: 'vault:v1:AAAA' }],
      ['GET', `${mount}/keys/${other}`],
      ['POST', `${mount}/encrypt/new-${suffix()}`, { plaintext }], // no create: no upsert of a missing key
      ['GET', `${mount}/keys?list=true`],
      ['GET', 'sys/mounts'],
      ['GET', 'sys/policies/acl?list=true'],
      ['POST', 'auth/token/create', {}],
      ['GET', 'secret/data/anything'],
    ];
    for (const [method, apiPath, body] of refused) {
      t.is((await api(restrictedToken, method, apiPath, body)).status, 403, `${method} ${apiPath} should be refused`);
    }
  });

  test('a valid token refused by policy is BACKEND_REJECTED, not an outage', async (t) => {
    const other = `other-${suffix()}`;
    await admin('POST', `${mount}/keys/${other}`, { type: 'aes256-gcm96' });
    const b = backend({ method: 'token', tokenFile }, { keyName: other });
    try {
      const wrapError = await t.throwsAsync(b.wrap(randomBytes(32), contextFor(b), signal()));
      t.is(errorCodeOf(wrapError), 'BACKEND_REJECTED');
      t.regex(wrapError.message, /403 \(permission denied\)/);
      t.is(errorCodeOf(await t.throwsAsync(b.currentKeyVersion(signal()))), 'BACKEND_REJECTED');
    } finally {
      await b.close();
    }
  });

  test('AppRole login works, with role_id inline or from a file, and reads the same key as a token', async (t) => {
    const roleId = readFileSync(roleIdFile, 'utf8').trim();
    const viaFile = backend({ method: 'approle', roleIdFile, secretIdFile });
    const inline = backend({ method: 'approle', roleId, secretIdFile });
    const viaToken = backend({ method: 'token', tokenFile });
    try {
      const dataKey = randomBytes(32);
      const context = contextFor(viaFile);
      const { wrapped, keyVersion } = await viaFile.wrap(dataKey, context, signal());
      t.true(Buffer.from(await inline.unwrap(wrapped, keyVersion, context, signal())).equals(dataKey));
      t.true(Buffer.from(await viaToken.unwrap(wrapped, keyVersion, context, signal())).equals(dataKey));
    } finally {
      await Promise.all([viaFile.close(), inline.close(), viaToken.close()]);
    }
  });

  test('a wrong secret_id is unavailable (login failed), without leaking it', async (t) => {
    const wrong = randomBytes(16).toString('hex');
    const b = backend({ method: 'approle', roleIdFile, secretIdFile: await writeSecret(`wrong-secret-${suffix()}`, wrong) });
    try {
      const error = await t.throwsAsync(b.wrap(randomBytes(32), contextFor(b), signal()));
      t.is(errorCodeOf(error), 'BACKEND_UNAVAILABLE');
      t.regex(error.message, /approle login failed/);
      t.false(error.message.includes(wrong));
    } finally {
      await b.close();
    }
  });

  test('JWT login works against a JWT auth mount', async (t) => {
    const jwtMount = `jwt-${suffix()}`;
    const { publicKey, privateKey } = await promisify(generateKeyPair)('rsa', { modulusLength: 2048 });
    await admin('POST', `sys/auth/${jwtMount}`, { type: 'jwt' });
    await admin('POST', `auth/${jwtMount}/config`, { jwt_validation_pubkeys: [publicKey.export({ type: 'spki', format: 'pem' })] });
    await admin('POST', `auth/${jwtMount}/role/trousseau`, {
      role_type: 'jwt',
      user_claim: 'sub',
      bound_audiences: ['trousseau'],
      token_policies: [policyName],
      token_no_default_policy: true,
      token_ttl: '10m',
    });
    const now = Math.floor(Date.now() / 1000);
    const part = (value: unknown) => Buffer.from(JSON.stringify(value)).toString('base64url');
    const unsigned = `${part({ alg: 'RS256', typ: 'JWT' })}.${part({ sub: 'system:serviceaccount:kube-system:trousseau', aud: 'trousseau', iat: now, nbf: now - 5, exp: now + 600 })}`;
    const jwt = `${unsigned}.${sign('sha256', Buffer.from(unsigned), privateKey).toString('base64url')}`;
    const b = backend({ method: 'jwt', role: 'trousseau', mount: jwtMount, tokenFile: await writeSecret(`jwt-${suffix()}`, jwt) });
    try {
      const dataKey = randomBytes(32);
      const context = contextFor(b);
      const { wrapped, keyVersion } = await b.wrap(dataKey, context, signal());
      t.true(Buffer.from(await b.unwrap(wrapped, keyVersion, context, signal())).equals(dataKey));
    } finally {
      await b.close();
    }
  });

  test('namespace: the backend reaches a transit key inside an OpenBao namespace', async (t) => {
    const namespace = `ns-${suffix()}`;
    await admin('POST', `sys/namespaces/${namespace}`, {});
    await admin('POST', `sys/mounts/${mount}`, { type: 'transit' }, namespace);
    await admin('POST', `${mount}/keys/${keyName}`, { type: 'aes256-gcm96' }, namespace);
    await admin('PUT', `sys/policies/acl/${policyName}`, { policy: policyText }, namespace);
    const created = await admin('POST', 'auth/token/create-orphan', { policies: [policyName], no_default_policy: true, ttl: '10m' }, namespace);
    const file = await writeSecret(`ns-token-${suffix()}`, created.auth?.client_token ?? '');
    const inside = backend({ method: 'token', tokenFile: file }, { namespace });
    const outside = backend({ method: 'token', tokenFile });
    try {
      const dataKey = randomBytes(32);
      const context = { envelopeId: randomBytes(16), backendName: 'vault-test' };
      const copy = await inside.wrap(dataKey, context, signal());
      t.true(Buffer.from(await inside.unwrap(copy.wrapped, copy.keyVersion, context, signal())).equals(dataKey));
      // Same mount and key name at the root: a different key, so the copy is foreign there.
      t.is(errorCodeOf(await t.throwsAsync(outside.unwrap(copy.wrapped, copy.keyVersion, context, signal()))), 'BACKEND_REJECTED');
    } finally {
      await Promise.all([inside.close(), outside.close()]);
    }
  });

  test('rotation: the new version shows within the cache window, new wraps use it, old wraps still unwrap', async (t) => {
    const { key, policy } = await keyWithPolicy();
    const file = await writeSecret(`rotation-${suffix()}`, await restrictedTokenFor([policy]));
    const refreshMs = 1000;
    const b = backend({ method: 'token', tokenFile: file }, { keyName: key, keyVersionRefreshMs: refreshMs });
    try {
      const first = await b.currentKeyVersion(signal());
      t.regex(first, /^1@\d+$/);
      const oldKey = randomBytes(32);
      const oldContext = contextFor(b);
      const old = await b.wrap(oldKey, oldContext, signal());
      t.is(old.keyVersion, first);

      await admin('POST', `${mount}/keys/${key}/rotate`, {});
      const rotatedAt = Date.now();
      let seen = await b.currentKeyVersion(signal());
      while (seen === first && Date.now() - rotatedAt < refreshMs + 1000) {
        await sleep(100);
        seen = await b.currentKeyVersion(signal());
      }
      t.regex(seen, /^2@\d+$/, 'currentKeyVersion did not follow the rotation within the cache window');

      const newKey = randomBytes(32);
      const newContext = contextFor(b);
      const fresh = await b.wrap(newKey, newContext, signal());
      t.is(fresh.keyVersion, seen);
      t.true(Buffer.from(fresh.wrapped).toString().startsWith('vault:v2:'));
      t.true(Buffer.from(await b.unwrap(old.wrapped, old.keyVersion, oldContext, signal())).equals(oldKey));
      t.true(Buffer.from(await b.unwrap(fresh.wrapped, fresh.keyVersion, newContext, signal())).equals(newKey));
      // The version recorded in the envelope must match the ciphertext's own.
      t.is(errorCodeOf(await t.throwsAsync(b.unwrap(old.wrapped, '2', oldContext, signal()))), 'BACKEND_REJECTED');
      t.is(errorCodeOf(await t.throwsAsync(b.unwrap(old.wrapped, fresh.keyVersion, oldContext, signal()))), 'BACKEND_REJECTED');
      // Envelopes written before the creation time was recorded carry the bare number.
      t.true(Buffer.from(await b.unwrap(old.wrapped, '1', oldContext, signal())).equals(oldKey));
    } finally {
      await b.close();
    }
  });

  test('a wrap reveals a rotation at once even while the version is cached', async (t) => {
    const { key, policy } = await keyWithPolicy();
    const file = await writeSecret(`rotation-cache-${suffix()}`, await restrictedTokenFor([policy]));
    const b = backend({ method: 'token', tokenFile: file }, { keyName: key, keyVersionRefreshMs: 60_000 });
    try {
      const first = await b.currentKeyVersion(signal());
      t.regex(first, /^1@\d+$/);
      await admin('POST', `${mount}/keys/${key}/rotate`, {});
      t.is(await b.currentKeyVersion(signal()), first, 'cached');
      const rotated = (await b.wrap(randomBytes(32), contextFor(b), signal())).keyVersion;
      t.regex(rotated, /^2@\d+$/);
      t.is(await b.currentKeyVersion(signal()), rotated);
    } finally {
      await b.close();
    }
  });

  test('a transit key deleted and re-created under the same name gets a new key version; its old copies are refused', async (t) => {
    const { key, policy } = await keyWithPolicy();
    const file = await writeSecret(`recreate-${suffix()}`, await restrictedTokenFor([policy]));
    const b = backend({ method: 'token', tokenFile: file }, { keyName: key, keyVersionRefreshMs: 0 });
    try {
      const before = await b.currentKeyVersion(signal());
      const dataKey = randomBytes(32);
      const context = contextFor(b);
      const old = await b.wrap(dataKey, context, signal());
      // The API gives creation times in whole seconds: re-create in a later second.
      const createdAt = Number(before.split('@')[1]);
      while (Math.floor(Date.now() / 1000) <= createdAt) await sleep(50);
      await admin('POST', `${mount}/keys/${key}/config`, { deletion_allowed: true });
      await admin('DELETE', `${mount}/keys/${key}`);
      await admin('POST', `${mount}/keys/${key}`, { type: 'aes256-gcm96' });

      const after = await b.currentKeyVersion(signal());
      t.not(after, before, 'same key version for different key material: the key_id would not change');
      t.is(after.split('@')[0], '1');
      const fresh = await b.wrap(randomBytes(32), contextFor(b), signal());
      t.is(fresh.keyVersion, after);
      t.is(errorCodeOf(await t.throwsAsync(b.unwrap(old.wrapped, old.keyVersion, context, signal()))), 'BACKEND_REJECTED');
    } finally {
      await b.close();
    }
  });

  test('AppRole token revoked on the server: the backend logs in again and the very next calls succeed', async (t) => {
    const role = `revoke-${suffix()}`;
    await admin('POST', `auth/approle/role/${role}`, {
      token_policies: [policyName],
      token_no_default_policy: true,
      token_ttl: '10m',
    });
    const roleId = (await admin('GET', `auth/approle/role/${role}/role-id`)).data?.role_id ?? '';
    const secretId = (await admin('POST', `auth/approle/role/${role}/secret-id`, {})).data?.secret_id ?? '';
    const b = backend({ method: 'approle', roleId, secretIdFile: await writeSecret(`secret-${role}`, secretId) });

    /** Revoke every token the role issued; returns how many. */
    async function revokeRoleTokens(): Promise<number> {
      const accessors = (await admin('GET', 'auth/token/accessors?list=true')).data?.keys ?? [];
      let revoked = 0;
      for (const accessor of accessors) {
        const info = await api(rootToken, 'POST', 'auth/token/lookup-accessor', { accessor });
        if (info.status === 200 && info.body?.data?.meta?.role_name === role) {
          await admin('POST', 'auth/token/revoke-accessor', { accessor });
          revoked += 1;
        }
      }
      return revoked;
    }

    try {
      const dataKey = randomBytes(32);
      const context = contextFor(b);
      const first = await b.wrap(dataKey, context, signal());
      t.is(await revokeRoleTokens(), 1);
      t.true(Buffer.from(await b.unwrap(first.wrapped, first.keyVersion, context, signal())).equals(dataKey));
      await b.wrap(randomBytes(32), contextFor(b), signal());
      t.is(await b.currentKeyVersion(signal()), first.keyVersion);
      t.is(await revokeRoleTokens(), 1, 'the backend should hold exactly one new token');
      // And once more, to show recovery is not a one-off.
      t.true(Buffer.from(await b.unwrap(first.wrapped, first.keyVersion, context, signal())).equals(dataKey));
    } finally {
      await b.close();
    }
  });

  test('token file: a rewritten file is picked up without waiting for a refusal', async (t) => {
    const { policy } = await keyWithPolicy();
    const good = await restrictedTokenFor([policyName]);
    const file = await writeSecret(`rewrite-${suffix()}`, good);
    const b = backend({ method: 'token', tokenFile: file });
    try {
      const dataKey = randomBytes(32);
      const context = contextFor(b);
      const copy = await b.wrap(dataKey, context, signal());
      // A valid token for another key only: if the backend still used the old token the
      // wrap would succeed; with the new one it is refused by policy.
      await writeFile(file, `${await restrictedTokenFor([policy])}\n`);
      t.is(errorCodeOf(await t.throwsAsync(b.wrap(randomBytes(32), contextFor(b), signal()))), 'BACKEND_REJECTED');
      await writeFile(file, `${await restrictedTokenFor([policyName])}\n`);
      t.true(Buffer.from(await b.unwrap(copy.wrapped, copy.keyVersion, context, signal())).equals(dataKey));
    } finally {
      await b.close();
    }
  });

  test('token file: a revoked token is unavailable until the file holds a new one', async (t) => {
    const first = await restrictedTokenFor([policyName]);
    const file = await writeSecret(`revoked-${suffix()}`, first);
    const b = backend({ method: 'token', tokenFile: file });
    try {
      await b.wrap(randomBytes(32), contextFor(b), signal());
      await admin('POST', 'auth/token/revoke', { token: first });
      const error = await t.throwsAsync(b.wrap(randomBytes(32), contextFor(b), signal()));
      t.is(errorCodeOf(error), 'BACKEND_UNAVAILABLE');
      t.false(error.message.includes(first));
      await writeFile(file, `${await restrictedTokenFor([policyName])}\n`);
      const dataKey = randomBytes(32);
      const context = contextFor(b);
      const copy = await b.wrap(dataKey, context, signal());
      t.true(Buffer.from(await b.unwrap(copy.wrapped, copy.keyVersion, context, signal())).equals(dataKey));
    } finally {
      await b.close();
    }
  });

  test('token file: a missing file is unavailable, not a crash', async (t) => {
    const b = backend({ method: 'token', tokenFile: path.join(work, 'missing', 'token') });
    try {
      const error = await t.throwsAsync(b.wrap(randomBytes(32), contextFor(b), signal()));
      t.is(errorCodeOf(error), 'BACKEND_UNAVAILABLE');
      t.regex(error.message, /ENOENT/);
      await mkdir(path.join(work, 'missing'));
      await writeFile(path.join(work, 'missing', 'token'), `${await restrictedTokenFor([policyName])}\n`, { mode: 0o600 });
      t.is(await b.currentKeyVersion(signal()), await b.currentKeyVersion(signal()));
    } finally {
      await b.close();
    }
  });

  test('a short-lived renewable token is renewed before it expires', async (t) => {
    const token = await restrictedTokenFor([policyName], { ttl: '3s', explicit_max_ttl: '2m', renewable: true });
    const b = backend({ method: 'token', tokenFile: await writeSecret(`short-${suffix()}`, token) });
    try {
      await b.wrap(randomBytes(32), contextFor(b), signal());
      await sleep(4500); // past the original 3 s TTL
      const lookup = await api(rootToken, 'POST', 'auth/token/lookup', { token });
      t.is(lookup.status, 200, 'token expired: it was not renewed');
      t.true((lookup.body?.data?.ttl ?? 0) > 0);
      await b.wrap(randomBytes(32), contextFor(b), signal());
    } finally {
      await b.close();
    }
  });

  test('an AppRole token with a short TTL is renewed or replaced, and calls keep working', async (t) => {
    const role = `short-${suffix()}`;
    await admin('POST', `auth/approle/role/${role}`, {
      token_policies: [policyName],
      token_no_default_policy: true,
      token_ttl: '2s',
      token_max_ttl: '3s',
    });
    const roleId = (await admin('GET', `auth/approle/role/${role}/role-id`)).data?.role_id ?? '';
    const secretId = (await admin('POST', `auth/approle/role/${role}/secret-id`, {})).data?.secret_id ?? '';
    const b = backend({ method: 'approle', roleId, secretIdFile: await writeSecret(`secret-${role}`, secretId) });
    try {
      const dataKey = randomBytes(32);
      const context = contextFor(b);
      const copy = await b.wrap(dataKey, context, signal());
      await sleep(4000); // past the max TTL: only a new login keeps it going
      const started = performance.now();
      t.true(Buffer.from(await b.unwrap(copy.wrapped, copy.keyVersion, context, signal())).equals(dataKey));
      t.true(performance.now() - started < 1000);
    } finally {
      await b.close();
    }
  });

  test('credentialExpiresAt: an AppRole token expires within its TTL, and renewal moves the expiry forward', async (t) => {
    const role = `expiry-${suffix()}`;
    await admin('POST', `auth/approle/role/${role}`, {
      token_policies: [policyName],
      token_no_default_policy: true,
      token_ttl: '3s',
      token_max_ttl: '1m',
    });
    const roleId = (await admin('GET', `auth/approle/role/${role}/role-id`)).data?.role_id ?? '';
    const secretId = (await admin('POST', `auth/approle/role/${role}/secret-id`, {})).data?.secret_id ?? '';
    const b = backend({ method: 'approle', roleId, secretIdFile: await writeSecret(`secret-${role}`, secretId) });
    try {
      t.is(b.credentialExpiresAt(), undefined, 'no token before the first call');
      const before = Date.now();
      await b.wrap(randomBytes(32), contextFor(b), signal());
      const after = Date.now();
      const first = b.credentialExpiresAt();
      if (first === undefined) return t.fail('no expiry after an AppRole login');
      // lease_duration is 3 s, counted from when the login request left.
      t.true(first >= before + 3000 && first <= after + 3000, `expiry ${first - after} ms after the login returned`);
      // Renewal is due after 2/3 of the TTL (2 s); it answers with a fresh 3 s.
      const deadline = Date.now() + 2800;
      while (Date.now() < deadline && b.credentialExpiresAt() === first) await sleep(50);
      const renewed = b.credentialExpiresAt();
      if (renewed === undefined) return t.fail('expiry lost after renewal');
      t.true(renewed >= first + 1500, `renewal moved the expiry by ${renewed - first} ms only`);
      t.true(renewed - Date.now() <= 3000);
      await b.close();
      t.is(b.credentialExpiresAt(), undefined, 'a closed backend holds no credential');
    } finally {
      await b.close();
    }
  });

  test('credentialExpiresAt: a token file token reports its TTL; a token without TTL reports none', async (t) => {
    const token = await restrictedTokenFor([policyName], { ttl: '10m' });
    const b = backend({ method: 'token', tokenFile: await writeSecret(`expiring-${suffix()}`, token) });
    const root = backend({ method: 'token', tokenFile: await writeSecret(`root-${suffix()}`, rootToken) });
    try {
      const before = Date.now();
      await b.wrap(randomBytes(32), contextFor(b), signal());
      await root.wrap(randomBytes(32), contextFor(root), signal());
      // The TTL of a token read from a file is learnt by a background lookup-self.
      const deadline = Date.now() + 3000;
      while (Date.now() < deadline && b.credentialExpiresAt() === undefined) await sleep(20);
      const expiresAt = b.credentialExpiresAt();
      if (expiresAt === undefined) return t.fail('the TTL of a 10m token was never learnt');
      t.true(expiresAt > before + 590_000 && expiresAt <= Date.now() + 600_000, `expires ${expiresAt - Date.now()} ms from now`);
      // The root token's lookup-self (sent at the same time) has answered ttl 0 by now.
      await sleep(200);
      t.is(root.credentialExpiresAt(), undefined);
    } finally {
      await Promise.all([b.close(), root.close()]);
    }
  });

  test('an abort ends a call the server never answers, within milliseconds', async (t) => {
    // A listener that accepts connections and never replies: only the abort can end the call.
    const sockets: Socket[] = [];
    let requestArrived!: () => void;
    const arrived = new Promise<void>((resolve) => (requestArrived = resolve));
    const blackHole = createServer((socket) => {
      sockets.push(socket);
      socket.once('data', () => requestArrived());
    });
    await new Promise<void>((resolve) => blackHole.listen(0, '127.0.0.1', resolve));
    const { port } = blackHole.address() as { port: number };
    const b = backend({ method: 'token', tokenFile }, { address: `http://127.0.0.1:${port}` });
    try {
      const controller = new AbortController();
      const call = b.wrap(randomBytes(32), contextFor(b), controller.signal);
      const outcome = call.then(
        () => 'resolved',
        (error: unknown) => error,
      );
      t.is(await Promise.race([arrived.then(() => 'arrived'), outcome, sleep(5000, 'timeout', { ref: false })]), 'arrived');
      const reason = new Error('caller gave up');
      const aborted = performance.now();
      controller.abort(reason);
      t.is(await Promise.race([outcome, sleep(2000, 'still running', { ref: false })]), reason);
      t.true(performance.now() - aborted < 250, 'abort did not end the HTTP call promptly');
    } finally {
      await b.close();
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => blackHole.close(resolve));
    }
  });

  test('close() stops token upkeep and later calls fail as unavailable', async (t) => {
    const b = backend({ method: 'approle', roleIdFile, secretIdFile });
    await b.wrap(randomBytes(32), contextFor(b), signal());
    await b.close();
    t.is(errorCodeOf(await t.throwsAsync(b.wrap(randomBytes(32), contextFor(b), signal()))), 'BACKEND_UNAVAILABLE');
  });

  // ------------------------------------------------------------ batch requests

  /** The backend pointed at a proxy that counts the requests reaching OpenBao, warmed up (token read, key read). */
  async function countedBackend(t: ExecutionContext, overrides: Record<string, unknown> = {}, metrics?: BackendMetrics) {
    const proxy = await CountingProxy.start(address, vaultOperation);
    const b = backend({ method: 'token', tokenFile }, { address: proxy.url, ...overrides }, metrics);
    t.teardown(async () => {
      await b.close();
      await proxy.close();
    });
    await b.unwrap(...(await wrapped(b, randomBytes(32))), signal());
    proxy.take();
    return { proxy, b };
  }

  async function wrapped(b: VaultBackend, key: Buffer): Promise<[Uint8Array, string, WrapContext]> {
    const context = contextFor(b);
    const copy = await b.wrap(key, context, signal());
    return [copy.wrapped, copy.keyVersion, context];
  }

  test('batching: concurrent wraps and unwraps share transit requests, and every key comes back to its own caller', async (t) => {
    const { proxy, b } = await countedBackend(t);
    const keys = Array.from({ length: 64 }, () => randomBytes(32));
    const copies = await Promise.all(keys.map((key) => wrapped(b, key)));
    const encrypts = proxy.take()['transit/encrypt'] ?? 0;
    t.true(encrypts >= 1 && encrypts <= 8, `64 concurrent wraps took ${encrypts} encrypt requests`);
    const opened = await Promise.all(copies.map((copy) => b.unwrap(...copy, signal())));
    const decrypts = proxy.take()['transit/decrypt'] ?? 0;
    t.true(decrypts >= 1 && decrypts <= 8, `64 concurrent unwraps took ${decrypts} decrypt requests`);
    opened.forEach((key, index) => t.true(Buffer.from(key).equals(keys[index]!), `key ${index}`));
  });

  test('batching: each transit request reports how many data keys it carried', async (t) => {
    const reported: Array<{ operation: string; keys: number }> = [];
    const { proxy, b } = await countedBackend(t, {}, { keysPerRequest: (operation, keys) => reported.push({ operation, keys }) });
    reported.length = 0; // the warm-up's wrap and unwrap
    const copies = await Promise.all(Array.from({ length: 48 }, () => wrapped(b, randomBytes(32))));
    await Promise.all(copies.map((copy) => b.unwrap(...copy, signal())));
    const requests = proxy.take();
    for (const [operation, path] of [['wrap', 'transit/encrypt'], ['unwrap', 'transit/decrypt']] as const) {
      const sizes = reported.filter((r) => r.operation === operation).map((r) => r.keys);
      t.is(sizes.length, requests[path] ?? 0, `${operation}: one report per request`);
      t.is(sizes.reduce((a, b) => a + b, 0), 48, `${operation}: every key counted once`);
      t.true(Math.max(...sizes) > 1, `${operation}: batched (${sizes.join(', ')})`);
    }
  });

  test('batching: maxItems 1 sends one request per data key', async (t) => {
    const { proxy, b } = await countedBackend(t, { batch: { maxItems: 1 } });
    const copies = await Promise.all(Array.from({ length: 16 }, () => wrapped(b, randomBytes(32))));
    await Promise.all(copies.map((copy) => b.unwrap(...copy, signal())));
    t.like(proxy.take(), { 'transit/encrypt': 16, 'transit/decrypt': 16 });
  });

  test('batching: a copy that does not open is refused alone; the others in the same request open', async (t) => {
    const { proxy, b } = await countedBackend(t);
    const keys = [randomBytes(32), randomBytes(32), randomBytes(32)];
    const good = await Promise.all(keys.map((key) => wrapped(b, key)));
    proxy.take();
    const [moved, version] = good[0]!;
    const tooNew = Buffer.from(`vault:v99:${randomBytes(60).toString('base64')}`);
    const outcomes = await Promise.allSettled([
      b.unwrap(moved, version, contextFor(b), signal()), // a copy moved to another envelope
      ...good.map((copy) => b.unwrap(...copy, signal())),
      b.unwrap(tooNew, '99', contextFor(b), signal()), // a version the key never had
    ]);
    t.is(proxy.take()['transit/decrypt'], 1, 'all five went in one request');
    const refused = [outcomes[0], outcomes[4]].map((o): Error | undefined => (o?.status === 'rejected' ? (o.reason as Error) : undefined));
    t.is(errorCodeOf(refused[0]), 'BACKEND_REJECTED');
    t.regex(refused[0]?.message ?? '', /decrypt refused: HTTP 400 \(cipher: message authentication failed\)/);
    t.is(errorCodeOf(refused[1]), 'BACKEND_REJECTED');
    t.regex(refused[1]?.message ?? '', /decrypt refused: HTTP 400 \(invalid ciphertext: version is too new\)/);
    outcomes.slice(1, 4).forEach((outcome, index) => {
      t.is(outcome.status, 'fulfilled', `good copy ${index}`);
      if (outcome.status === 'fulfilled') t.true(Buffer.from(outcome.value).equals(keys[index]!), `key ${index}`);
    });
  });

  test('batching: a call that gives up while its request is held is answered at once, and the others still get their keys', async (t) => {
    const proxy = await FaultProxy.start('openbao', address);
    const b = backend({ method: 'token', tokenFile }, { address: `http://127.0.0.1:${proxy.port}` });
    t.teardown(async () => {
      await b.close();
      await proxy.close();
    });
    const keys = [randomBytes(32), randomBytes(32), randomBytes(32)];
    const copies = await Promise.all(keys.map((key) => wrapped(b, key)));
    await proxy.hold();
    const held = proxy.whenHolding();
    const controllers = keys.map(() => new AbortController());
    const calls = copies.map((copy, index) => b.unwrap(...copy, AbortSignal.any([controllers[index]!.signal, signal()])));
    const first = calls[0]!.then(
      () => 'opened',
      (error: unknown) => error,
    );
    await held;
    const reason = new Error('caller gave up');
    controllers[0]!.abort(reason);
    t.is(await first, reason, 'answered while the request is still held');
    await proxy.pass();
    const rest = await Promise.all(calls.slice(1));
    rest.forEach((key, index) => t.true(Buffer.from(key).equals(keys[index + 1]!)));
  });
}
