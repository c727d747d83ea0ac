/**
 * What the bench scenarios read about processes and the machine: a free loopback port,
 * a process's CPU time and RSS from /proc, the load average printed beside every
 * number, and a test server's env file (.servers/env/<name>.env).
 */
import { existsSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import os from 'node:os';
import path from 'node:path';

const root = path.resolve(import.meta.dirname, '..');

/** A port the kernel had free on 127.0.0.1 a moment ago. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

/** User + system CPU seconds of a process so far (/proc/<pid>/stat, fields 14 and 15, in clock ticks of 10 ms). */
export function cpuSeconds(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** Resident set size of a process, MiB to one decimal. */
export function rssMiB(pid: number): number {
  const kb = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? NaN);
  return Math.round(kb / 102.4) / 10;
}

/** The 1, 5 and 15 minute load averages, as recorded beside each measurement. */
export const loadAverage = (): string =>
  os
    .loadavg()
    .map((x) => x.toFixed(2))
    .join(' / ');

/** The variables a running test server wrote (test/servers/up.sh); throws when it is not running. */
export function serverEnv(name: string): Record<string, string> {
  const file = path.join(root, '.servers', 'env', `${name}.env`);
  if (!existsSync(file)) throw new Error(`the ${name} test server is not running: bash test/servers/up.sh openbao local-kms`);
  const vars: Record<string, string> = {};
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    const eq = line.indexOf('=');
    if (eq > 0) vars[line.slice(0, eq)] = line.slice(eq + 1);
  }
  return vars;
}
