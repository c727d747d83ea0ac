/**
 * Appends the image's numbers to bench/results.jsonl (mode "image"): the layer sizes
 * from dist/image/layers.txt (written by deploy/image/build.sh) and what was measured
 * by hand or by test/image/image.test.ts (its t.log lines): build times, start-up
 * time, RSS. docs/deploy.md quotes the line.
 *
 *   node deploy/image/record.ts key=value ...   (e.g. startMs=1800 rssMiB=95 buildColdS=240)
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { emit } from '../../bench/record.ts';

const root = path.resolve(import.meta.dirname, '../..');
const lines = readFileSync(path.join(root, 'dist/image/layers.txt'), 'utf8').trim().split('\n');
const layers = lines
  .filter((l) => l.startsWith('layer '))
  .map((l) => {
    const [, digest, , uncompressed, , , gzip] = l.split(' ');
    return { digest, uncompressedMiB: Number(uncompressed), gzipMiB: Number(gzip) };
  });
const total = /gzip \S+ MiB \((\d+) bytes\)/.exec(lines.at(-1) ?? '');
const measured: Record<string, string | number> = Object.fromEntries(
  process.argv.slice(2).map((arg) => {
    const [key, value] = arg.split('=');
    return [key ?? '', Number.isNaN(Number(value)) ? (value ?? '') : Number(value)];
  }),
);
emit('image', { layers, gzipBytes: Number(total?.[1]), uncompressedMiB: layers.reduce((a, l) => a + l.uncompressedMiB, 0), ...measured }, {
  json: true,
  out: path.join(root, 'bench/results.jsonl'),
});
