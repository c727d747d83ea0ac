/**
 * The zero-loss soak (test/chaos/soak.ts) with its short profile, so every test run
 * covers it: faults cycle across the three real backends while clients Encrypt and
 * Decrypt, then each backend alone must decrypt every envelope holding its copy.
 * The longer profiles run with `npm run chaos -- --profile ci|long`.
 */
import { spawn } from 'node:child_process';
import path from 'node:path';
import test from 'ava';
import { chaosServers, repoRoot } from './rig.ts';

const found = chaosServers();
if ('missing' in found) {
  const reason = `real servers missing (${found.missing.join(', ')}): start them with test/servers/up.sh openbao local-kms lowkey-vault`;
  if (process.env.CI) throw new Error(reason);
  console.error(`\n!!! ${reason} (chaos soak is SKIPPED)\n`);
  test.skip('chaos soak (short profile) against the real servers', () => {});
} else {
  test('chaos soak, short profile: lost=0, no unexpected error code, the plugin survives', async (t) => {
    t.timeout(180_000);
    const child = spawn(process.execPath, [path.join(repoRoot, 'test', 'chaos', 'soak.ts'), '--profile', 'short'], {
      cwd: repoRoot,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-20_000)));
    const killer = setTimeout(() => child.kill('SIGKILL'), 170_000);
    t.teardown(() => {
      clearTimeout(killer);
      if (child.exitCode === null) child.kill('SIGKILL');
    });
    const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
    const summary = stdout.split('\n').find((l) => l.startsWith('chaos-soak')) ?? '';
    const lines = stderr.trim().split('\n');
    t.log([...lines.filter((l) => l.includes('failed with')).slice(0, 10), ...lines.slice(-20)].join('\n'));
    t.log(summary);
    t.regex(summary, /\blost=0\b/);
    t.regex(summary, /\bunexpected=\{\}/);
    t.regex(summary, /\bcrashed=0\b/);
    t.regex(summary, /\boverclaimed=0\b/);
    // Client-visible guarantees under a single fault: Decrypt works while a copy is
    // readable (failover across every copy within 2.5 s). Encrypt works while quorum
    // is reachable, but with one backend down a single 400 ms timeout of another one
    // fails it (no retry inside an Encrypt, by design), which a loaded CI machine can
    // cause: allow 1 % of Encrypts.
    t.regex(summary, /\breadable_decrypt_errors=0\b/);
    const quorumErrors = Number(/\bquorum_encrypt_errors=(\d+)/.exec(summary)?.[1] ?? NaN);
    const encrypts = Number(/\bencrypt=OK:(\d+)/.exec(summary)?.[1] ?? NaN);
    t.true(quorumErrors <= Math.max(3, encrypts / 100), `${quorumErrors} Encrypt failures with one backend down`);
    t.is(code, 0, stderr.slice(-2000));
  });
}
