/**
 * The compile cache of `serve` (TROUSSEAU_COMPILE_CACHE, src/config/compile-cache.js)
 * against a hostile local user. The cache holds code V8 runs, so a folder someone
 * else owns or can write, or anything in it that someone else made, means the cache
 * is not used at all: the plugin serves without it and logs one line saying why.
 *
 * Whether Node used a cache is read from Node itself: with NODE_DEBUG_NATIVE=
 * COMPILE_CACHE it prints a "[compile cache]" line for every folder it opens and
 * every entry it reads. The control shows those lines appear when the folder is ours.
 */
import test, { type ExecutionContext } from 'ava';
import { spawn } from 'node:child_process';
import { chmod, lstat, mkdir, readdir, symlink } from 'node:fs/promises';
import path from 'node:path';
import { canConnect, eventually, tempDir } from '../helpers/plugin-harness.ts';
import { NOBODY, openForTraversal, runAsNobody } from '../helpers/unprivileged.ts';

const BIN = path.resolve(import.meta.dirname, '../../bin/trousseau.js');
const NODE_SAYS_CACHE = /^\[compile cache\]/m;

interface Served {
  code: number | null;
  stderr: string;
  served: boolean;
}

/**
 * `trousseau serve --dev` through bin/trousseau.js (where the cache is decided) with
 * `env`, under umask 0 so that nothing is safe only by the umask; stopped with SIGTERM
 * once its socket accepts, or when it exits by itself.
 */
async function serve(t: ExecutionContext, dir: string, env: Record<string, string>): Promise<Served> {
  const socket = path.join(dir, 'kms.sock');
  const args = [BIN, 'serve', '--dev', '--data-dir', path.join(dir, 'keys'), '--socket', socket, '--log-format', 'text'];
  const childEnv: NodeJS.ProcessEnv = { ...process.env, NODE_DEBUG_NATIVE: 'COMPILE_CACHE', ...env };
  if (!env.NODE_COMPILE_CACHE) delete childEnv.NODE_COMPILE_CACHE;
  const child = spawn('/bin/sh', ['-c', 'umask 0; exec "$@"', 'sh', process.execPath, ...args], { env: childEnv, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  t.teardown(() => void (child.exitCode === null && child.kill('SIGKILL')));
  const served = await eventually(async () => {
    if (child.exitCode !== null) return false;
    return (await canConnect(socket)) ? true : undefined;
  }, 60_000, 50);
  if (served) child.kill('SIGTERM');
  return { code: await exited, stderr, served };
}

/** A folder whose entries the attacker may create, as /tmp: sticky and world-writable. */
async function stickyDir(t: ExecutionContext): Promise<string> {
  const dir = await tempDir(t);
  await openForTraversal(dir);
  const shared = path.join(dir, 'shared');
  await mkdir(shared);
  await chmod(shared, 0o1777);
  return shared;
}

/** The attacker makes `folder` (when missing) and plants an entry in it as Node would lay it out. */
async function plant(t: ExecutionContext, folder: string): Promise<void> {
  const attacker = runAsNobody(
    t,
    `const fs = require('fs'); const path = require('path');
     const folder = process.argv[1];
     fs.mkdirSync(folder, { recursive: true, mode: 0o755 });
     const tagged = path.join(folder, 'v' + process.versions.node + '-' + process.arch + '-planted-0');
     fs.mkdirSync(tagged, { mode: 0o755 });
     fs.writeFileSync(path.join(tagged, 'deadbeef'), 'forged code cache');`,
    { args: [folder] },
  );
  t.is(await attacker.exited, 0, attacker.stderr);
}

/** The plugin served without the cache: no line from Node's cache, the refusal logged once. */
function assertNotUsed(t: ExecutionContext, result: Served, reason: RegExp): void {
  t.true(result.served, `serve did not serve without its cache:\n${result.stderr}`);
  t.is(result.code, 0, result.stderr);
  t.notRegex(result.stderr, NODE_SAYS_CACHE, 'Node opened or read the untrusted compile cache');
  const lines = result.stderr.split('\n').filter((line) => line.includes('compile cache not used'));
  t.is(lines.length, 1, result.stderr);
  t.regex(lines[0] ?? '', reason);
}

test('control: a cache folder of our own is created 0700, used, and read on the next start (umask 0)', async (t) => {
  const dir = await tempDir(t);
  const cache = path.join(dir, 'cache');
  const first = await serve(t, dir, { TROUSSEAU_COMPILE_CACHE: cache });
  t.true(first.served, first.stderr);
  t.regex(first.stderr, /compile cache in use/);
  const second = await serve(t, dir, { TROUSSEAU_COMPILE_CACHE: cache });
  t.regex(second.stderr, /\[compile cache\] reading cache from .* for StrippedTypeScript .*src\/main\.ts.*success/);
  t.is((await lstat(cache)).mode & 0o777, 0o700);
  const [tagged] = await readdir(cache);
  t.is((await lstat(path.join(cache, tagged!))).mode & 0o777, 0o700, 'Node made its sub-folder with the umask of 0');
});

test('a cache folder the attacker (uid 65534) made in a sticky shared folder is not used', async (t) => {
  const shared = await stickyDir(t);
  const cache = path.join(shared, 'cache');
  await plant(t, cache);
  t.is((await lstat(cache)).uid, NOBODY);
  const result = await serve(t, path.dirname(shared), { TROUSSEAU_COMPILE_CACHE: cache });
  assertNotUsed(t, result, new RegExp(`cache is owned by uid ${NOBODY}, not by root or the plugin's user`));
  t.deepEqual((await readdir(cache)).filter((name) => !name.includes('planted')), [], 'the plugin wrote into the untrusted folder');
});

test('a cache folder others can write is not used, with what the attacker put in it', async (t) => {
  const dir = await tempDir(t);
  await openForTraversal(dir);
  const cache = path.join(dir, 'cache');
  await mkdir(cache);
  await chmod(cache, 0o777); // the misconfiguration
  await plant(t, cache);
  assertNotUsed(t, await serve(t, dir, { TROUSSEAU_COMPILE_CACHE: cache }), /cache is writable by users other than root and the plugin's user \(mode 777\)/);
});

test('a trusted cache folder still holding what the attacker made while it was open is not used', async (t) => {
  const dir = await tempDir(t);
  await openForTraversal(dir);
  const cache = path.join(dir, 'cache');
  await mkdir(cache);
  await chmod(cache, 0o777);
  await plant(t, cache);
  await chmod(cache, 0o700); // closed again, but not emptied
  assertNotUsed(t, await serve(t, dir, { TROUSSEAU_COMPILE_CACHE: cache }), new RegExp(`planted-0 is owned by uid ${NOBODY}`));
});

test('a link in the cache folder is not followed: the cache is not used', async (t) => {
  const dir = await tempDir(t);
  const cache = path.join(dir, 'cache');
  await mkdir(path.join(dir, 'elsewhere'), { mode: 0o700 });
  await mkdir(cache, { mode: 0o700 });
  await symlink(path.join(dir, 'elsewhere'), path.join(cache, `v${process.versions.node}-${process.arch}-link-0`));
  assertNotUsed(t, await serve(t, dir, { TROUSSEAU_COMPILE_CACHE: cache }), /link-0 is a link/);
});

test('NODE_COMPILE_CACHE naming a folder others can write stops serve before it serves (Node used it before our code ran)', async (t) => {
  const dir = await tempDir(t);
  await openForTraversal(dir);
  const cache = path.join(dir, 'cache');
  await mkdir(cache);
  await chmod(cache, 0o777);
  const result = await serve(t, dir, { NODE_COMPILE_CACHE: cache });
  t.false(result.served);
  t.is(result.code, 1);
  t.regex(result.stderr, /NODE_COMPILE_CACHE: refusing the compile cache folder: .*cache is writable by users other than root/);
});
