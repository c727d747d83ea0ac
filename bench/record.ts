/**
 * One JSON line per benchmark run, stamped so runs can be compared across commits:
 * `--json` prints it, `--out FILE` appends it (bench/results.jsonl holds the runs
 * quoted in docs/performance.md; bench/charts.ts draws from it).
 */
import { execFileSync } from 'node:child_process';
import { appendFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export interface Stamp {
  /** Which bench produced the line: matrix, scenario:<name>, memory. */
  mode: string;
  commit: string;
  /** True when the working tree had uncommitted changes: the numbers are for commit + those changes. */
  dirty: boolean;
  date: string;
  node: string;
  cpus: number;
  cpuModel: string;
  memGiB: number;
  /** 1 / 5 / 15 min load average when the line was written (each result also carries the load at its start). */
  load: string;
}

const root = path.resolve(import.meta.dirname, '..');

function git(args: string[]): string | undefined {
  try {
    return execFileSync('git', args, { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return undefined;
  }
}

export function stamp(mode: string): Stamp {
  const commit = git(['rev-parse', '--short', 'HEAD']) ?? 'unknown';
  return {
    mode,
    commit,
    dirty: commit !== 'unknown' && (git(['status', '--porcelain', '--untracked-files=no']) ?? '') !== '',
    date: new Date().toISOString(),
    node: process.version,
    cpus: os.availableParallelism(),
    cpuModel: os.cpus()[0]?.model.trim() ?? 'unknown',
    memGiB: Math.round(os.totalmem() / 2 ** 30),
    load: os
      .loadavg()
      .map((x) => x.toFixed(2))
      .join(' / '),
  };
}

/** Print (`json`) and/or append (`out`) one stamped line; returns it. */
export function emit(mode: string, result: Record<string, unknown>, options: { json: boolean; out?: string | undefined }): string {
  const line = JSON.stringify({ ...stamp(mode), ...result });
  if (options.json) console.log(line);
  if (options.out) appendFileSync(options.out, line + '\n');
  return line;
}
