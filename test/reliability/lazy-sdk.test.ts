/**
 * A plugin loads only the SDKs of the backend types it is configured with
 * (src/backends/definition.ts): `serve --dev`, three local backends, must not load the
 * Vault, AWS or Azure SDK, which cost ~90 MiB of RSS and most of the start-up time.
 * The control starts one backend of each type (against addresses where nothing
 * listens: loading the SDK needs no server) and sees every SDK loaded, so the
 * recording itself is proven to see them.
 */
import test, { type ExecutionContext } from 'ava';
import { spawn } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { generateKeyFile } from '../../src/backends/local.ts';
import { call, clientsFor } from '../../src/cli/client.ts';
import { MAIN, eventually, tempDir } from '../helpers/plugin-harness.ts';

const repoRoot = path.resolve(import.meta.dirname, '../..');
const RECORDER = path.join(repoRoot, 'test', 'helpers', 'record-modules.ts');
const SDKS = { vault: '/node_modules/node-vault/', aws: '/node_modules/@aws-sdk/', azure: '/node_modules/@azure/' };

/** Serve with `args` until the socket answers Status, stop, and return the packages of every module loaded. */
async function modulesLoadedBy(t: ExecutionContext, dir: string, args: string[]): Promise<string[]> {
  const socketPath = path.join(dir, 'kms.sock');
  const record = path.join(dir, 'modules.txt');
  const child = spawn(process.execPath, ['--import', RECORDER, MAIN, 'serve', '--socket', socketPath, '--log-level', 'error', ...args], {
    cwd: repoRoot,
    env: { ...process.env, RECORD_MODULES_FILE: record },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  t.teardown(() => void (child.exitCode === null && child.kill('SIGKILL')));
  const clients = clientsFor(socketPath);
  try {
    // Status answers (an error counts: below quorum is an answer) once the socket serves.
    await eventually(async () => {
      if (child.exitCode !== null) throw new Error(`serve exited early:\n${stderr}`);
      return call(clients.v2, 'Status', {}, 2000).then(
        () => true,
        (error: { code?: number }) => (error.code === 14 ? undefined : true),
      );
    }, 60_000, 100);
  } finally {
    clients.close();
  }
  child.kill('SIGTERM');
  t.is(await exited, 0, stderr);
  return (await readFile(record, 'utf8')).split('\n').filter(Boolean);
}

const loadedSdks = (urls: string[]) => Object.entries(SDKS).filter(([, marker]) => urls.some((url) => url.includes(marker))).map(([type]) => type);

test('serve --dev (three local backends) loads no Vault, AWS or Azure SDK', async (t) => {
  const dir = await tempDir(t);
  const urls = await modulesLoadedBy(t, dir, ['--dev', '--data-dir', path.join(dir, 'keys')]);
  t.true(urls.some((url) => url.includes('/node_modules/@grpc/grpc-js/')), 'the recording sees the modules serving needs');
  t.deepEqual(loadedSdks(urls), [], 'SDKs of backend types that are not configured were loaded');
});

test('control: a configuration with one backend of each type loads every SDK', async (t) => {
  const dir = await tempDir(t);
  await generateKeyFile(path.join(dir, 'local.key'));
  await writeFile(path.join(dir, 'vault-token'), 'not-a-token\n', { mode: 0o600 });
  const nowhere = '127.0.0.1:9';
  const config = {
    quorum: 1,
    backends: [
      { name: 'local', type: 'local', keyFile: 'local.key' },
      { name: 'vault', type: 'vault', address: `http://${nowhere}`, keyName: 'k', timeoutMs: 200, auth: { method: 'token', tokenFile: 'vault-token' } },
      { name: 'aws', type: 'aws', keyId: 'alias/k', region: 'us-east-1', endpoint: `http://${nowhere}`, timeoutMs: 200 },
      { name: 'azure', type: 'azure', vaultUrl: `https://${nowhere}`, keyName: 'k', timeoutMs: 200, credential: { method: 'managedIdentity' } },
    ],
  };
  await writeFile(path.join(dir, 'config.yaml'), JSON.stringify(config));
  const urls = await modulesLoadedBy(t, dir, ['--config', path.join(dir, 'config.yaml')]);
  t.deepEqual(loadedSdks(urls), ['vault', 'aws', 'azure']);
});
