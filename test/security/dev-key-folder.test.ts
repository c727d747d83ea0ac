/**
 * `serve --dev` keeps its keys in --data-dir. A folder another local user can write
 * (or owns) lets that user replace the keys or plant links where the plugin writes:
 * the same trust rule as the socket's folder applies, before anything is created.
 */
import test from 'ava';
import { chmod, chown, mkdir, readdir } from 'node:fs/promises';
import path from 'node:path';
import pino from 'pino';
import { prepareDevKeys } from '../../src/cli/dev-config.ts';
import { tempDir } from '../helpers/plugin-harness.ts';

const logger = pino({ level: 'silent' });
const NOBODY = 65534;

test('a key folder other users can write is refused, and no key is created in it', async (t) => {
  const dir = path.join(await tempDir(t), 'keys');
  await mkdir(dir);
  await chmod(dir, 0o777);
  await t.throwsAsync(prepareDevKeys(dir, logger), { message: /refusing the development key folder \(--data-dir\): .*keys is writable by users other than root and the plugin's user/ });
  t.deepEqual(await readdir(dir), []);
});

test('a key folder owned by another user is refused', async (t) => {
  if (process.getuid?.() !== 0) return t.pass('needs root to give the folder away (CI runs as root)');
  const dir = path.join(await tempDir(t), 'keys');
  await mkdir(dir, { mode: 0o700 });
  await chown(dir, NOBODY, NOBODY);
  await t.throwsAsync(prepareDevKeys(dir, logger), { message: /refusing the development key folder \(--data-dir\): .*keys is owned by uid 65534/ });
  t.deepEqual(await readdir(dir), []);
});

test('a new key folder is created private and gets three keys and the marker', async (t) => {
  const dir = path.join(await tempDir(t), 'new', 'keys');
  await prepareDevKeys(dir, logger);
  t.deepEqual((await readdir(dir)).sort(), ['.keys-initialised', 'local-a.key', 'local-b.key', 'local-c.key']);
});
