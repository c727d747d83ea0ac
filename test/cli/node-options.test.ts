/**
 * The plugin's Node flags are set in three places: the container image (Dockerfile
 * NODE_OPTIONS), `npm start` / `npm run dev`, and the benchmarks (which read the
 * Dockerfile). They must agree, or the numbers in docs/performance.md describe a
 * plugin nobody runs.
 */
import test from 'ava';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { imageNodeOptions } from '../../bench/plugin-node-args.ts';

const root = path.resolve(import.meta.dirname, '../..');

test('the image sets a bounded young generation for the plugin', (t) => {
  t.deepEqual(imageNodeOptions(root), ['--max-semi-space-size=8']);
});

test('npm start and npm run dev run the plugin with the image flags, through bin/trousseau.js (where the compile cache is decided)', (t) => {
  const scripts = (JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts;
  const flags = imageNodeOptions(root).join(' ');
  t.true(scripts.start!.startsWith(`node ${flags} bin/trousseau.js`), `start: ${scripts.start}`);
  t.true(scripts.dev!.startsWith(`TROUSSEAU_COMPILE_CACHE=./run/compile-cache node ${flags} bin/trousseau.js serve --dev`), `dev: ${scripts.dev}`);
});
