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

test('npm start and npm run dev run the plugin with the image flags', (t) => {
  const scripts = (JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts;
  const flags = imageNodeOptions(root).join(' ');
  for (const name of ['start', 'dev']) t.true(scripts[name]!.startsWith(`node ${flags} src/main.ts`), `${name}: ${scripts[name]}`);
});
