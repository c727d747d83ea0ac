/**
 * Issue 10, item 2: the socket path stops leading to the plugin while it runs.
 *
 * A local user who can write the socket's folder moves the socket aside and binds
 * their own: the apiserver's next Encrypt would hand them its plaintext. The start-up
 * check refuses such a folder, so here it becomes writable only after the start (an
 * operator's chmod); the running `trousseau serve` must notice within seconds, log
 * an error and report not-ready on /readyz.
 */
import test from 'ava';
import { chmod } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { eventually, spawnServe, tempDir } from '../helpers/plugin-harness.ts';
import { openForTraversal, runAsNobody } from '../helpers/unprivileged.ts';

async function freePort(): Promise<number> {
  const probe = net.createServer();
  await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const { port } = probe.address() as net.AddressInfo;
  await new Promise<void>((resolve) => probe.close(() => resolve()));
  return port;
}

test('a socket swapped for an attacker\'s own is detected: error logged, /readyz not ready with a short reason', async (t) => {
  const dir = await tempDir(t);
  await openForTraversal(dir);
  const run = path.join(dir, 'run');
  const socketPath = path.join(run, 'kms.sock');
  const port = await freePort();
  const serve = await spawnServe(t, ['--dev', '--data-dir', path.join(dir, 'data'), '--socket', socketPath, '--http-listen', `127.0.0.1:${port}`], socketPath);
  const readyz = async () => {
    const response = await fetch(`http://127.0.0.1:${port}/readyz`);
    return { status: response.status, body: (await response.json()) as { ready: boolean; reasons: string[] } };
  };
  t.is((await readyz()).status, 200);

  await chmod(run, 0o777);
  const attacker = runAsNobody(
    t,
    `const fs = require('fs'), net = require('net');
     const sock = process.argv[1];
     fs.renameSync(sock, sock + '.moved');
     net.createServer((c) => c.destroy()).listen(sock, () => console.log('listening'));
     setTimeout(() => process.exit(0), 15000);`,
    { args: [socketPath] },
  );
  await eventually(() => (attacker.stdout.includes('listening') ? true : attacker.stderr ? Promise.reject(new Error(attacker.stderr)) : undefined), 10_000);

  // Polled every second, and checked on every readiness question.
  const seen = await eventually(async () => {
    const r = await readyz();
    return r.status === 503 ? r : undefined;
  }, 5000, 100);
  t.false(seen.body.ready);
  t.true(seen.body.reasons.includes('the socket path was replaced by another file'), JSON.stringify(seen.body.reasons));
  t.false(seen.body.reasons.some((r) => r.includes('/')), 'reasons are shown to any local user: no paths');
  await eventually(() => (serve.stderr.includes('clients dialling it no longer reach this plugin') ? true : undefined), 3000);
  t.regex(serve.stderr, /"level":"error".*the socket path was replaced by another file/);
});
