/**
 * Prints one line per layer of an OCI archive (skopeo's oci-archive output): the
 * layer's content digest (the diff ID: sha256 of the uncompressed tar, what "the same
 * layer" means for reproducibility), its uncompressed size, and the gzip size a
 * registry stores; then the totals. deploy/image/build.sh writes this to
 * dist/image/layers.txt and compares two builds with it.
 *
 *   node deploy/image/layers.ts dist/image/trousseau-VERSION.oci.tar
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { gunzipSync } from 'node:zlib';

interface Descriptor { mediaType: string; digest: string; size: number }

const blob = (dir: string, d: Descriptor) => readFileSync(path.join(dir, 'blobs', ...d.digest.split(':')));
const mib = (n: number) => (n / 1048576).toFixed(1);

const archive = process.argv[2];
if (!archive) throw new Error('usage: layers.ts ARCHIVE.oci.tar');
const dir = mkdtempSync(path.join(tmpdir(), 'layers-'));
try {
  execFileSync('tar', ['-xf', archive, '-C', dir]);
  const index = JSON.parse(readFileSync(path.join(dir, 'index.json'), 'utf8')) as { manifests: Descriptor[] };
  const manifest = JSON.parse(blob(dir, index.manifests[0]!).toString('utf8')) as { layers: Descriptor[] };
  let packed = 0;
  let unpacked = 0;
  for (const layer of manifest.layers) {
    const data = blob(dir, layer);
    const content = layer.mediaType.endsWith('gzip') ? gunzipSync(data) : data;
    const diffId = `sha256:${createHash('sha256').update(content).digest('hex')}`;
    packed += layer.size;
    unpacked += content.length;
    console.log(`layer ${diffId} uncompressed ${mib(content.length)} MiB gzip ${mib(layer.size)} MiB`);
  }
  console.log(`total uncompressed ${mib(unpacked)} MiB gzip ${mib(packed)} MiB (${packed} bytes)`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
