/**
 * A Vault transit key deleted and re-created under the same name, against the real
 * OpenBao server: the key_id must change (the new key material is a new key), data
 * wrapped before still decrypts through the other backend, and the refused copy is
 * reported (a rate-limited warning naming the backend and the error class, and the
 * per-backend count in `trousseau status`), not hidden behind a silent failover.
 */
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Writable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import test from 'ava';
import { generateKeyFile } from '../../src/backends/local.ts';
import { renderStatus, type StatusDocument } from '../../src/cli/status-view.ts';
import { parseConfig } from '../../src/config/load.ts';
import { createLogger } from '../../src/observability/logger.ts';
import { Metrics } from '../../src/observability/metrics.ts';
import { Plugin } from '../../src/plugin.ts';
import { tempDir } from '../helpers/plugin-harness.ts';
import { requireServer, requireVar } from '../helpers/servers.ts';

const server = requireServer('openbao');
if ('missing' in server) {
  test.skip('vault key re-created (OpenBao): real server tests', () => {});
} else {
  const address = requireVar(server.env, 'VAULT_ADDR', 'openbao');
  const rootToken = requireVar(server.env, 'VAULT_ROOT_TOKEN', 'openbao');
  const mount = requireVar(server.env, 'VAULT_TRANSIT_MOUNT', 'openbao');

  async function admin(method: string, apiPath: string, body?: unknown): Promise<void> {
    const response = await fetch(`${address}/v1/${apiPath}`, {
      method,
      headers: { 'X-Vault-Token': rootToken, 'content-type': 'application/json' },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      signal: AbortSignal.timeout(5000),
    });
    if (response.status >= 300) throw new Error(`${method} ${apiPath}: HTTP ${response.status}`);
  }

  test('re-created transit key: new key_id; old data decrypts through local; the refused vault copy is logged and counted', async (t) => {
    const dir = await tempDir(t);
    const key = `recreated-${randomBytes(4).toString('hex')}`;
    await admin('POST', `${mount}/keys/${key}`, { type: 'aes256-gcm96' });
    const createdAt = Math.floor(Date.now() / 1000);
    t.teardown(async () => {
      await admin('POST', `${mount}/keys/${key}/config`, { deletion_allowed: true }).catch(() => undefined);
      await admin('DELETE', `${mount}/keys/${key}`).catch(() => undefined);
    });
    await writeFile(path.join(dir, 'token'), rootToken, { mode: 0o600 });
    await generateKeyFile(path.join(dir, 'local.key'));
    const config = parseConfig(
      {
        socket: { path: path.join(dir, 'kms.sock') },
        quorum: 1,
        backends: [
          // vault first, so a Decrypt tries its copy before the local one.
          { name: 'vault', type: 'vault', address, transitMount: mount, keyName: key, keyVersionRefreshMs: 0, priority: 1, auth: { method: 'token', tokenFile: 'token' } },
          { name: 'local', type: 'local', keyFile: 'local.key', priority: 2 },
        ],
        health: { probeIntervalMs: 3_600_000 },
        escrow: { enabled: false },
      },
      'test configuration',
    );
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _encoding, done) {
        lines.push(...chunk.toString().split('\n').filter(Boolean));
        done();
      },
    });
    const plugin = await Plugin.create({ config, baseDir: dir, logger: createLogger('warn', sink), metrics: new Metrics() });
    t.teardown(() => plugin.close());
    await plugin.start();
    const before = plugin.status();
    t.is(before.healthz, 'ok');
    const plaintext = randomBytes(32);
    const encrypted = await plugin.encrypt(plaintext, 'v2', AbortSignal.timeout(5000));
    t.is(encrypted.keyId, before.keyId);

    while (Math.floor(Date.now() / 1000) <= createdAt) await sleep(50); // creation times are whole seconds
    await admin('POST', `${mount}/keys/${key}/config`, { deletion_allowed: true });
    await admin('DELETE', `${mount}/keys/${key}`);
    await admin('POST', `${mount}/keys/${key}`, { type: 'aes256-gcm96' });
    await plugin.prober.probeAll();
    const after = plugin.status();
    t.is(after.healthz, 'ok');
    t.not(after.keyId, before.keyId, 'the re-created key kept the key_id: the apiserver would never make a new DEK');
    t.false(after.keyId.endsWith('-partial'));

    // Twice: both count, only one warning within the rate limit.
    for (let i = 0; i < 2; i++) {
      t.deepEqual(await plugin.decrypt(encrypted.ciphertext, encrypted.annotations, AbortSignal.timeout(5000)), plaintext);
    }
    const warnings = lines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.backend === 'vault' && l.reason === 'BACKEND_REJECTED');
    t.is(warnings.length, 1, lines.join('\n'));
    t.regex(String(warnings[0]!.msg), /refused its copy/);
    for (const line of lines) t.false(line.includes(rootToken), 'token in a log line');

    const status = plugin.describe() as unknown as StatusDocument;
    t.like(status.rejectedCopies?.find((r) => r.backend === 'vault'), { count: 2, lastReason: 'BACKEND_REJECTED' });
    t.regex(renderStatus(status), /\bvault .* 2 BACKEND_REJECTED \d+s ago/);
    t.is(status.rejectedCopies?.find((r) => r.backend === 'local'), undefined);
  });
}
