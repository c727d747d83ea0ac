/**
 * The Node flags a benchmarked plugin runs with: the ones the container image sets
 * (`ENV NODE_OPTIONS` in the Dockerfile, read from there so the two cannot drift),
 * then BENCH_PLUGIN_NODE_ARGS (e.g. --cpu-prof) for one run.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';

export function imageNodeOptions(root: string): string[] {
  const dockerfile = readFileSync(path.join(root, 'Dockerfile'), 'utf8');
  const match = /^ENV NODE_OPTIONS="?([^"\n]*)"?\s*$/m.exec(dockerfile);
  return match?.[1]?.split(' ').filter(Boolean) ?? [];
}

export function pluginNodeArgs(root: string): string[] {
  const extra = process.env.BENCH_PLUGIN_NODE_ARGS?.split(' ').filter(Boolean) ?? [];
  return [...imageNodeOptions(root), ...extra];
}
