/**
 * deploy/node/trousseau-node, the runbooks' way to run the CLI on a node. There is no
 * container runtime here, so `crictl` is a stand-in script (CRICTL) that plays a
 * runtime with one plugin container: `ps` lists it, `stop` replaces it with a new id
 * (as the kubelet would restart it), and `exec ID node /app/bin/trousseau.js ...` runs
 * this checkout's real CLI. What is tested is the wrapper's own logic: the exact
 * crictl forms it uses, stdin passing through, the exit status of the CLI, and that
 * `restart` waits for a new container and for /readyz of a real plugin.
 */
import { execFile, spawn } from 'node:child_process';
import { readFile, writeFile, chmod } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import test from 'ava';
import { startHarness, tempDir } from '../helpers/plugin-harness.ts';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const SCRIPT = path.join(root, 'deploy/node/trousseau-node');

/** A crictl stand-in: state in DIR/state (the running id), every call logged to DIR/calls. */
async function fakeCrictl(dir: string): Promise<string> {
  const file = path.join(dir, 'crictl');
  await writeFile(path.join(dir, 'state'), 'aaaa1111\n');
  await writeFile(
    file,
    `#!/usr/bin/env bash
set -euo pipefail
dir=${JSON.stringify(dir)}
echo "$*" >>"$dir/calls"
case "$1" in
  ps) cat "$dir/state" ;;
  stop) echo bbbb2222 >"$dir/state"; echo "$3" ;;
  exec)
    shift
    [ "$1" = -i ] && shift
    [ "$1" = -t ] && shift
    [ "$1" = "$(cat "$dir/state")" ] || { echo "no such container $1" >&2; exit 1; }
    shift
    [ "$1 $2" = "node /app/bin/trousseau.js" ] || { echo "unexpected command $*" >&2; exit 1; }
    shift 2
    exec ${JSON.stringify(process.execPath)} ${JSON.stringify(path.join(root, 'bin/trousseau.js'))} "$@"
    ;;
  *) echo "unexpected crictl $*" >&2; exit 1 ;;
esac
`,
  );
  await chmod(file, 0o755);
  return file;
}

test('trousseau-node runs the CLI in the running plugin container: status over the socket, stdin through, the CLI exit status back', async (t) => {
  const h = await startHarness(t, { backends: ['a', 'b'], quorum: 2 });
  const dir = await tempDir(t);
  const crictl = await fakeCrictl(dir);
  const env = { ...process.env, CRICTL: crictl };

  const status = await run(SCRIPT, ['status', '-s', h.socketPath, '--json'], { env, timeout: 60_000 });
  const report = JSON.parse(status.stdout) as { healthy: boolean; backends: { name: string }[] };
  t.true(report.healthy);
  t.deepEqual(report.backends.map((b) => b.name).sort(), ['a', 'b']);
  const calls = (await readFile(path.join(dir, 'calls'), 'utf8')).trim().split('\n');
  t.is(calls[0], "ps --name ^trousseau$ --label io.kubernetes.pod.namespace=kube-system --state running -q");
  t.is(calls[1], `exec -i aaaa1111 node /app/bin/trousseau.js status -s ${h.socketPath} --json`);

  // stdin reaches the CLI (encrypt | decrypt as in the runbooks).
  const envelope = await new Promise<string>((resolve, reject) => {
    const child = spawn(SCRIPT, ['encrypt', '-s', h.socketPath], { env });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`exit ${code}`))));
    child.stdin.end('a secret value');
  });
  t.regex(envelope, /ciphertext/);
  const plain = await new Promise<string>((resolve, reject) => {
    const child = spawn(SCRIPT, ['decrypt', '-s', h.socketPath], { env });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`exit ${code}`))));
    child.stdin.end(envelope);
  });
  t.is(plain, 'a secret value');

  // The CLI's exit status comes back: status exits non-zero on a socket nothing serves.
  const error = await t.throwsAsync(run(SCRIPT, ['status', '-s', path.join(dir, 'none.sock')], { env, timeout: 60_000 }));
  t.not((error as { code?: number }).code, 0);
});

test('trousseau-node restart stops the container, waits for a new one and for /readyz', async (t) => {
  const dir = await tempDir(t);
  const crictl = await fakeCrictl(dir);
  let readyCalls = 0;
  const server = http.createServer((_request, response) => {
    readyCalls++;
    // Not ready for the first two probes, as a plugin still starting.
    response.writeHead(readyCalls > 2 ? 200 : 503).end();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const { port } = server.address() as AddressInfo;

  const result = await run(SCRIPT, ['restart'], { env: { ...process.env, CRICTL: crictl, TROUSSEAU_READYZ: `http://127.0.0.1:${port}/readyz` }, timeout: 120_000 });
  t.regex(result.stderr, /stopped aaaa1111/);
  t.regex(result.stderr, /running bbbb2222/);
  t.regex(result.stderr, /ready/);
  t.true(readyCalls >= 3);
  const calls = (await readFile(path.join(dir, 'calls'), 'utf8')).trim().split('\n');
  t.true(calls.includes('stop --timeout 30 aaaa1111'), calls.join('\n'));
});

test('trousseau-node says so when no plugin container runs on the node', async (t) => {
  const dir = await tempDir(t);
  const crictl = await fakeCrictl(dir);
  await writeFile(path.join(dir, 'state'), '');
  const error = await t.throwsAsync(run(SCRIPT, ['status'], { env: { ...process.env, CRICTL: crictl }, timeout: 30_000 }));
  t.regex((error as { stderr?: string }).stderr ?? '', /no running container named trousseau in namespace kube-system on this node/);
});
