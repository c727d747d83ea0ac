/**
 * Unix socket life cycle: private mode, stale sockets replaced, live sockets and
 * regular files left alone.
 */
import test from 'ava';
import { spawn } from 'node:child_process';
import { lstat, readFile, readdir, stat, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { startHarness, tempDir } from '../helpers/plugin-harness.ts';

test('the socket has mode 0600 once the server is up, and is removed on stop', async (t) => {
  const h = await startHarness(t);
  const info = await stat(h.socketPath);
  t.true(info.isSocket());
  t.is(info.mode & 0o777, 0o600);
  await h.stop();
  await t.throwsAsync(lstat(h.socketPath), { code: 'ENOENT' });
});

test('a stale socket left by a killed process is replaced', async (t) => {
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'kms.sock');
  // A process that binds the socket and is then SIGKILLed leaves the file behind, unserved.
  const child = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(socketPath)}, () => console.log('ready'))`], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  t.teardown(() => child.kill('SIGKILL'));
  await new Promise<void>((resolve, reject) => {
    child.stdout.once('data', () => resolve());
    child.once('exit', () => reject(new Error('listener exited early')));
  });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGKILL');
  await exited;
  t.true((await lstat(socketPath)).isSocket(), 'the killed process should have left its socket');

  const h = await startHarness(t, { socketPath });
  t.is((await h.status()).healthz, 'ok');
  t.is((await stat(socketPath)).mode & 0o777, 0o600);
});

test('a live socket (another server listening) makes start fail with a clear message', async (t) => {
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'kms.sock');
  const other = net.createServer((c) => c.end());
  await new Promise<void>((resolve) => other.listen(socketPath, resolve));
  t.teardown(() => new Promise<void>((resolve) => other.close(() => resolve())));
  const h = await startHarness(t, { socketPath, noStart: true });
  await t.throwsAsync(h.start(), { message: /another process is serving .*kms\.sock/ });
  await h.stop();
  // The other server still owns its socket.
  await new Promise<void>((resolve, reject) => {
    const c = net.connect(socketPath, () => {
      c.destroy();
      resolve();
    });
    c.once('error', reject);
  });
});

test('a regular file at the socket path is refused and left untouched', async (t) => {
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'kms.sock');
  await writeFile(socketPath, 'precious data');
  const h = await startHarness(t, { socketPath, noStart: true });
  await t.throwsAsync(h.start(), { message: /is not a socket; refusing to replace it/ });
  t.is(await readFile(socketPath, 'utf8'), 'precious data');
});

test('a missing parent folder is created (0750 at most), and only the socket is left in it', async (t) => {
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'run', 'sub', 'kms.sock');
  const h = await startHarness(t, { socketPath });
  t.is((await h.status()).healthz, 'ok');
  // 0750 at most (the umask may take more away): no write for the group, nothing for others.
  for (const folder of [path.join(dir, 'run'), path.join(dir, 'run', 'sub')]) t.is((await stat(folder)).mode & 0o027, 0, folder);
  // The socket is bound under a private name and linked into place; the private name is gone.
  t.deepEqual(await readdir(path.join(dir, 'run', 'sub')), ['kms.sock']);
  await h.stop();
  t.deepEqual(await readdir(path.join(dir, 'run', 'sub')), []);
});
