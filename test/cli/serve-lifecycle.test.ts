/**
 * `trousseau serve` as a real child process: SIGTERM drains an in-flight Decrypt and
 * exits 0 without leaving the socket, and the core issue's "done when" scenario
 * (lose two of three dev key files, keep reading, never recreate them).
 */
import test from 'ava';
import { spawn } from 'node:child_process';
import { lstat, readdir, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { status } from '@grpc/grpc-js';
import { generateKeyFile } from '../../src/backends/local.ts';
import { call, clientsFor } from '../../src/cli/client.ts';
import type * as T from '../../src/kms/types.ts';
import { heldDecryptSetup, openbaoBehindProxy } from '../helpers/openbao-proxy.ts';
import { MAIN, eventually, grpcError, spawnServe, tempDir } from '../helpers/plugin-harness.ts';

test.serial('SIGTERM while a Decrypt is in flight: the call completes, the process exits 0, the socket is removed', async (t) => {
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'kms.sock');
  // The only backend is OpenBao behind a proxy that holds the Decrypt's unwrap until
  // the test releases it: the call stays in flight, deterministically.
  const plaintext = Buffer.from('in flight across SIGTERM');
  const { proxy, envelope, configFile } = await heldDecryptSetup(t, dir, socketPath, plaintext, 5000);
  const serve = await spawnServe(t, ['--config', configFile], socketPath);
  const clients = clientsFor(socketPath);
  t.teardown(() => clients.close());

  await proxy.hold();
  const held = proxy.whenHolding();
  const decrypting = call<T.V2DecryptRequest, T.V2DecryptResponse>(
    clients.v2,
    'Decrypt',
    { ciphertext: envelope.ciphertext, uid: 'drain', key_id: envelope.keyId, annotations: Object.fromEntries(envelope.annotations) as Record<string, Buffer> },
    10_000,
  );
  await held; // the unwrap reached the server: the Decrypt is in flight
  serve.child.kill('SIGTERM');
  await eventually(() => (serve.stderr.includes('shutting down') ? true : undefined), 5000);
  t.regex(serve.stderr, /"inFlight":1[,}].*shutting down/);
  await proxy.pass();

  const response = await decrypting;
  t.deepEqual(response.plaintext, plaintext);
  t.is(await serve.exited, 0);
  await t.throwsAsync(lstat(socketPath), { code: 'ENOENT' });
});

test.serial('done when: dev mode survives losing two of three key files, Decrypt works, Encrypt is UNAVAILABLE, nothing is recreated', async (t) => {
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'kms.sock');
  const args = ['--dev', '--data-dir', dir, '--socket', socketPath, '--log-level', 'warn'];

  let serve = await spawnServe(t, args, socketPath);
  let clients = clientsFor(socketPath);
  const plaintext = Buffer.from('written with three local keys');
  const envelope = await call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext, uid: 'done-when' });
  const first = await call<object, T.V2StatusResponse>(clients.v2, 'Status', {});
  t.is(envelope.key_id, first.key_id);
  clients.close();
  t.is(await serve.terminate(), 0);
  await t.throwsAsync(lstat(socketPath), { code: 'ENOENT' });
  t.deepEqual((await readdir(dir)).sort(), ['.keys-initialised', 'local-a.key', 'local-b.key', 'local-c.key']);

  await rm(path.join(dir, 'local-b.key'));
  await rm(path.join(dir, 'local-c.key'));

  serve = await spawnServe(t, args, socketPath);
  clients = clientsFor(socketPath);
  t.teardown(() => clients.close());
  const decrypted = await call<T.V2DecryptRequest, T.V2DecryptResponse>(clients.v2, 'Decrypt', {
    ciphertext: envelope.ciphertext,
    uid: 'done-when',
    key_id: envelope.key_id,
    annotations: envelope.annotations,
  });
  t.deepEqual(decrypted.plaintext, plaintext);
  const error = await grpcError(t, call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext, uid: 'done-when' }));
  t.is(error.code, status.UNAVAILABLE);
  // Started below quorum: no key_id is announced (a new one would make the apiserver
  // call an Encrypt that cannot succeed), docs/design/key-id-and-health.md.
  const statusError = await grpcError(t, call<object, T.V2StatusResponse>(clients.v2, 'Status', {}));
  t.is(statusError.code, status.UNAVAILABLE);
  t.regex(statusError.details, /below quorum/);
  t.deepEqual((await readdir(dir)).filter((f) => f.endsWith('.key')), ['local-a.key'], 'deleted key files were recreated');
  clients.close();
  t.is(await serve.terminate(), 0);
  t.deepEqual((await readdir(dir)).sort(), ['.keys-initialised', 'local-a.key']);
});

test.serial('SIGTERM while the plugin is still starting: it abandons the start and shuts down cleanly (exit 0, no socket left)', async (t) => {
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'kms.sock');
  // The start-up probe of `slow` blocks at a proxy in front of OpenBao that holds it
  // (until the probe's timeout), so the plugin is provably mid-start when the signal
  // arrives.
  const { proxy, backend } = await openbaoBehindProxy(t, 1500);
  await proxy.hold();
  const held = proxy.whenHolding();
  await generateKeyFile(path.join(dir, 'a.key'));
  await writeFile(
    path.join(dir, 'config.yaml'),
    JSON.stringify({
      socket: { path: socketPath },
      quorum: 1,
      backends: [
        { name: 'a', type: 'local', keyFile: 'a.key' },
        backend,
      ],
    }),
  );
  const child = spawn(process.execPath, [MAIN, 'serve', '--config', path.join(dir, 'config.yaml')], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  t.teardown(() => child.kill('SIGKILL'));
  await held; // the start-up probe is blocked: the plugin is starting
  child.kill('SIGTERM');
  const { code, signal } = await exited;
  t.is(signal, null, `killed by ${signal ?? ''} instead of shutting down:\n${stderr}`);
  t.is(code, 0, stderr);
  await t.throwsAsync(lstat(socketPath), { code: 'ENOENT' });
});
