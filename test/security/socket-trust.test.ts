/**
 * Issue 10, items 1 and 3: the socket and its folder against a hostile local user.
 *
 * - A folder others can write (or own) is refused before anything is bound: with such
 *   a folder an unprivileged user won the bind/chown race on the first try and had
 *   root chmod and chown a root-only file through a link.
 * - Every folder on the way is checked too, links are followed only where nobody else
 *   could have placed them, missing folders are created.
 * - The socket group is resolved before the bind; the socket is born with its mode.
 * - Shutdown removes only the inode it bound: a second plugin's socket on the same
 *   path survives the first one's stop.
 */
import test from 'ava';
import { chmod, chown, lstat, mkdir, stat, symlink, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { canConnect, eventually, sleep, startHarness, tempDir } from '../helpers/plugin-harness.ts';
import { NOBODY, openForTraversal, runAsNobody } from '../helpers/unprivileged.ts';

/** A test folder the unprivileged attacker can traverse. */
async function attackableDir(t: Parameters<typeof tempDir>[0]): Promise<string> {
  const dir = await tempDir(t);
  await openForTraversal(dir);
  return dir;
}

test('a socket folder others can write is refused, and an attacker racing the bind cannot have root chmod/chown a file through a link', async (t) => {
  const dir = await attackableDir(t);
  const run = path.join(dir, 'run');
  await mkdir(run);
  await chmod(run, 0o777); // the misconfiguration: anyone may create and rename entries here
  const socketPath = path.join(run, 'kms.sock');
  const secret = path.join(dir, 'root-only');
  await writeFile(secret, 'root only', { mode: 0o600 });

  // The attacker waits for the socket to appear and swaps a link to the root-only file in.
  const attacker = runAsNobody(
    t,
    `const fs = require('fs');
     const [sock, target] = process.argv.slice(1);
     const tmp = sock + '.x';
     const end = Date.now() + 8000;
     while (Date.now() < end) {
       try { if (fs.lstatSync(sock).isSocket()) { fs.symlinkSync(target, tmp); fs.renameSync(tmp, sock); console.log('swapped'); break; } } catch {}
     }`,
    { args: [socketPath, secret] },
  );
  const h = await startHarness(t, { socketPath, noStart: true, config: { socket: { path: socketPath, mode: '0660', group: String(NOBODY) } } });
  const outcome = await h.start().then(
    () => 'started',
    (error: unknown) => (error as Error).message,
  );
  // Give the attacker its chance at whatever the plugin bound, then stop it.
  await Promise.race([attacker.exited, sleep(2000)]);
  attacker.child.kill('SIGKILL');
  await attacker.exited;

  const info = await stat(secret);
  t.log(`start: ${outcome}; attacker: ${attacker.stdout.trim() || 'found no socket to swap'}; root-only file now mode ${(info.mode & 0o777).toString(8)} gid ${info.gid}`);
  t.is(info.mode & 0o777, 0o600, 'the root-only file was chmodded through the link');
  t.is(info.gid, 0, 'the root-only file was chowned through the link');
  t.regex(outcome, /refusing the socket folder: .*run is writable by users other than root and the plugin's user/);
  await t.throwsAsync(lstat(socketPath), { code: 'ENOENT' }, 'nothing was bound in the refused folder');
});

test('a socket folder owned by another user is refused', async (t) => {
  const dir = await attackableDir(t);
  const run = path.join(dir, 'run');
  await mkdir(run, { mode: 0o755 });
  await chown(run, NOBODY, NOBODY);
  const h = await startHarness(t, { socketPath: path.join(run, 'kms.sock'), noStart: true });
  await t.throwsAsync(h.start(), { message: new RegExp(`run is owned by uid ${NOBODY}, not by root or the plugin's user`) });
});

test('a parent folder others can write is refused (they could rename the socket folder away and put their own there)', async (t) => {
  const dir = await attackableDir(t);
  const open = path.join(dir, 'open');
  await mkdir(path.join(open, 'run'), { recursive: true, mode: 0o755 });
  await chmod(open, 0o777);
  const h = await startHarness(t, { socketPath: path.join(open, 'run', 'kms.sock'), noStart: true });
  await t.throwsAsync(h.start(), { message: /refusing the socket folder: .*open is writable by users other than root/ });
});

test('a sticky world-writable folder like /tmp may lead to the socket but not hold it', async (t) => {
  const dir = await attackableDir(t);
  const sticky = path.join(dir, 'sticky');
  await mkdir(sticky);
  await chmod(sticky, 0o1777);
  const refused = await startHarness(t, { socketPath: path.join(sticky, 'kms.sock'), noStart: true });
  await t.throwsAsync(refused.start(), { message: /sticky\/? is writable by other users \(sticky, like \/tmp\)/ });

  const h = await startHarness(t, { socketPath: path.join(sticky, 'private', 'kms.sock') });
  t.is((await h.status()).healthz, 'ok');
  const folder = await stat(path.join(sticky, 'private'));
  t.is(folder.uid, 0);
  t.is(folder.mode & 0o022, 0, 'a created folder must not be writable by others');
});

test('links: one an attacker owns in a sticky folder is refused; one in a trusted folder is followed', async (t) => {
  const dir = await attackableDir(t);
  const sticky = path.join(dir, 'sticky');
  const real = path.join(dir, 'real');
  await mkdir(sticky);
  await chmod(sticky, 0o1777);
  await mkdir(real, { mode: 0o755 });
  const planted = runAsNobody(t, `require('fs').symlinkSync(process.argv[1], process.argv[2])`, { args: [real, path.join(sticky, 'link')] });
  t.is(await planted.exited, 0, planted.stderr);
  t.is((await lstat(path.join(sticky, 'link'))).uid, NOBODY);
  const refused = await startHarness(t, { socketPath: path.join(sticky, 'link', 'kms.sock'), noStart: true });
  await t.throwsAsync(refused.start(), { message: new RegExp(`link is a link owned by uid ${NOBODY}`) });

  await symlink(real, path.join(dir, 'trusted-link'));
  const h = await startHarness(t, { socketPath: path.join(dir, 'trusted-link', 'kms.sock') });
  t.is((await h.status()).healthz, 'ok');
  t.true((await lstat(path.join(real, 'kms.sock'))).isSocket());
});

test('the socket group is resolved before the bind: an unknown group refuses the start and no socket ever exists', async (t) => {
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'kms.sock');
  const h = await startHarness(t, { socketPath, noStart: true, config: { socket: { path: socketPath, mode: '0660', group: 'no-such-group-here' } } });
  await t.throwsAsync(h.start(), { message: /socket group "no-such-group-here" does not exist/ });
  await t.throwsAsync(lstat(socketPath), { code: 'ENOENT' });
});

test('with a group, the socket is born 0660 and owned by root and that group', async (t) => {
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'kms.sock');
  const h = await startHarness(t, { socketPath, config: { socket: { path: socketPath, mode: '0660', group: 'nogroup' } } });
  const info = await lstat(socketPath);
  t.true(info.isSocket());
  t.is(info.mode & 0o777, 0o660);
  t.is(info.uid, 0);
  t.is(info.gid, NOBODY);
  t.is((await h.status()).healthz, 'ok');
});

test('stop removes only the socket it bound: a second plugin serving the same path keeps its socket', async (t) => {
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'kms.sock');
  const first = await startHarness(t, { socketPath });
  // The first plugin's socket is removed from under it (an operator, a cleanup job),
  // and a second plugin starts on the same path.
  await unlink(socketPath);
  const second = await startHarness(t, { socketPath });
  await first.stop();
  t.true((await lstat(socketPath)).isSocket(), "stopping the first plugin deleted the second plugin's socket");
  t.true(await canConnect(socketPath));
  t.is((await second.status()).healthz, 'ok');
  await second.stop();
  await eventually(async () => ((await lstat(socketPath).catch(() => undefined)) ? undefined : true));
});
