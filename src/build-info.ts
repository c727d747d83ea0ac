/**
 * Which build this is: version, commit and build date, for `trousseau --version`, the
 * `trousseau_build_info` metric and the start-up log line.
 *
 * The image build (deploy/image/build.sh) writes build-info.json next to package.json.
 * A checkout has no such file: the version is package.json's, the commit is
 * `git rev-parse HEAD` when a .git is there, and everything unknown says "unknown".
 * Read once per process: the values cannot change while it runs.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export interface BuildInfo {
  version: string;
  commit: string;
  /** ISO 8601 (UTC), or "unknown". */
  date: string;
}

const packageRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

// The values land in a metric label and a log line: plain tokens of bounded length only.
const SAFE = /^[0-9A-Za-z.:+_-]{1,80}$/;
const safe = (value: unknown): string => (typeof value === 'string' && SAFE.test(value) ? value : 'unknown');

function gitCommit(root: string): string {
  if (!existsSync(path.join(root, '.git'))) return 'unknown';
  try {
    return safe(execFileSync('git', ['rev-parse', 'HEAD'], { cwd: root, encoding: 'utf8', timeout: 2000, stdio: ['ignore', 'pipe', 'ignore'] }).trim());
  } catch {
    return 'unknown';
  }
}

/** The build of the package at `root` (default: this one). */
export function readBuildInfo(root = packageRoot): BuildInfo {
  let stamped: Partial<Record<keyof BuildInfo, unknown>> | undefined;
  try {
    stamped = JSON.parse(readFileSync(path.join(root, 'build-info.json'), 'utf8')) as typeof stamped;
  } catch {
    stamped = undefined;
  }
  if (stamped) return { version: safe(stamped.version), commit: safe(stamped.commit), date: safe(stamped.date) };
  let version = 'unknown';
  try {
    version = safe((JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8')) as { version?: unknown }).version);
  } catch {
    // no package.json: stays unknown
  }
  return { version, commit: gitCommit(root), date: 'unknown' };
}

let cached: BuildInfo | undefined;
/** This process's build, read on first use. */
export const buildInfo = (): BuildInfo => (cached ??= readBuildInfo());

/** `trousseau --version`: "trousseau 0.1.0 (commit 0123abc..., built 2026-01-02T03:04:05Z)". */
export const formatVersion = (info: BuildInfo): string => `trousseau ${info.version} (commit ${info.commit}, built ${info.date})`;
