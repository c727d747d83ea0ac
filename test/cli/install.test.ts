/**
 * What `npm ci` must leave behind for everything else to work: the pinned Node 24
 * (the devDependency `node`, whose install script fetches the binary), pkcs11js (a
 * native N-API binding built by node-gyp at install, for the pkcs11 backend), and an
 * allowScripts list that approves exactly the install scripts the lockfile has, so
 * an npm that blocks unapproved scripts still installs Node 24, and a new dependency
 * with an install script fails here until someone reviews it.
 */
import test from 'ava';
import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { MAIN } from '../helpers/plugin-harness.ts';

const run = promisify(execFile);
const root = path.resolve(import.meta.dirname, '../..');
const pkg = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8')) as {
  devDependencies: Record<string, string>;
  allowScripts?: Record<string, boolean>;
  scripts: Record<string, string>;
};
const lock = JSON.parse(readFileSync(path.join(root, 'package-lock.json'), 'utf8')) as {
  packages: Record<string, { hasInstallScript?: boolean; version?: string }>;
};

test('the pinned Node is installed and is the version package.json pins', async (t) => {
  const binary = path.join(root, 'node_modules', '.bin', 'node');
  t.true(existsSync(binary), 'node_modules/.bin/node is missing: the install script of the "node" package did not run (allowScripts?)');
  const { stdout } = await run(binary, ['--version'], { timeout: 60_000 });
  t.is(stdout.trim(), `v${pkg.devDependencies.node}`);
  t.regex(pkg.devDependencies.node!, /^24\./);
});

test('allowScripts approves exactly the packages whose install scripts the lockfile records', (t) => {
  const withScripts = Object.entries(lock.packages)
    .filter(([, p]) => p.hasInstallScript)
    .map(([location]) => location.replace(/^.*node_modules\//, ''))
    .sort();
  t.deepEqual(withScripts, ['node', 'pkcs11js', 'protobufjs'], 'a dependency with an install script was added or removed: review it and update allowScripts');
  // Name-only entries: the lockfile records no tarball URLs, so npm cannot verify a
  // pinned "name@version" and refuses it; the lockfile pins the versions instead.
  t.deepEqual(pkg.allowScripts, { node: true, pkcs11js: true, protobufjs: true });
});

test('npm run trousseau runs the CLI with the pinned Node', (t) => {
  t.is(pkg.scripts.trousseau, 'node src/main.ts');
  t.true(existsSync(MAIN));
});

test('an older Node running bin/trousseau.js is told Node 24 is needed, not ERR_UNKNOWN_FILE_EXTENSION', async (t) => {
  // Any Node older than 24 on this machine (Debian's, for one); none: nothing to run it with.
  const older = ['/usr/bin/node', '/usr/local/bin/node'].find((candidate) => existsSync(candidate));
  const version = older ? (await run(older, ['--version'])).stdout.trim() : undefined;
  if (!older || !version || Number(version.slice(1).split('.')[0]) >= 24) {
    t.pass('no Node older than 24 on this machine');
    return;
  }
  const error = await run(older, [path.join(root, 'bin', 'trousseau.js'), '--version'], { timeout: 60_000 }).then(
    () => undefined,
    (e: { code?: number; stderr?: string }) => e,
  );
  t.truthy(error, `${version} ran the CLI`);
  t.is(error?.code, 1);
  t.regex(error?.stderr ?? '', /trousseau needs Node 24 or later; this is Node 2[0-3]\./);
  t.notRegex(error?.stderr ?? '', /ERR_UNKNOWN_FILE_EXTENSION/);
});
