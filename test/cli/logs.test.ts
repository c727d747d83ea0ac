/**
 * What the real plugin writes, read as a log collector reads it: in json mode every
 * line of stdout and stderr is one JSON object (grpc-js's own lines included, which
 * GRPC_TRACE turns on), with no key written twice; in text mode every line has klog's
 * layout. The text-mode run uses `npm run dev`'s own flags followed by overrides, the
 * documented way to move the dev socket, data folder and HTTP port.
 */
import test, { type ExecutionContext } from 'ava';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { lstat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { call, clientsFor } from '../../src/cli/client.ts';
import { generateKeyFile } from '../../src/backends/local.ts';
import type * as T from '../../src/kms/types.ts';
import { canConnect, eventually, MAIN, tempDir } from '../helpers/plugin-harness.ts';
import { requireServer, requireVar } from '../helpers/servers.ts';

const root = path.resolve(import.meta.dirname, '../..');

interface Run {
  stdout: string;
  stderr: string;
  code: number | null;
}

/** Serve with ARGS until the socket answers, make one Encrypt and one Status call, then SIGTERM. */
async function serveOnce(t: ExecutionContext, args: string[], socketPath: string, env: Record<string, string> = {}): Promise<Run> {
  t.timeout(120_000);
  const child = spawn(process.execPath, [MAIN, ...args], { cwd: root, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
  let gone = false;
  void exited.then(() => (gone = true));
  t.teardown(() => {
    if (!gone) child.kill('SIGKILL');
  });
  await eventually(async () => {
    if (gone) throw new Error(`serve exited early:\n${stderr}`);
    const info = await lstat(socketPath).catch(() => undefined);
    return info?.isSocket() && (await canConnect(socketPath)) ? true : undefined;
  }, 60_000, 50);
  const clients = clientsFor(socketPath);
  try {
    await call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext: Buffer.from('log test'), uid: 'logs' }, 30_000);
    await call(clients.admin, 'Status', {}, 30_000);
  } finally {
    clients.close();
  }
  child.kill('SIGTERM');
  const code = await exited;
  // The streams may still hold the last lines when the process is gone.
  await new Promise((resolve) => setImmediate(resolve));
  return { stdout, stderr, code };
}

const linesOf = (text: string) => text.split('\n').filter((l) => l !== '');

test.serial('json mode: every line the plugin writes is a JSON object, grpc-js lines included, and no Vault line names its backend twice', async (t) => {
  const server = requireServer('openbao');
  if ('missing' in server) {
    t.pass(server.missing);
    return;
  }
  const dir = await tempDir(t);
  await generateKeyFile(path.join(dir, 'a.key'));
  const socketPath = path.join(dir, 'kms.sock');
  const config = [
    `socket:`,
    `  path: ${socketPath}`,
    'quorum: 2',
    'backends:',
    '  - name: a',
    '    type: local',
    '    keyFile: a.key',
    '  - name: bao',
    '    type: vault',
    `    address: ${requireVar(server.env, 'VAULT_ADDR', 'openbao')}`,
    `    keyName: ${requireVar(server.env, 'VAULT_KEY_NAME', 'openbao')}`,
    '    auth:',
    '      method: approle',
    `      roleIdFile: ${requireVar(server.env, 'VAULT_APPROLE_ROLE_ID_FILE', 'openbao')}`,
    `      secretIdFile: ${requireVar(server.env, 'VAULT_APPROLE_SECRET_ID_FILE', 'openbao')}`,
  ].join('\n');
  await writeFile(path.join(dir, 'trousseau.yaml'), `${config}\n`);
  // GRPC_TRACE makes grpc-js log through its own logger: plain text unless it is routed.
  const run = await serveOnce(t, ['serve', '-c', path.join(dir, 'trousseau.yaml'), '--log-level', 'debug'], socketPath, {
    GRPC_VERBOSITY: 'DEBUG',
    GRPC_TRACE: 'server,channel',
  });
  t.is(run.code, 0, run.stderr);
  const lines = [...linesOf(run.stdout), ...linesOf(run.stderr)];
  t.true(lines.length > 5, run.stderr);
  const parsed = lines.map((line) => {
    try {
      return JSON.parse(line) as Record<string, unknown>;
    } catch {
      t.fail(`not a JSON line: ${line.slice(0, 200)}`);
      return {};
    }
  });
  for (const entry of parsed) {
    t.is(typeof entry.level, 'string');
    t.is(typeof entry.msg, 'string');
  }
  t.true(
    parsed.some((e) => e.source === 'grpc'),
    'no grpc-js line reached the logger',
  );
  const login = lines.filter((l) => l.includes('"logged in to vault"'));
  t.true(login.length > 0, 'the Vault backend logged no login');
  for (const line of lines.filter((l) => l.includes('"kind":"vault"'))) {
    t.is(line.match(/"backend":/g)?.length, 1, `"backend" written twice: ${line}`);
  }
});

test.serial('text mode with npm run dev\'s flags and later overrides: klog layout on every line, the overriding socket and port are used', async (t) => {
  const dir = await tempDir(t);
  const scripts = (JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts;
  // "[VAR=value] node FLAGS bin/trousseau.js serve --dev ..." -> the arguments from serve on.
  const words = scripts.dev!.split(' ');
  const devArgs = words.slice(words.indexOf('serve'));
  t.is(devArgs[0], 'serve', scripts.dev);
  t.true(devArgs.includes('--socket') && devArgs.includes('--http-listen'), scripts.dev);
  const socketPath = path.join(dir, 'dev.sock');
  const run = await serveOnce(
    t,
    [...devArgs, '--socket', socketPath, '--data-dir', path.join(dir, 'keys'), '--http-listen', '127.0.0.1:0', '--log-format', 'text', '-v', '4'],
    socketPath,
  );
  t.is(run.code, 0, run.stderr);
  const lines = [...linesOf(run.stdout), ...linesOf(run.stderr)];
  t.true(lines.length > 3, run.stderr);
  for (const line of lines) t.regex(line, /^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ trousseau\] "[^"]*"( [A-Za-z]+=\S.*)?$/, line);
  t.regex(run.stderr, new RegExp(`"serving KMS v2 and v1beta1" socket="${socketPath.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}"`));
  t.regex(run.stderr, /created development key file/);
  t.regex(run.stderr, /level="debug"/, '-v 4 did not turn on debug lines');
});
