/**
 * What a running plugin exposes on the machine: no TCP listener unless asked, and
 * then only on the address given (loopback in every shipped default); the socket
 * 0600, the development data folder 0700 and its key files 0600, whatever the umask
 * (the plugin is started under umask 000 here); a key file others can read refused.
 */
import { spawn } from 'node:child_process';
import { chmod, lstat, readFile, readdir, readlink, stat, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import test, { type ExecutionContext } from 'ava';
import { generateKeyFile } from '../../src/backends/local.ts';
import { call, clientsFor } from '../../src/cli/client.ts';
import { parseEnvelope } from '../../src/envelope/format.ts';
import type * as T from '../../src/kms/types.ts';
import { MAIN, canConnect, eventually, tempDir } from '../helpers/plugin-harness.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

interface Served {
  pid: number;
  readonly stderr: string;
}

/** `trousseau serve ARGS` under umask 000, until it serves on `socketPath`; killed in teardown. */
async function serveWithOpenUmask(t: ExecutionContext, args: string[], socketPath: string): Promise<Served> {
  const child = spawn('/bin/sh', ['-c', 'umask 000 && exec "$0" "$@"', process.execPath, MAIN, 'serve', ...args], {
    cwd: root,
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  let gone = false;
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  child.once('exit', () => (gone = true));
  t.teardown(async () => {
    if (gone) return;
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
  });
  await eventually(async () => {
    if (gone) throw new Error(`serve exited early:\n${stderr}`);
    const info = await lstat(socketPath).catch(() => undefined);
    return info?.isSocket() && (await canConnect(socketPath)) ? true : undefined;
  }, 30_000, 50);
  return {
    pid: child.pid!,
    get stderr() {
      return stderr;
    },
  };
}


/** "0100007F:1F90" (/proc/net/tcp) or its 32-hex-digit tcp6 form, as an address. */
function decodeProcAddress(hex: string): string {
  const [host = '', port = '0'] = hex.split(':');
  const bytes = Buffer.from(host, 'hex');
  // The kernel prints each 32-bit word in host (little-endian) order.
  for (let i = 0; i < bytes.length; i += 4) bytes.subarray(i, i + 4).reverse();
  if (bytes.length === 4) return `${[...bytes].join('.')}:${parseInt(port, 16)}`;
  const v4mapped = bytes.subarray(0, 12).equals(Buffer.from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]));
  if (v4mapped) return `::ffff:${[...bytes.subarray(12)].join('.')}:${parseInt(port, 16)}`;
  const words = Array.from({ length: 8 }, (_, i) => bytes.readUInt16BE(i * 2).toString(16));
  return `[${words.join(':')}]:${parseInt(port, 16)}`;
}

/** Every TCP address process `pid` listens on, read from /proc (no tool needed). */
async function listeningAddresses(pid: number): Promise<string[]> {
  const inodes = new Set<string>();
  for (const fd of await readdir(`/proc/${pid}/fd`)) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
    const match = /^socket:\[(\d+)\]$/.exec(target);
    if (match) inodes.add(match[1]!);
  }
  const addresses: string[] = [];
  for (const table of ['tcp', 'tcp6']) {
    const text = await readFile(`/proc/${pid}/net/${table}`, 'utf8').catch(() => '');
    for (const line of text.split('\n').slice(1)) {
      const fields = line.trim().split(/\s+/);
      // local_address is field 1, st field 3 (0A = LISTEN), inode field 9.
      if (fields[3] === '0A' && inodes.has(fields[9] ?? '')) addresses.push(decodeProcAddress(fields[1]!));
    }
  }
  return addresses;
}

const isLoopback = (address: string) => /^(127\.\d+\.\d+\.\d+|::ffff:127\.\d+\.\d+\.\d+|\[0:0:0:0:0:0:0:1\]):\d+$/.test(address);

test('the /proc reader decodes listening addresses', (t) => {
  t.is(decodeProcAddress('0100007F:1F90'), '127.0.0.1:8080');
  t.is(decodeProcAddress('00000000:0050'), '0.0.0.0:80');
  t.is(decodeProcAddress('00000000000000000000000001000000:1F90'), '[0:0:0:0:0:0:0:1]:8080');
  t.is(decodeProcAddress('0000000000000000FFFF00000100007F:0050'), '::ffff:127.0.0.1:80');
  t.true(isLoopback('127.0.0.1:8080'));
  t.false(isLoopback('0.0.0.0:80'));
  t.false(isLoopback('[0:0:0:0:0:0:0:0]:80'));
});

test('serve --dev: no TCP listener at all; socket 0600, data dir 0700, key files 0600 under umask 000', async (t) => {
  const dir = await tempDir(t);
  const dataDir = path.join(dir, 'data');
  const socketPath = path.join(dir, 'kms.sock');
  const served = await serveWithOpenUmask(t, ['--dev', '--data-dir', dataDir, '--socket', socketPath], socketPath);
  t.deepEqual(await listeningAddresses(served.pid), [], 'serve --dev listens on TCP without being asked');
  t.is((await lstat(socketPath)).mode & 0o777, 0o600, 'socket mode');
  t.is((await stat(dataDir)).mode & 0o777, 0o700, 'data dir mode');
  const files = await readdir(dataDir);
  t.true(files.filter((f) => f.endsWith('.key')).length === 3, files.join(','));
  for (const file of files) t.is((await stat(path.join(dataDir, file))).mode & 0o777, 0o600, `${file} mode`);
});

test('the shipped `npm run dev` address is loopback, and serve --http-listen binds exactly that', async (t) => {
  const pkg = JSON.parse(await readFile(path.join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> };
  const devListen = /--http-listen\s+(\S+)/.exec(pkg.scripts.dev ?? '')?.[1];
  t.truthy(devListen, 'npm run dev has no --http-listen');
  t.regex(devListen!, /^(127\.0\.0\.1|localhost|\[::1\]):\d+$/);

  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'kms.sock');
  const port = await freePort();
  const served = await serveWithOpenUmask(t, ['--dev', '--data-dir', path.join(dir, 'data'), '--socket', socketPath, '--http-listen', `localhost:${port}`], socketPath);
  const addresses = await eventually(async () => {
    const found = await listeningAddresses(served.pid);
    return found.length > 0 ? found : undefined;
  });
  t.true(addresses.every(isLoopback), `listens on ${addresses.join(', ')}`);
  t.true(addresses.some((a) => a.endsWith(`:${port}`)));
  const ready = await fetch(`http://127.0.0.1:${port}/readyz`);
  t.is(ready.status, 200);
});

test('serve --config without an http section: no TCP listener; with http.listen 127.0.0.1 only loopback', async (t) => {
  const dir = await tempDir(t);
  await generateKeyFile(path.join(dir, 'a.key'));
  const socketPath = path.join(dir, 'kms.sock');
  const base = `socket: {path: ${socketPath}}\nquorum: 1\nbackends:\n  - {name: a, type: local, keyFile: a.key}\n`;
  await writeFile(path.join(dir, 'plain.yaml'), base);
  const plain = await serveWithOpenUmask(t, ['--config', path.join(dir, 'plain.yaml')], socketPath);
  t.deepEqual(await listeningAddresses(plain.pid), []);
  t.is((await lstat(socketPath)).mode & 0o777, 0o600);
  process.kill(plain.pid, 'SIGTERM');
  await eventually(async () => ((await lstat(socketPath).catch(() => undefined)) ? undefined : true), 10_000);

  const port = await freePort();
  await writeFile(path.join(dir, 'http.yaml'), `${base}http: {listen: "127.0.0.1:${port}"}\n`);
  const withHttp = await serveWithOpenUmask(t, ['--config', path.join(dir, 'http.yaml')], socketPath);
  const addresses = await eventually(async () => {
    const found = await listeningAddresses(withHttp.pid);
    return found.length > 0 ? found : undefined;
  });
  t.deepEqual(addresses, [`127.0.0.1:${port}`]);
});

test('a key file others can read is refused: backend unavailable, the log says chmod 600', async (t) => {
  const dir = await tempDir(t);
  await generateKeyFile(path.join(dir, 'open.key'));
  await generateKeyFile(path.join(dir, 'good.key'));
  await chmod(path.join(dir, 'open.key'), 0o644);
  const socketPath = path.join(dir, 'kms.sock');
  await writeFile(
    path.join(dir, 'config.yaml'),
    `socket: {path: ${socketPath}}\nquorum: 1\nbackends:\n  - {name: open, type: local, keyFile: open.key}\n  - {name: good, type: local, keyFile: good.key}\n`,
  );
  const served = await serveWithOpenUmask(t, ['--config', path.join(dir, 'config.yaml')], socketPath);
  const clients = clientsFor(socketPath);
  t.teardown(() => clients.close());
  const status = JSON.parse((await call<object, T.AdminStatusResponse>(clients.admin, 'Status', {})).status_json) as {
    partial: boolean;
    backends: { name: string; probeOk?: boolean; lastError?: string }[];
  };
  t.like(status.backends.find((b) => b.name === 'open'), { probeOk: false, lastError: 'BACKEND_UNAVAILABLE' });
  t.like(status.backends.find((b) => b.name === 'good'), { probeOk: true });
  t.true(status.partial, 'the key_id must not claim a copy from the refused backend');
  // The envelope carries no copy from it.
  const encrypted = await call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext: Buffer.alloc(32, 1), uid: 't' });
  const copies = parseEnvelope(encrypted.ciphertext, new Map(Object.entries(encrypted.annotations))).copies.map((c) => c.backendName);
  t.deepEqual(copies, ['good']);
  t.regex(served.stderr, /open\.key is readable by group or others \(mode 644\); chmod 600 it/);
  // The file itself is left alone: fixing permissions is the operator's call.
  t.is((await stat(path.join(dir, 'open.key'))).mode & 0o777, 0o644);
});

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}
