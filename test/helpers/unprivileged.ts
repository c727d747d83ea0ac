/**
 * Run code as an unprivileged local user (uid/gid 65534, no supplementary groups),
 * the attacker of the security tests: CI runs as root, so the attack has to drop
 * privileges to be the attack it claims to be.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chmod } from 'node:fs/promises';
import type { ExecutionContext } from 'ava';

export const NOBODY = 65534;

export interface Attacker {
  child: ChildProcess;
  readonly stdout: string;
  readonly stderr: string;
  /** Resolves with the exit code. */
  exited: Promise<number | null>;
}

/**
 * Run `script` (CommonJS, for `node -e`) as uid 65534. `fdLimit` raises the open-file
 * limit first, as root, with prlimit, before privileges are dropped. Killed in teardown.
 */
export function runAsNobody(t: ExecutionContext, script: string, options: { args?: string[]; fdLimit?: number } = {}): Attacker {
  const drop = ['setpriv', `--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', process.execPath, '-e', script, '--', ...(options.args ?? [])];
  const command = options.fdLimit === undefined ? drop : ['prlimit', `--nofile=${options.fdLimit}:${options.fdLimit}`, '--', ...drop];
  const child = spawn(command[0]!, command.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  let gone = false;
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  void exited.then(() => (gone = true));
  // Waits for the exit, so that no process of this file outlives its last test.
  t.teardown(async () => {
    if (gone) return;
    child.kill('SIGKILL');
    await exited;
  });
  return {
    child,
    get stdout() {
      return stdout;
    },
    get stderr() {
      return stderr;
    },
    exited,
  };
}

/** Let the attacker reach files under `dir` (test folders are created 0700). */
export async function openForTraversal(dir: string): Promise<void> {
  await chmod(dir, 0o755);
}
