/**
 * Summary of a V8 `.cpuprofile` (`node --cpu-prof`, e.g. through BENCH_PLUGIN_NODE_ARGS):
 * `node bench/cpu-profile.ts FILE [top]`. Prints the share of all samples by owner (each
 * sample given to the first recognised frame from the leaf up: the AWS call's parts,
 * gRPC, the plugin's own code, GC), then the functions with the most samples, self and
 * inclusive. Shares are of wall-clock samples: on a loaded machine a thread preempted in
 * a system call keeps being sampled there, so compare shares within one profile, and
 * take CPU time from the benchmarks.
 */
import { readFileSync } from 'node:fs';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}
interface Profile {
  nodes: ProfileNode[];
  samples: number[];
  startTime: number;
  endTime: number;
}

const OWNERS: [string, (url: string, fn: string) => boolean][] = [
  ['(idle)', (_, fn) => fn === '(idle)'],
  ['(garbage collector)', (_, fn) => fn === '(garbage collector)'],
  ['(program)', (_, fn) => fn === '(program)'],
  ['aws: signing (signature-v4, hashes)', (url) => /@smithy\/signature-v4|checksum\/index/.test(url)],
  ['aws: node:http client (and its socket writes)', (url) => /^node:(_http_client|_http_agent|_http_outgoing|_http_common|_http_incoming|http)$/.test(url)],
  ['aws: NodeHttpHandler', (url) => url.includes('@smithy/node-http-handler')],
  ['aws: protocol serde', (url) => /protocols\/index|serde\/index|schema\/index/.test(url)],
  ['aws: other SDK (middlewares, retry, signer glue)', (url) => /@smithy|@aws-sdk/.test(url)],
  ['trousseau: aws backend', (url) => url.endsWith('src/backends/aws.ts')],
  ['grpc (grpc-js, http2, protobufjs)', (url) => /@grpc|node:internal\/http2|protobufjs/.test(url)],
  ['trousseau: envelope', (url) => url.includes('/src/envelope/')],
  ['trousseau: engine', (url) => url.includes('/src/engine/')],
  ['trousseau: kms, plugin, observability', (url) => /\/src\/(kms|plugin|observability|main|cli)/.test(url)],
  ['prom-client, opossum, pino', (url) => /prom-client|opossum|pino/.test(url)],
  ['module loading (start-up)', (url) => /node:internal\/modules|amaro|bootstrap/.test(url)],
];

const file = process.argv[2];
if (!file) throw new Error('usage: node bench/cpu-profile.ts FILE.cpuprofile [top]');
const top = Number(process.argv[3] ?? 25);
const profile = JSON.parse(readFileSync(file, 'utf8')) as Profile;
const byId = new Map(profile.nodes.map((n) => [n.id, n]));
const parent = new Map<number, number>();
for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
const hits = new Map<number, number>();
for (const s of profile.samples) hits.set(s, (hits.get(s) ?? 0) + 1);
const total = profile.samples.length;

const label = (n: ProfileNode) => {
  const where = n.callFrame.url.replace(/.*node_modules\//, '').replace(/.*\/(src|bench|test)\//, '$1/');
  return `${n.callFrame.functionName || '(anonymous)'} ${where || '(native)'}:${n.callFrame.lineNumber + 1}`;
};
const add = (map: Map<string, number>, key: string, count: number) => map.set(key, (map.get(key) ?? 0) + count);

const owners = new Map<string, number>();
const self = new Map<string, number>();
const inclusive = new Map<string, number>();
for (const [id, count] of hits) {
  const leaf = byId.get(id)!;
  add(self, label(leaf), count);
  let owner = 'other (node internals: timers, events, streams, microtasks)';
  let found = false;
  const seen = new Set<string>();
  for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) {
    const n = byId.get(at)!;
    const key = label(n);
    if (!seen.has(key)) {
      seen.add(key);
      add(inclusive, key, count);
    }
    const match = found ? undefined : OWNERS.find(([, test]) => test(n.callFrame.url, n.callFrame.functionName));
    if (match) {
      owner = match[0];
      found = true;
    }
  }
  add(owners, owner, count);
}

const idle = owners.get('(idle)') ?? 0;
const pct = (count: number, of: number) => `${((100 * count) / of).toFixed(1).padStart(5)} %`;
const sorted = (map: Map<string, number>) => [...map].sort((a, b) => b[1] - a[1]);
console.log(`${total} samples over ${((profile.endTime - profile.startTime) / 1e6).toFixed(1)} s, ${pct(idle, total)} idle`);
console.log('\nby owner          of all   of busy');
for (const [owner, count] of sorted(owners)) console.log(`${pct(count, total)}  ${owner === '(idle)' ? '       ' : pct(count, total - idle)}  ${owner}`);
console.log('\nself');
for (const [key, count] of sorted(self).slice(0, top)) console.log(`${pct(count, total)}  ${key}`);
console.log('\ninclusive');
for (const [key, count] of sorted(inclusive).slice(0, top)) console.log(`${pct(count, total)}  ${key}`);
