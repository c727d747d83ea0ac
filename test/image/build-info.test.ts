/**
 * The build stamp (src/build-info.ts): what `trousseau --version`, the
 * trousseau_build_info metric and the start-up log line say, from an image's
 * build-info.json or from a checkout. The image test (image.test.ts) checks the same
 * three inside the built image.
 */
import { execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import test from 'ava';
import { formatVersion, readBuildInfo } from '../../src/build-info.ts';
import { Metrics } from '../../src/observability/metrics.ts';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const node = process.execPath;

async function tempDir(t: { teardown(fn: () => Promise<void>): void }): Promise<string> {
  const dir = await mkdtemp(path.join(tmpdir(), 'trousseau-build-info-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

test('an image build-info.json gives version, commit and date', async (t) => {
  const dir = await tempDir(t);
  await writeFile(path.join(dir, 'package.json'), '{"version":"9.9.9"}');
  await writeFile(path.join(dir, 'build-info.json'), '{"version":"1.2.3","commit":"0123456789abcdef0123456789abcdef01234567","date":"2026-01-02T03:04:05Z"}');
  const info = readBuildInfo(dir);
  t.deepEqual(info, { version: '1.2.3', commit: '0123456789abcdef0123456789abcdef01234567', date: '2026-01-02T03:04:05Z' });
  t.is(formatVersion(info), 'trousseau 1.2.3 (commit 0123456789abcdef0123456789abcdef01234567, built 2026-01-02T03:04:05Z)');
});

test('values that are not plain short tokens become "unknown" (they reach a metric label and a log line)', async (t) => {
  const dir = await tempDir(t);
  await writeFile(path.join(dir, 'build-info.json'), JSON.stringify({ version: '1.0\n{"level":"fatal"}', commit: 'a'.repeat(200), date: 42 }));
  t.deepEqual(readBuildInfo(dir), { version: 'unknown', commit: 'unknown', date: 'unknown' });
});

test('a folder without build-info.json or .git: package.json version, commit and date unknown', async (t) => {
  const dir = await tempDir(t);
  await writeFile(path.join(dir, 'package.json'), '{"version":"4.5.6"}');
  t.deepEqual(readBuildInfo(dir), { version: '4.5.6', commit: 'unknown', date: 'unknown' });
});

test('a checkout: package.json version and the commit git names', async (t) => {
  if (!existsSync(path.join(root, '.git')) || existsSync(path.join(root, 'build-info.json'))) {
    t.fail('this test runs in a git checkout without an image build-info.json');
    return;
  }
  const { stdout } = await run('git', ['rev-parse', 'HEAD'], { cwd: root });
  const pkg = JSON.parse(await readFile(path.join(root, 'package.json'), 'utf8')) as { version: string };
  t.deepEqual(readBuildInfo(), { version: pkg.version, commit: stdout.trim(), date: 'unknown' });
});

test('`trousseau --version` and `-V` print version, commit and build date', async (t) => {
  const expected = formatVersion(readBuildInfo());
  for (const flag of ['--version', '-V']) {
    const { stdout } = await run(node, [path.join(root, 'bin/trousseau.js'), flag], { timeout: 60_000 });
    t.is(stdout.trim(), expected);
  }
  t.regex(expected, /^trousseau \S+ \(commit \S+, built \S+\)$/);
});

test('trousseau_build_info{version,commit} is 1', async (t) => {
  const info = readBuildInfo();
  const text = await new Metrics().registry.metrics();
  t.true(text.includes(`trousseau_build_info{version="${info.version}",commit="${info.commit}"} 1\n`), text.split('\n').filter((l) => l.includes('build_info')).join('\n'));
});

test('the first log line of `serve` states version, commit, configuration and socket', async (t) => {
  const dir = await tempDir(t);
  const socket = path.join(dir, 'kms.sock');
  const child = spawn(node, [path.join(root, 'src/main.ts'), 'serve', '--dev', '--data-dir', path.join(dir, 'keys'), '--socket', socket], { stdio: ['ignore', 'ignore', 'pipe'] });
  t.teardown(() => void child.kill('SIGKILL'));
  let stderr = '';
  child.stderr.setEncoding('utf8');
  const firstStartLine = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no start-up line within 60 s:\n${stderr}`)), 60_000);
    child.stderr.on('data', (chunk: string) => {
      stderr += chunk;
      const line = stderr.split('\n').find((l) => l.includes('"msg":"starting trousseau"'));
      if (line) {
        clearTimeout(timer);
        resolve(line);
      }
    });
    child.once('exit', (code) => reject(new Error(`serve exited ${code}:\n${stderr}`)));
  });
  const line = JSON.parse(firstStartLine) as Record<string, unknown>;
  const info = readBuildInfo();
  t.like(line, { version: info.version, commit: info.commit, date: info.date, config: '--dev', socket });
  // It is the plugin's first line (dev mode's key creation is logged before serve starts).
  const lines = stderr.split('\n').filter(Boolean).map((l) => JSON.parse(l) as { msg: string });
  t.false(lines.slice(0, lines.findIndex((l) => l.msg === 'starting trousseau')).some((l) => !l.msg.includes('development key')));
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  t.is(await exited, 0);
});
