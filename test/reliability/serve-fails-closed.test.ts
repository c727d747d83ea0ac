/**
 * Issue 10, item 9: `trousseau serve` (a real process) fails closed and always stops.
 *
 * - A listener that cannot start (the HTTP port is taken) stops the plugin promptly
 *   with a non-zero exit and a clear message, and leaves no socket behind. Before,
 *   it kept serving the socket with no HTTP listener, looked healthy, and ignored
 *   the first SIGTERM.
 * - SIGTERM during a start-up that would take long (a probe waiting on a backend that
 *   never answers) exits within the drain deadline, not after the start-up finishes.
 * - A second signal while a drain is stuck exits at once, removing the socket
 *   (before, Node's default handler killed the process and left the socket).
 */
import test from 'ava';
import { spawn } from 'node:child_process';
import { lstat, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { generateKeyFile } from '../../src/backends/local.ts';
import { call, clientsFor } from '../../src/cli/client.ts';
import type * as T from '../../src/kms/types.ts';
import { heldDecryptSetup } from '../helpers/openbao-proxy.ts';
import { MAIN, eventually, spawnServe, tempDir } from '../helpers/plugin-harness.ts';

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
  afterMs: number;
}

/** `trousseau serve ARGS` as a child process; `exit` resolves with how it ended, or `undefined` after `boundMs`. */
function serve(t: Parameters<typeof tempDir>[0], args: string[], boundMs: number) {
  const child = spawn(process.execPath, [MAIN, 'serve', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  let gone = false;
  let since = Date.now();
  const exited = new Promise<Exit>((resolve) =>
    child.once('exit', (code, signal) => {
      gone = true;
      resolve({ code, signal, afterMs: Date.now() - since });
    }),
  );
  t.teardown(() => {
    if (!gone) child.kill('SIGKILL');
  });
  return {
    child,
    get stderr() {
      return stderr;
    },
    /** Restart the clock `exit` measures from (e.g. at the signal). */
    mark: () => (since = Date.now()),
    exit: () => Promise.race([exited, new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), boundMs).unref())]),
  };
}

test('a taken HTTP port stops serve promptly: exit 1, a clear message, no socket left', async (t) => {
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'kms.sock');
  const squatter = net.createServer();
  await new Promise<void>((resolve) => squatter.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => squatter.close(() => resolve())));
  const { port } = squatter.address() as net.AddressInfo;

  t.timeout(90_000);
  // Loading the backend SDKs alone can take 20 s on a loaded machine; the old code never exited at all.
  const p = serve(t, ['--dev', '--data-dir', dir, '--socket', socketPath, '--http-listen', `127.0.0.1:${port}`], 60_000);
  const exit = await p.exit();
  t.truthy(exit, `serve was still running 60 s after it started, its HTTP listener failed:\n${p.stderr}`);
  t.is(exit?.code, 1, p.stderr);
  t.regex(p.stderr, new RegExp(`start-up failed, nothing left running: cannot listen for HTTP on 127\\.0\\.0\\.1:${port}: EADDRINUSE`));
  await t.throwsAsync(lstat(socketPath), { code: 'ENOENT' }, 'the socket was left behind');
});

test('SIGTERM during a long start-up exits within the drain deadline, without waiting for the start-up (exit 0, no socket)', async (t) => {
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'kms.sock');
  // A "Vault" that accepts connections and never answers: the start-up probe of
  // `hung` waits its full 2.9 s timeout.
  let probed = false;
  const hung = net.createServer((socket) => {
    probed = true;
    socket.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => hung.listen(0, '127.0.0.1', resolve));
  t.teardown(() => {
    hung.close();
    return undefined;
  });
  const { port } = hung.address() as net.AddressInfo;
  await generateKeyFile(path.join(dir, 'a.key'));
  await writeFile(path.join(dir, 'token'), 'not-a-real-token', { mode: 0o600 });
  await writeFile(
    path.join(dir, 'config.yaml'),
    JSON.stringify({
      socket: { path: socketPath },
      quorum: 1,
      backends: [
        { name: 'a', type: 'local', keyFile: 'a.key' },
        { name: 'hung', type: 'vault', address: `http://127.0.0.1:${port}`, keyName: 'k', auth: { method: 'token', tokenFile: 'token' }, timeoutMs: 2900 },
      ],
      shutdown: { drainTimeoutMs: 1000 },
    }),
  );
  t.timeout(90_000);
  const p = serve(t, ['--config', path.join(dir, 'config.yaml')], 8000);
  await eventually(() => (probed ? true : undefined), 60_000, 10);
  p.mark();
  p.child.kill('SIGTERM');
  const exit = await p.exit();
  t.truthy(exit, `still running 8 s after SIGTERM:\n${p.stderr}`);
  t.is(exit?.signal, null);
  t.is(exit?.code, 0, p.stderr);
  // The probe alone takes 2.9 s; the drain deadline is 1 s (the watchdog would exit 1 after 2 s).
  t.true(exit!.afterMs < 2600, `exited ${exit?.afterMs} ms after SIGTERM`);
  await t.throwsAsync(lstat(socketPath), { code: 'ENOENT' });
});

test('a second signal while the drain waits on a stuck call exits at once and removes the socket', async (t) => {
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'kms.sock');
  // A Decrypt whose unwrap is held at a proxy in front of OpenBao stays in flight.
  const { proxy, envelope, configFile } = await heldDecryptSetup(t, dir, socketPath, Buffer.from('stuck'), 20_000);
  const running = await spawnServe(t, ['--config', configFile], socketPath);
  const clients = clientsFor(socketPath);
  t.teardown(() => clients.close());
  await proxy.hold();
  const held = proxy.whenHolding();
  const decrypting = call<T.V2DecryptRequest, T.V2DecryptResponse>(
    clients.v2,
    'Decrypt',
    { ciphertext: envelope.ciphertext, uid: 'stuck', key_id: envelope.keyId, annotations: Object.fromEntries(envelope.annotations) as Record<string, Buffer> },
    10_000,
  ).catch(() => undefined);
  await held; // the unwrap reached the proxy: the Decrypt is in flight
  running.child.kill('SIGTERM');
  await eventually(() => (running.stderr.includes('shutting down') ? true : undefined), 5000);
  running.child.kill('SIGTERM');
  const exit = await Promise.race([running.exited, new Promise<'running'>((resolve) => setTimeout(() => resolve('running'), 3000).unref())]);
  t.not(exit, 'running', 'still draining 3 s after the second signal (drain deadline 20 s)');
  t.is(running.child.signalCode, null, 'killed by the signal instead of exiting');
  t.is(exit, 1);
  t.regex(running.stderr, /second SIGTERM: exiting now/);
  await t.throwsAsync(lstat(socketPath), { code: 'ENOENT' }, 'the socket was left behind');
  await decrypting;
});
