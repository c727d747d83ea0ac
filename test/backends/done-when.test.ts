/**
 * The backends issue's end-to-end check: `trousseau serve --config test/servers/trousseau.yaml`
 * against the real servers of test/servers/up.sh, driven by an independent KMS client
 * (the gRPC client of src/cli/client.ts, as `trousseau status|encrypt|decrypt` use it).
 * An envelope written with every backend up must still decrypt after vault and
 * aws-kms go away, through the azure and local copies.
 *
 * Other test files use the shared servers at the same time, so "going away" is not
 * `down.sh vault aws-kms`: the plugin reaches vault and local-kms through TCP proxies
 * this test owns, and closing the proxies makes both unreachable to this plugin only.
 * The committed configuration is used as is, except for those two addresses, the
 * actual ports of the servers, and a local key of the test's own.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import test from 'ava';
import { parse, stringify } from 'yaml';
import { call, clientsFor } from '../../src/cli/client.ts';
import type { StatusDocument } from '../../src/cli/status-view.ts';
import type { AdminStatusResponse, V2DecryptRequest, V2DecryptResponse, V2EncryptRequest, V2EncryptResponse } from '../../src/kms/types.ts';
import { FaultProxy } from '../chaos/fault-proxy.ts';
import { requireServer } from '../helpers/servers.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const templateFile = path.join(root, 'test/servers/trousseau.yaml');
const main = path.join(root, 'src/main.ts');

const servers = (['openbao', 'local-kms', 'lowkey-vault'] as const).map((name) => requireServer(name));
const missing = servers.flatMap((s) => ('missing' in s ? [s.missing] : []));

type Clients = ReturnType<typeof clientsFor>;
interface BackendBlock {
  name: string;
  type: string;
  [field: string]: unknown;
}

async function status(clients: Clients): Promise<StatusDocument> {
  const response = await call<object, AdminStatusResponse>(clients.admin, 'Status', {}, 2000);
  return JSON.parse(response.status_json) as StatusDocument;
}

/** Poll Status until `ready` holds (the plugin probes every second in this config). */
async function waitForStatus(clients: Clients, ready: (s: StatusDocument) => boolean, what: string, timeoutMs = 20_000): Promise<StatusDocument> {
  const deadline = Date.now() + timeoutMs;
  let last: StatusDocument | undefined;
  let lastError: unknown;
  while (Date.now() < deadline) {
    try {
      last = await status(clients);
      if (ready(last)) return last;
    } catch (error) {
      lastError = error; // the socket is not there yet
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`timed out waiting for ${what}; last status: ${JSON.stringify(last?.backends.map((b) => [b.name, b.probeOk, b.lastError]))}`, {
    cause: lastError,
  });
}

const probe = (s: StatusDocument, name: string) => s.backends.find((b) => b.name === name)?.probeOk;

function startPlugin(configFile: string, socket: string, env: Record<string, string>): ChildProcess {
  const child = spawn(process.execPath, [main, 'serve', '--config', configFile, '--socket', socket], {
    cwd: root,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  child.stderr?.resume();
  return child;
}

async function stopPlugin(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await exited;
  clearTimeout(timer);
}

if (missing.length > 0) {
  test.skip(`done-when: ${missing.join('; ')}`, () => {});
} else {
  const [bao, kms, azure] = servers.map((s) => ('env' in s ? s.env : {})) as [Record<string, string>, Record<string, string>, Record<string, string>];

  test('done-when: serve --config test/servers/trousseau.yaml passes a KMS client, and its envelope outlives vault and aws-kms', async (t) => {
    t.timeout(90_000);
    const dir = await mkdtemp(path.join(tmpdir(), 'trousseau-done-when-'));
    const vaultProxy = await FaultProxy.start('vault', bao.VAULT_ADDR!);
    const awsProxy = await FaultProxy.start('aws-kms', kms.LOCAL_KMS_ENDPOINT!);
    const children: ChildProcess[] = [];
    const open: Clients[] = [];
    t.teardown(async () => {
      for (const c of open) c.close();
      for (const child of children) await stopPlugin(child);
      await vaultProxy.close();
      await awsProxy.close();
      await rm(dir, { recursive: true, force: true });
    });

    // The committed file, with the addresses of the servers actually running.
    const config = parse(await readFile(templateFile, 'utf8')) as { quorum: number; backends: BackendBlock[] };
    const templateDir = path.dirname(templateFile);
    const byName = new Map(config.backends.map((b) => [b.name, b]));
    t.deepEqual([...byName.keys()].sort(), ['aws', 'azure', 'local', 'vault']);
    t.is(config.quorum, 2);
    const vault = byName.get('vault')!;
    const aws = byName.get('aws')!;
    const az = byName.get('azure')!;
    const local = byName.get('local')!;
    vault.address = `http://127.0.0.1:${vaultProxy.port}`;
    const vaultAuth = vault.auth as Record<string, string>;
    for (const field of ['roleIdFile', 'secretIdFile']) vaultAuth[field] = path.resolve(templateDir, vaultAuth[field]!);
    aws.endpoint = `http://127.0.0.1:${awsProxy.port}`;
    aws.keyId = kms.LOCAL_KMS_KEY_ARN;
    az.vaultUrl = azure.AZURE_KV_URL;
    az.caFile = path.resolve(templateDir, az.caFile as string);
    const localKey = path.join(dir, 'local.key');
    local.keyFile = localKey;
    await writeFile(localKey, `${randomBytes(32).toString('base64')}\n`, { mode: 0o600 });
    const configFile = path.join(dir, 'trousseau.yaml');
    await writeFile(configFile, stringify(config));

    const env = {
      AWS_ACCESS_KEY_ID: kms.LOCAL_KMS_ACCESS_KEY_ID ?? 'test',
      AWS_SECRET_ACCESS_KEY: kms.LOCAL_KMS_SECRET_ACCESS_KEY ?? 'test',
      AWS_EC2_METADATA_DISABLED: 'true',
      IDENTITY_ENDPOINT: azure.AZURE_KV_IDENTITY_ENDPOINT!,
      IDENTITY_HEADER: 'trousseau-test',
    };

    // 1. Every backend up: Status, Encrypt, Decrypt.
    const socket = path.join(dir, 'kms.sock');
    children.push(startPlugin(configFile, socket, env));
    const first = clientsFor(socket);
    open.push(first);
    const up = await waitForStatus(first, (s) => s.backends.every((b) => b.probeOk === true), 'all four backends up');
    t.true(up.healthy);
    t.false(up.partial);
    t.regex(up.keyId ?? '', /^trousseau-v1-/);

    const plaintext = randomBytes(64);
    const encrypted = await call<V2EncryptRequest, V2EncryptResponse>(first.v2, 'Encrypt', { plaintext, uid: 'done-when-1' });
    t.is(up.keyId, encrypted.key_id);
    const request: V2DecryptRequest = {
      ciphertext: encrypted.ciphertext,
      uid: 'done-when-2',
      key_id: encrypted.key_id,
      annotations: encrypted.annotations,
    };
    const roundTrip = await call<V2DecryptRequest, V2DecryptResponse>(first.v2, 'Decrypt', request);
    t.true(Buffer.from(roundTrip.plaintext).equals(plaintext));
    // Every backend holds a copy (none was a straggler), so the outage below leaves two.
    const afterWrite = await status(first);
    t.false(afterWrite.partial);

    first.close();
    await stopPlugin(children[0]!);

    // 2. vault and aws-kms unreachable (for this plugin only), plugin restarted.
    await vaultProxy.close();
    await awsProxy.close();
    const socket2 = path.join(dir, 'kms2.sock');
    children.push(startPlugin(configFile, socket2, env));
    const second = clientsFor(socket2);
    open.push(second);
    const down = await waitForStatus(
      second,
      (s) => probe(s, 'vault') === false && probe(s, 'aws') === false && probe(s, 'azure') === true && probe(s, 'local') === true,
      'vault and aws down, azure and local up',
    );
    t.deepEqual(down.backends.filter((b) => b.probeOk === false).map((b) => b.name).sort(), ['aws', 'vault']);
    for (const name of ['vault', 'aws']) t.is(down.backends.find((b) => b.name === name)?.lastError, 'BACKEND_UNAVAILABLE', name);

    const decrypted = await call<V2DecryptRequest, V2DecryptResponse>(second.v2, 'Decrypt', { ...request, uid: 'done-when-3' });
    t.true(Buffer.from(decrypted.plaintext).equals(plaintext), 'the envelope written before the outage decrypts through azure or local');

    // Quorum 2 still holds with azure and local: new writes go on, marked partial.
    const fresh = randomBytes(16);
    const during = await call<V2EncryptRequest, V2EncryptResponse>(second.v2, 'Encrypt', { plaintext: fresh, uid: 'done-when-4' });
    const back = await call<V2DecryptRequest, V2DecryptResponse>(second.v2, 'Decrypt', {
      ciphertext: during.ciphertext,
      uid: 'done-when-5',
      key_id: during.key_id,
      annotations: during.annotations,
    });
    t.true(Buffer.from(back.plaintext).equals(fresh));
  });
}
