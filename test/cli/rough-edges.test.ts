/**
 * The CLI's words where a new user goes wrong: each case is run as the user runs it
 * and must say what is wrong and what to do, not quote a library's raw error.
 */
import test from 'ava';
import { execFile, spawn } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { addKeyToFile } from '../../src/backends/local.ts';
import { formatEnvelopeDocument } from '../../src/cli/envelope-document.ts';
import { formatProgress } from '../../src/cli/rewrap.ts';
import { MAIN, runCli as runCliWithin, startHarness, tempDir } from '../helpers/plugin-harness.ts';

/** Every CLI start loads Node and the modules: on a loaded 2-core machine that takes seconds. */
const runCli = (args: string[], options: { timeoutMs?: number } = {}) => runCliWithin(args, { timeoutMs: options.timeoutMs ?? 90_000 });

const run = promisify(execFile);

test.serial('serve with neither --config nor --dev says what to pass', async (t) => {
  t.timeout(300_000);
  const result = await runCli(['serve']);
  t.is(result.code, 1);
  t.regex(result.stderr, /serve needs a configuration: --config FILE .*or --dev/);
  t.notRegex(result.stderr, /undefined|ERR_INVALID_ARG_TYPE/);
});

test.serial('status --watch refuses an interval that is not a number of at least 0.5 seconds', async (t) => {
  t.timeout(300_000);
  for (const bad of ['abc', '0', '0.4', 'Infinity']) {
    const result = await runCli(['status', '--watch', bad, '-s', '/nonexistent/kms.sock']);
    t.not(result.code, 0, bad);
    t.regex(result.stderr, /must be a number of seconds from 0\.5 to 3600/, bad);
  }
});

test.serial('status --watch 0.5 polls, and says there is no socket in words', async (t) => {
  t.timeout(300_000);
  const dir = await tempDir(t);
  const child = spawn(process.execPath, [MAIN, 'status', '--watch', '0.5', '-s', path.join(dir, 'none.sock')], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => child.kill('SIGKILL'));
  let stdout = '';
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no second refresh within 120 s: ${stdout}`)), 120_000);
    child.stdout.on('data', (d: Buffer) => {
      stdout += d.toString();
      if ((stdout.match(/status unavailable/g) ?? []).length >= 2) {
        clearTimeout(timer);
        resolve();
      }
    });
  });
  t.regex(stdout, /status unavailable: no socket at .*none\.sock: the plugin is not running there; start the plugin/);
});

test.serial('a wrong socket path says what is there and how to start the plugin, not grpc\'s resolver notes', async (t) => {
  t.timeout(300_000);
  const dir = await tempDir(t);
  const file = path.join(dir, 'not-a-socket');
  await writeFile(file, '');
  const stale = path.join(dir, 'stale.sock');
  // A socket nobody listens on: bound, never listening, like one left by a killed plugin.
  await run('python3', ['-c', 'import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])', stale]);
  const cases: [string, RegExp][] = [
    [path.join(dir, 'missing.sock'), /no socket at .*missing\.sock: the plugin is not running there; start the plugin \(`trousseau serve -c CONFIG`, or `npm run dev`/],
    [file, /not-a-socket is not a socket; start the plugin/],
    [stale, /nothing listens on .*stale\.sock \(a socket left by a plugin that stopped\); start the plugin/],
    [path.join(file, 'kms.sock'), /a part of it is a file, not a folder/],
  ];
  for (const [socket, expected] of cases) {
    for (const args of [['status'], ['encrypt']]) {
      const result = await runCli([...args, '-s', socket]);
      t.is(result.code, 1, `${args[0]} ${socket}`);
      t.regex(result.stderr, expected, `${args[0]} ${socket}`);
      t.notRegex(result.stderr, /No connection established|Resolution note/, `${args[0]} ${socket}`);
    }
  }
});

test.serial('keygen into a missing folder or under a file names the folder, not a temporary file', async (t) => {
  t.timeout(300_000);
  const dir = await tempDir(t);
  const missing = await runCli(['keygen', path.join(dir, 'nope', 'a.key')]);
  t.is(missing.code, 1);
  t.regex(missing.stderr, /folder .*nope does not exist; create it first \(mkdir -m 700 /);
  t.notRegex(missing.stderr, /\.tmp/);
  const file = path.join(dir, 'file');
  await writeFile(file, '');
  const under = await runCli(['keygen', path.join(file, 'a.key')]);
  t.is(under.code, 1);
  t.regex(under.stderr, /file is not a folder/);
  t.notRegex(under.stderr, /\.tmp/);
});

test.serial('serve --dev with a data folder or socket under a file says which part is a file', async (t) => {
  t.timeout(300_000);
  const dir = await tempDir(t);
  const file = path.join(dir, 'file');
  await writeFile(file, '');
  const asFile = await runCli(['serve', '--dev', '--data-dir', file]);
  t.is(asFile.code, 1);
  t.regex(asFile.stderr, /--data-dir .*file is a file, not a folder/);
  const under = await runCli(['serve', '--dev', '--data-dir', path.join(file, 'keys')]);
  t.is(under.code, 1);
  t.regex(under.stderr, /--data-dir .*: a part of the path is a file, not a folder/);
  t.notRegex(asFile.stderr + under.stderr, /EEXIST: file already exists, mkdir|ENOTDIR: not a directory/);
});

test.serial('rewrap progress: done/total, rate and ETA', (t) => {
  t.is(formatProgress(120, 5000, 1412), 'rewrap: 120/5000 (2.4 %), 85/s ETA 58 s');
  t.is(formatProgress(5000, 5000, 60_000), 'rewrap: 5000/5000 (100.0 %), 83/s');
  t.is(formatProgress(1, 100_000, 1000), 'rewrap: 1/100000 (0.0 %), 1.0/s ETA 27.8 h');
});

test.serial('rewrap keeps a progress line on a terminal and prints one summary line in a pipe; --dry-run says "would rewrap"', async (t) => {
  t.timeout(180_000);
  const h = await startHarness(t);
  const files: string[] = [];
  for (let i = 0; i < 3; i++) {
    const e = await h.encrypt(Buffer.from(`envelope ${i}`));
    const file = path.join(h.dir, `e${i}.json`);
    await writeFile(file, `${formatEnvelopeDocument(e.ciphertext, e.key_id, e.annotations)}\n`);
    files.push(file);
  }
  await addKeyToFile(h.keyFiles.get('a')!);
  const config = path.join(h.dir, 'rewrap.yaml');
  await writeFile(config, ['quorum: 2', 'backends:', ...[...h.keyFiles].map(([name, key]) => `  - { name: ${name}, type: local, keyFile: "${key}" }`), ''].join('\n'));

  const piped = await runCli(['rewrap', '-c', config, '--dry-run', ...files], { timeoutMs: 60_000 });
  t.is(piped.code, 0, piped.stderr);
  t.notRegex(piped.stderr, /\r|ETA/, 'progress written to a pipe');
  t.regex(piped.stderr, /e0\.json: would rewrap \[/);
  t.regex(piped.stderr, /^rewrap: 3 would be rewrapped, 0 already current, 0 failed in [\d.]+ s \([\d.]+\/s\) \(dry run: nothing written\)$/m);
  t.notRegex(piped.stderr, /: rewrapped|\b3 rewrapped/, 'a dry run claims it rewrapped');

  // script(1) gives the command a terminal; its output is what the operator sees.
  const quoted = [process.execPath, MAIN, 'rewrap', '-c', config, ...files].map((a) => `'${a}'`).join(' ');
  const { stdout } = await run('script', ['-qefc', quoted, '/dev/null'], { timeout: 120_000 });
  t.regex(stdout, /rewrap: 3\/3 \(100\.0 %\), [\d.]+\/s/);
  t.true(stdout.includes('\r\u001b[K'), 'the progress line is not rewritten in place');
  t.regex(stdout, /rewrap: 3 rewrapped, 0 already current, 0 failed in /);
});
