/**
 * Credential files (here a Vault token file; the Vault AppRole/JWT/TLS files and the
 * Azure client secret and CA files are read by the same function) are read under the
 * socket folder's trust rule. Before, an ordinary read followed any link: a local user
 * who could write the folder (or a sticky one such as /tmp) planted a link to a
 * root-only file, and the plugin, as root, sent that file's content to the Vault
 * address as its token.
 *
 * What the plugin sends is observed at a small HTTP listener standing where the Vault
 * address points (it answers 403 to everything, as a Vault would to a bad token):
 * the test is about what leaves the process, not about Vault.
 */
import test, { type ExecutionContext } from 'ava';
import { randomBytes } from 'node:crypto';
import { chmod, chown, mkdir, symlink, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import pino from 'pino';
import { vaultBackend, vaultConfigSchema } from '../../src/backends/vault.ts';
import { errorCodeOf } from '../../src/errors.ts';
import { asNobody, NOBODY } from '../helpers/local-keys.ts';
import { tempDir } from '../helpers/plugin-harness.ts';

const isRoot = process.getuid?.() === 0;

/** An HTTP listener that records every X-Vault-Token it is sent. */
async function tokenRecorder(t: ExecutionContext): Promise<{ address: string; tokens: string[] }> {
  const tokens: string[] = [];
  const server = createServer((request, response) => {
    const token = request.headers['x-vault-token'];
    if (typeof token === 'string') tokens.push(token);
    response.writeHead(403, { 'content-type': 'application/json' }).end('{"errors":["permission denied"]}');
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
  return { address: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, tokens };
}

/** One wrap through a Vault backend whose token file is `tokenFile`; returns the error code. */
async function wrapWithTokenFile(address: string, tokenFile: string): Promise<string> {
  const config = vaultConfigSchema.parse({ name: 'vault-a', type: 'vault', address, keyName: 'k', auth: { method: 'token', tokenFile } });
  const backend = await vaultBackend.create(config, { baseDir: path.dirname(tokenFile), logger: pino({ level: 'silent' }) });
  try {
    await backend.wrap(randomBytes(32), { envelopeId: randomBytes(16), backendName: 'vault-a' }, AbortSignal.timeout(5000));
    return 'OK';
  } catch (error) {
    return `${errorCodeOf(error)}: ${(error as Error).message}`;
  } finally {
    await backend.close?.();
  }
}

/** A root-only file whose content must never leave the process. */
async function rootOnlySecret(dir: string): Promise<{ file: string; secret: string }> {
  const secret = `root-only-${randomBytes(12).toString('hex')}`;
  const file = path.join(dir, 'root-only');
  await writeFile(file, `${secret}\n`, { mode: 0o600 });
  return { file, secret };
}

test('a link planted by another user in a sticky folder is not followed: the root-only file is never sent', async (t) => {
  if (!isRoot) return t.pass('needs root (CI runs as root): the attacker is uid 65534');
  const vault = await tokenRecorder(t);
  const dir = await tempDir(t);
  await chmod(dir, 0o755);
  const { file: rootOnly, secret } = await rootOnlySecret(dir);
  const shared = path.join(dir, 'shared');
  await mkdir(shared);
  await chmod(shared, 0o1777);
  await asNobody(`ln -s ${rootOnly} ${shared}/vault-token`);
  const outcome = await wrapWithTokenFile(vault.address, path.join(shared, 'vault-token'));
  t.regex(outcome, /^BACKEND_UNAVAILABLE: .*refusing vault backend vault-a: token file: .*vault-token is a link owned by uid 65534/);
  t.false(vault.tokens.includes(secret), 'the root-only file was sent as a token');
  t.false(outcome.includes(secret));
});

test('a token file in a folder other users can write, or owned by another user, is refused and nothing is sent', async (t) => {
  const vault = await tokenRecorder(t);
  const dir = await tempDir(t);
  const open = path.join(dir, 'open');
  await mkdir(open);
  await chmod(open, 0o777);
  const token = `hvs.${randomBytes(12).toString('hex')}`;
  await writeFile(path.join(open, 'vault-token'), token, { mode: 0o600 });
  const outcome = await wrapWithTokenFile(vault.address, path.join(open, 'vault-token'));
  t.regex(outcome, /^BACKEND_UNAVAILABLE: .*open is writable by users other than root and the plugin's user/);
  if (isRoot) {
    const owned = path.join(dir, 'owned');
    await mkdir(owned, { mode: 0o755 });
    await writeFile(path.join(owned, 'vault-token'), token, { mode: 0o600 });
    await chown(path.join(owned, 'vault-token'), NOBODY, NOBODY);
    t.regex(await wrapWithTokenFile(vault.address, path.join(owned, 'vault-token')), /is owned by uid 65534, not by root or the plugin's user/);
  }
  t.deepEqual(vault.tokens, []);
});

test("a Kubernetes secret volume's layout (sticky root, root-owned links into a 0755 folder) is accepted", async (t) => {
  const vault = await tokenRecorder(t);
  const volume = path.join(await tempDir(t), 'volume');
  await mkdir(volume);
  await chmod(volume, 0o1777);
  const data = path.join(volume, '..2026_12_02_01_00_00.000000001');
  await mkdir(data, { mode: 0o755 });
  const token = `hvs.${randomBytes(12).toString('hex')}`;
  await writeFile(path.join(data, 'vault-token'), token, { mode: 0o644 });
  await symlink(path.basename(data), path.join(volume, '..data'));
  await symlink('..data/vault-token', path.join(volume, 'vault-token'));
  const outcome = await wrapWithTokenFile(vault.address, path.join(volume, 'vault-token'));
  t.notRegex(outcome, /refusing/);
  t.true(vault.tokens.includes(token), 'the token was not read through the volume links');
});
