/**
 * trousseau_backend_credential_expiry_timestamp_seconds from a plugin whose Vault
 * backend logs in with AppRole against the real OpenBao server
 * (test/servers/openbao.server.sh); local backends, which have no credential to
 * expire, must not get a series. The same plugin shows that backends get a metrics
 * handle: trousseau_backend_keys_per_request has the Vault backend's requests.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import test from 'ava';
import { generateKeyFile } from '../../src/backends/local.ts';
import { parseConfig } from '../../src/config/load.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { Metrics } from '../../src/observability/metrics.ts';
import { Plugin } from '../../src/plugin.ts';
import { requireServer, requireVar } from '../helpers/servers.ts';

const server = requireServer('openbao');
if ('missing' in server) {
  test.skip('credential expiry metric: needs the OpenBao server', () => {});
} else {
  const env = server.env;
  const need = (name: string): string => requireVar(env, name, 'openbao');
  const address = need('VAULT_ADDR');
  const rootToken = need('VAULT_ROOT_TOKEN');

  async function admin(method: string, apiPath: string, body?: unknown): Promise<{ data?: { role_id?: string; secret_id?: string } }> {
    const response = await fetch(`${address}/v1/${apiPath}`, {
      method,
      headers: { 'X-Vault-Token': rootToken, 'content-type': 'application/json' },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      signal: AbortSignal.timeout(5000),
    });
    const text = await response.text();
    if (response.status >= 300) throw new Error(`admin ${method} ${apiPath}: HTTP ${response.status}`);
    return text ? (JSON.parse(text) as { data?: { role_id?: string; secret_id?: string } }) : {};
  }

  test('a plugin with an AppRole Vault backend exports its token expiry, in seconds, after an escrow verification', async (t) => {
    const dir = await mkdtemp(path.join(tmpdir(), 'trousseau-expiry-'));
    t.teardown(() => rm(dir, { recursive: true, force: true }));
    const role = `expiry-metric-${randomBytes(4).toString('hex')}`;
    await admin('POST', `auth/approle/role/${role}`, {
      token_policies: [need('VAULT_POLICY')],
      token_no_default_policy: true,
      token_ttl: '20m',
      token_max_ttl: '1h',
    });
    const roleId = (await admin('GET', `auth/approle/role/${role}/role-id`)).data?.role_id ?? '';
    const secretId = (await admin('POST', `auth/approle/role/${role}/secret-id`, {})).data?.secret_id ?? '';
    await writeFile(path.join(dir, 'secret-id'), `${secretId}\n`, { mode: 0o600 });
    await generateKeyFile(path.join(dir, 'local.key'));
    const config = parseConfig(
      {
        socket: { path: path.join(dir, 'kms.sock') },
        quorum: 1,
        backends: [
          {
            name: 'vault-a',
            type: 'vault',
            address,
            transitMount: need('VAULT_TRANSIT_MOUNT'),
            keyName: need('VAULT_KEY_NAME'),
            auth: { method: 'approle', roleId, secretIdFile: 'secret-id' },
          },
          { name: 'local-a', type: 'local', keyFile: 'local.key' },
        ],
        health: { probeIntervalMs: 3_600_000 },
        escrow: { initialDelayMs: 3_600_000 },
      },
      'test configuration',
    );
    const metrics = new Metrics();
    const plugin = await Plugin.create({ config, baseDir: dir, logger: silentLogger(), metrics });
    t.teardown(() => plugin.close());
    await plugin.start();

    const before = Date.now();
    const report = await plugin.verifyEscrow();
    t.true(report.ok, JSON.stringify(report.backends));
    const text = await metrics.registry.getSingleMetricAsString('trousseau_backend_credential_expiry_timestamp_seconds');
    t.false(text.includes('local-a'), 'a local backend has no credential expiry');
    const value = Number(/\{backend="vault-a"\} (\S+)/.exec(text)?.[1]);
    // The token was issued at the plugin's start with a 20 minute TTL (and is not yet
    // due for renewal), so it expires at most 20 minutes from now, in seconds.
    const remaining = value - before / 1000;
    t.true(remaining > 19 * 60 && remaining <= 20 * 60, `gauge ${value}: ${remaining} s from now`);
    // The plugin also hands each backend its metrics: the verification's wrap went to
    // transit as a request of one data key.
    const sizes = await metrics.registry.getSingleMetricAsString('trousseau_backend_keys_per_request');
    t.regex(sizes, /trousseau_backend_keys_per_request_count\{backend="vault-a",operation="wrap"\} [1-9]/);
    t.false(sizes.includes('local-a'), 'a local backend sends no requests');
  });
}
