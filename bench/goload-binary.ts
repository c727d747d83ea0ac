/**
 * The bench/goload binary, built once per version of its sources: the file name carries
 * a hash of main.go, go.mod and go.sum, so a changed client is rebuilt instead of a
 * stale one being reused from an earlier run.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';

const root = path.resolve(import.meta.dirname, '..');

export function goloadBinary(): string {
  const source = path.join(root, 'bench', 'goload');
  const hash = createHash('sha256');
  for (const file of ['main.go', 'go.mod', 'go.sum']) hash.update(readFileSync(path.join(source, file)));
  const binary = path.join(root, '.servers', 'bin', `goload-${hash.digest('hex').slice(0, 12)}`);
  if (!existsSync(binary)) {
    mkdirSync(path.dirname(binary), { recursive: true });
    execFileSync('go', ['build', '-o', binary, '.'], { cwd: source, stdio: 'inherit' });
  }
  return binary;
}

/** Whether a Go toolchain is on the PATH. */
export function goAvailable(): boolean {
  try {
    execFileSync('go', ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}
