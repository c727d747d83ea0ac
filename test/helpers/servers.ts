/**
 * How tests find the real backend servers that test/servers/up.sh started: each
 * server's variables are read from .servers/env/<name>.env (process.env wins).
 *
 * A missing server fails the test under CI (CI=true): a backend test skipped in CI
 * would pass off an untested backend as supported. Outside CI the test is skipped
 * with a loud message saying how to start the server.
 */
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export function serverEnv(name: string): Record<string, string> | undefined {
  const file = path.join(root, '.servers', 'env', `${name}.env`);
  if (!existsSync(file)) return undefined;
  const vars: Record<string, string> = {};
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    const eq = line.indexOf('=');
    if (eq > 0) vars[line.slice(0, eq)] = process.env[line.slice(0, eq)] ?? line.slice(eq + 1);
  }
  return vars;
}

/** The server's variables, or a reason it is absent (a failure in CI). */
export function requireServer(name: string): { env: Record<string, string> } | { missing: string } {
  const env = serverEnv(name);
  if (env) return { env };
  const missing = `real ${name} server is not running: start it with test/servers/up.sh ${name}`;
  if (process.env.CI) throw new Error(missing);
  console.error(`\n!!! ${missing} (its tests are SKIPPED)\n`);
  return { missing };
}

/** A variable a server's env file must define; its absence is a broken server script. */
export function requireVar(env: Record<string, string>, name: string, server: string): string {
  const value = env[name];
  if (!value) throw new Error(`${name} missing from .servers/env/${server}.env`);
  return value;
}
