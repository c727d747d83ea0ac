// Two `keygen --rotate` runs on one key file at the same time must both keep their new
// key: a running plugin reloads the file and may wrap with a new key at once, so a
// rotation lost to a race is a lost local copy for every envelope wrapped meanwhile.
import test from 'ava';
import { mkdtemp, readFile, rm, writeFile, readdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { addKeyToFile, generateKeyFile, loadKeyRing } from '../../src/backends/local.ts';

test('eight rotations of one key file started together: every new key is kept, the original key stays last, no lock or temporary file left', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'trousseau-rotate-race-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'local.key');
  const first = await generateKeyFile(file);

  const versions = await Promise.all(Array.from({ length: 8 }, () => addKeyToFile(file)));

  const ring = await loadKeyRing(file);
  const kept = ring.keys.map((k) => k.version);
  t.is(new Set(versions).size, 8);
  t.deepEqual([...kept].sort(), [first, ...versions].sort(), 'a rotation lost the key another one added');
  t.is(kept.length, 9);
  t.is(kept.at(-1), first);
  t.deepEqual(await readdir(dir), ['local.key']);
});

test('a lock left by a crashed rotation: the next rotation waits, then names the lock file to remove, and changes nothing', async (t) => {
  t.timeout(30_000);
  const dir = await mkdtemp(path.join(tmpdir(), 'trousseau-rotate-lock-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'local.key');
  await generateKeyFile(file);
  const before = await readFile(file);
  await writeFile(`${file}.lock`, '999999\n', { mode: 0o600 });

  const error = await t.throwsAsync(addKeyToFile(file));
  t.regex(error.message, /local\.key\.lock .*remove it/);
  t.deepEqual(await readFile(file), before);
});
