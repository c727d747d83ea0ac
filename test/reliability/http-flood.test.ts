/**
 * Issue 10, item 4: a flood of the HTTP port never takes the KMS socket down.
 *
 * Two unprivileged processes (uid 65534, their open-file limit raised as root before
 * dropping privileges) open 21,000 TCP connections to the plugin's HTTP port and hold
 * every one the plugin keeps open. The plugin runs with 4,096 descriptors. Before, it
 * accepted them all until it ran out of descriptors, and a new gRPC connection (a
 * restarted apiserver) failed with EMFILE. Now at most `httpMaxConnections` (32) are
 * kept, the rest are closed as they are accepted, and Encrypt/Decrypt over fresh
 * connections keep succeeding throughout.
 */
import test from 'ava';
import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { call, clientsFor } from '../../src/cli/client.ts';
import type * as T from '../../src/kms/types.ts';
import { MAIN, canConnect, eventually, sleep, tempDir } from '../helpers/plugin-harness.ts';
import { runAsNobody } from '../helpers/unprivileged.ts';

const PLUGIN_FDS = 4096;
const ATTACKERS = 2;
const CONNECTIONS_EACH = 10_500;
const PARALLEL_EACH = 400;
/** Hard bound on the flood itself. */
const FLOOD_MS = 45_000;

/** Opens `total` connections, `parallel` at a time, holding each one the server keeps; prints a JSON summary. */
const ATTACK = `
const net = require('net');
const [port, total, parallel, budgetMs] = process.argv.slice(1).map(Number);
const end = Date.now() + budgetMs;
let started = 0, connected = 0, closedByServer = 0, failed = 0, open = 0, maxOpen = 0, slots = parallel;
const finish = () => { console.log(JSON.stringify({ started, connected, closedByServer, failed, maxOpen, open })); setTimeout(() => process.exit(0), 2000); };
function slot() {
  if (started >= total || Date.now() > end) { if (--slots === 0) finish(); return; }
  started++;
  let connectedHere = false, moved = false;
  const next = () => { if (!moved) { moved = true; setImmediate(slot); } };
  const s = net.connect(port, '127.0.0.1');
  s.setTimeout(5000, () => { if (!connectedHere) { failed++; s.destroy(); next(); } });
  s.on('connect', () => { connectedHere = true; connected++; open++; maxOpen = Math.max(maxOpen, open); next(); });
  s.on('end', () => { closedByServer++; s.destroy(); });
  s.on('error', () => { if (!connectedHere) { failed++; next(); } });
  s.on('close', () => { if (connectedHere) open--; });
}
for (let i = 0; i < parallel; i++) slot();
`;

interface AttackSummary {
  started: number;
  connected: number;
  closedByServer: number;
  failed: number;
  maxOpen: number;
}

test('21,000 connections to the HTTP port from unprivileged users: Encrypt/Decrypt over new connections keep succeeding', async (t) => {
  t.timeout(120_000);
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'kms.sock');
  const probe = net.createServer();
  await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const { port } = probe.address() as net.AddressInfo;
  await new Promise<void>((resolve) => probe.close(() => resolve()));

  const plugin = spawn(
    'prlimit',
    [`--nofile=${PLUGIN_FDS}:${PLUGIN_FDS}`, '--', process.execPath, MAIN, 'serve', '--dev', '--data-dir', dir, '--socket', socketPath, '--http-listen', `127.0.0.1:${port}`, '--log-level', 'warn'],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  plugin.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise((resolve) => plugin.once('exit', resolve));
  t.teardown(async () => {
    plugin.kill('SIGTERM');
    await exited;
  });
  await eventually(() => canConnect(socketPath).then((ok) => ok || undefined), 60_000, 50);
  const pid = plugin.pid!; // prlimit execs the command: same process
  const fds = () => readdirSync(`/proc/${pid}/fd`).length;

  const attackers = Array.from({ length: ATTACKERS }, () =>
    runAsNobody(t, ATTACK, { args: [String(port), String(CONNECTIONS_EACH), String(PARALLEL_EACH), String(FLOOD_MS)], fdLimit: CONNECTIONS_EACH + 1000 }),
  );
  const summaries = Promise.all(attackers.map(async (a) => {
    await a.exited;
    return JSON.parse(a.stdout.trim().split('\n').pop() ?? '{}') as AttackSummary;
  }));
  let flooding = true;
  void summaries.finally(() => (flooding = false));

  // Meanwhile: a fresh connection for every round (as a restarted apiserver would), an Encrypt and a Decrypt on it.
  let rounds = 0;
  let maxFds = 0;
  const failures: string[] = [];
  while (flooding) {
    maxFds = Math.max(maxFds, fds());
    const clients = clientsFor(socketPath);
    try {
      const plaintext = Buffer.from(`round ${rounds}`);
      const encrypted = await call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext, uid: 'flood' }, 3000);
      const decrypted = await call<T.V2DecryptRequest, T.V2DecryptResponse>(
        clients.v2,
        'Decrypt',
        { ciphertext: encrypted.ciphertext, uid: 'flood', key_id: encrypted.key_id, annotations: encrypted.annotations },
        3000,
      );
      if (!decrypted.plaintext.equals(plaintext)) failures.push(`round ${rounds}: wrong plaintext`);
    } catch (error) {
      failures.push(`round ${rounds}: ${(error as Error).message}`);
    } finally {
      clients.close();
    }
    rounds += 1;
    await sleep(100);
  }
  const results = await summaries;
  const started = results.reduce((n, r) => n + r.started, 0);
  const connected = results.reduce((n, r) => n + r.connected, 0);
  const heldAtOnce = results.reduce((n, r) => n + r.maxOpen, 0);
  t.log(`attack: ${started} connections started, ${connected} connected, at most ${heldAtOnce} open at once; plugin: at most ${maxFds} descriptors; ${rounds} Encrypt+Decrypt rounds`);
  t.true(connected >= 20_000, `only ${connected} connections were made: the test did not flood`);
  t.true(rounds >= 10, `only ${rounds} rounds ran during the flood`);
  t.deepEqual(failures.slice(0, 5), [], `${failures.length} of ${rounds} rounds failed during the flood`);
  t.true(maxFds < PLUGIN_FDS / 4, `the plugin held ${maxFds} descriptors of ${PLUGIN_FDS}`);
  // The HTTP endpoints themselves come back once the flood ends.
  const health = await eventually(() => fetch(`http://127.0.0.1:${port}/healthz`).then((r) => (r.ok ? r.status : undefined), () => undefined), 15_000, 200);
  t.is(health, 200);
  t.notRegex(stderr, /EMFILE/);
});
