/**
 * Local key files under a hostile or careless node (issue 10, item 14). A key file
 * that changes under a running plugin is read only if it passes every check; one that
 * fails is refused, the keys loaded before stay for unwrapping, new wraps are refused
 * and the probe, the status and an error log line say why. Decoding is strict.
 * Attacks by an unprivileged user run as uid 65534 (setpriv).
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmod, lstat, mkdir, readFile, readdir, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import test from 'ava';
import { generateKeyFile, loadKeyRing, localKeyVersion } from '../../src/backends/local.ts';
import { probeBackend } from '../../src/engine/health-probe.ts';
import { MAIN, tempDir } from '../helpers/plugin-harness.ts';
import { asNobody, guardedLocal, never } from '../helpers/local-keys.ts';

/** Run a command to its end without blocking the event loop (other tests' timers run meanwhile). */
async function run(command: string, args: string[]): Promise<{ status: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(command, args, { encoding: 'utf8' });
    return { status: 0, stdout, stderr };
  } catch (error) {
    const failed = error as { code?: number; stdout?: string; stderr?: string };
    return { status: typeof failed.code === 'number' ? failed.code : -1, stdout: failed.stdout ?? '', stderr: failed.stderr ?? '' };
  }
}

const context = { envelopeId: Buffer.alloc(16, 7), backendName: 'a' };

/** Change one base64 character of the key on `lineIndex` (counting key lines only) to another valid one. */
async function flipKeyCharacter(file: string, keyLine = 0, at = 10): Promise<void> {
  const lines = (await readFile(file, 'utf8')).split('\n');
  const index = lines.map((l, i) => [l, i] as const).filter(([l]) => l.trim() !== '' && !l.startsWith('#'))[keyLine]![1];
  const line = lines[index]!;
  const flipped = line[at] === 'A' ? 'B' : 'A';
  lines[index] = line.slice(0, at) + flipped + line.slice(at + 1);
  await writeFile(file, lines.join('\n'));
}

const keyLines = async (file: string) => (await readFile(file, 'utf8')).split('\n').filter((l) => l.trim() !== '' && !l.startsWith('#'));

test('a flipped base64 character in a running key file is refused: old key kept for unwrapping, wraps refused, probe and log say why', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.key');
  const version = await generateKeyFile(file);
  const { backend, guarded, log } = guardedLocal('a', file);
  t.true((await probeBackend(guarded, never)).ok);
  const secretLine = (await keyLines(file))[0]!;
  const copy = await backend.wrap(Buffer.alloc(32, 1), context);

  await flipKeyCharacter(file);
  const refused = await t.throwsAsync(backend.currentKeyVersion());
  t.regex(refused.message, /line 1 fails its check value: the key is damaged/);
  t.is((refused as { code?: string }).code, 'BACKEND_REJECTED', 'the key, not reachability: the breaker must stay closed so old copies open');
  // The old key is still there for the envelopes it wrapped; it wraps nothing new.
  t.deepEqual(Buffer.from(await backend.unwrap(copy.wrapped, version, context)), Buffer.alloc(32, 1));
  await t.throwsAsync(backend.wrap(Buffer.alloc(32, 2), context), { message: /new wraps refused until the key file is fixed/ });
  // Visible: the probe fails (status, backend_up), the breaker stays closed, an error is logged once.
  const probe = await probeBackend(guarded, never);
  t.false(probe.ok);
  guarded.recordProbe(probe.ok, probe.error);
  t.like(guarded.health(), { probeOk: false, lastError: 'BACKEND_REJECTED', breaker: 'closed', keyVersion: version });
  const errors = log.lines().filter((l) => l.level === 'error');
  t.is(errors.length, 1, log.text());
  t.regex(errors[0]!.msg, /keys loaded before are kept/);
  t.false(log.text().includes(secretLine.split(' ')[0]!.slice(0, 20)), 'the log holds key material');

  // Put it back: accepted again, same version.
  await writeFile(file, `${secretLine}\n`);
  t.is(await backend.currentKeyVersion(), version);
  t.true((await probeBackend(guarded, never)).ok);
});

test('an older key file (no check values) still loads with a warning; a damaged line in it is never adopted as a rotation', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'legacy.key');
  const key = randomBytes(32);
  await writeFile(file, `${key.toString('base64')}\n`, { mode: 0o600 });
  const { backend, log } = guardedLocal('a', file);
  t.is(await backend.currentKeyVersion(), localKeyVersion(key));
  t.true(log.lines().some((l) => l.level === 'warn' && /no check value/.test(l.msg)));

  await flipKeyCharacter(file);
  await t.throwsAsync(backend.currentKeyVersion(), { message: /line 1 holds a new key without a check value/ });
  // Restored after --add-checks (same key, now with its check value): taken at once.
  const restored = path.join(dir, 'restored.key');
  await writeFile(restored, `${key.toString('base64')}\n`, { mode: 0o600 });
  const checked = await run(process.execPath, [MAIN, 'keygen', '--add-checks', restored]);
  t.is(checked.status, 0, checked.stderr);
  t.deepEqual(await keyLines(restored), [`${key.toString('base64')} ${localKeyVersion(key)}`]);
  await writeFile(file, await readFile(restored));
  t.is(await backend.currentKeyVersion(), localKeyVersion(key));
  // Then a real rotation (keygen --rotate writes check values) is taken.
  const ok = await run(process.execPath, [MAIN, 'keygen', '--rotate', file]);
  t.is(ok.status, 0, ok.stderr);
  const newVersion = await backend.currentKeyVersion();
  t.not(newVersion, localKeyVersion(key));
  t.deepEqual((await keyLines(file)).map((l) => l.split(' ')[1]), [newVersion, localKeyVersion(key)], 'every line carries its check value');
});

test('decoding is strict: exactly 32 bytes of canonical base64, a matching check value, nothing else on the line', async (t) => {
  const dir = await tempDir(t);
  const key = randomBytes(32);
  const b64 = key.toString('base64');
  // Last character before "=" with its low two (padding) bits set: decodes to the same key.
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
  const nonCanonical = `${b64.slice(0, 42)}${alphabet[alphabet.indexOf(b64[42]!) | 3]}=`;
  const bad: Record<string, string> = {
    'trailing junk': `${b64}!!`,
    'junk inside': `${b64.slice(0, 20)}*${b64.slice(20)}`,
    'url-safe alphabet': key.toString('base64url'),
    'no padding': b64.slice(0, 43),
    'non-canonical padding bits': nonCanonical,
    '31 bytes': randomBytes(31).toString('base64'),
    '33 bytes': randomBytes(33).toString('base64'),
    'two keys on a line': `${b64} ${randomBytes(32).toString('base64')}`,
    'wrong check value': `${b64} ${localKeyVersion(randomBytes(32))}`,
    'check value of another case': `${b64} ${localKeyVersion(key).toUpperCase()}`,
  };
  for (const [what, line] of Object.entries(bad)) {
    const file = path.join(dir, `${what.replaceAll(' ', '-')}.key`);
    await writeFile(file, `${line}\n`, { mode: 0o600 });
    const error = await t.throwsAsync(loadKeyRing(file), undefined, what);
    t.regex(error?.message ?? '', /line 1 /, what);
    t.false((error?.message ?? '').includes(b64.slice(0, 16)), `${what}: the error echoes key material`);
  }
  const good = path.join(dir, 'good.key');
  await writeFile(good, `# comment\n\n  ${b64} ${localKeyVersion(key)}  \r\n${randomBytes(32).toString('base64')}\n`, { mode: 0o600 });
  const ring = await loadKeyRing(good);
  t.is(ring.keys[0]!.version, localKeyVersion(key));
  t.deepEqual(ring.uncheckedLines, [4]);
});

test('a chmod 644 after start is noticed at the next reload; chmod 600 restores the backend', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.key');
  const version = await generateKeyFile(file);
  const { backend, guarded } = guardedLocal('a', file);
  t.true((await probeBackend(guarded, never)).ok);
  await chmod(file, 0o644);
  const probe = await probeBackend(guarded, never);
  t.false(probe.ok);
  t.regex((probe.error as Error).message, /readable by group or others \(mode 644\); chmod 600 it/);
  await t.throwsAsync(backend.wrap(Buffer.alloc(32), context), { message: /new wraps refused/ });
  await chmod(file, 0o600);
  t.is(await backend.currentKeyVersion(), version);
  t.true((await probeBackend(guarded, never)).ok);
});

test('an unprivileged user with write access to the key folder cannot swap in their own key file or a link', async (t) => {
  const dir = await tempDir(t);
  await chmod(dir, 0o711);
  const keys = path.join(dir, 'keys');
  await mkdir(keys);
  await chmod(keys, 0o777); // the misconfiguration the attacker uses
  const secret = path.join(dir, 'secret');
  await mkdir(secret, { mode: 0o700 });
  const rootOnly = path.join(secret, 'other.key');
  const otherVersion = await generateKeyFile(rootOnly);
  const file = path.join(keys, 'a.key');
  const version = await generateKeyFile(file);
  const { backend } = guardedLocal('a', file);
  t.is(await backend.currentKeyVersion(), version);

  // Their own key, mode 0600, owned by them, renamed over ours.
  const attackerKey = randomBytes(32);
  await asNobody(
    `umask 077 && printf '%s %s\\n' '${attackerKey.toString('base64')}' '${localKeyVersion(attackerKey)}' > ${keys}/evil && mv -f ${keys}/evil ${file}`,
  );
  t.is((await lstat(file)).uid, 65534);
  await t.throwsAsync(backend.currentKeyVersion(), { message: /owned by uid 65534/ });
  await t.throwsAsync(backend.wrap(Buffer.alloc(32), context), { message: /new wraps refused/ });

  // A link to a root-only key file: never followed.
  await asNobody(`ln -s ${rootOnly} ${keys}/link && mv -f ${keys}/link ${file}`);
  t.true((await lstat(file)).isSymbolicLink());
  const error = await t.throwsAsync(backend.currentKeyVersion(), { message: /symbolic link/ });
  t.false(error.message.includes(otherVersion));
  await t.throwsAsync(loadKeyRing(file), { message: /symbolic link/ });
});

test('keygen: mode 0600 under umask 000, check values, never through a link; --rotate refuses a link and leaves no temporary file', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'new.key');
  const made = await run('/bin/sh', ['-c', 'umask 000 && exec "$0" "$@"', process.execPath, MAIN, 'keygen', file]);
  t.is(made.status, 0, made.stderr);
  t.is((await lstat(file)).mode & 0o777, 0o600);
  const [line] = await keyLines(file);
  const [b64, check] = line!.split(' ');
  t.is(check, localKeyVersion(Buffer.from(b64!, 'base64')));
  t.true(made.stdout.includes(check!));

  const target = path.join(dir, 'target.key');
  await generateKeyFile(target);
  const before = await readFile(target, 'utf8');
  const link = path.join(dir, 'link.key');
  await symlink(target, link);
  const create = await run(process.execPath, [MAIN, 'keygen', link]);
  t.is(create.status, 1);
  const rotate = await run(process.execPath, [MAIN, 'keygen', '--rotate', link]);
  t.is(rotate.status, 1);
  t.regex(rotate.stderr, /symbolic link/);
  t.true((await lstat(link)).isSymbolicLink(), 'the link was replaced');
  t.is(await readFile(target, 'utf8'), before);
  t.deepEqual((await readdir(dir)).filter((f) => f.endsWith('.tmp')), []);
});
