/**
 * `node bench/dashboard-picture.ts [--seconds 150] [--out docs/charts/dashboard.svg]`:
 * draws the main panels of deploy/monitoring/grafana-dashboard.json from a real run,
 * for docs/operations/monitoring.md (Grafana cannot be installed where this project is
 * built, so the same queries are evaluated here and drawn as SVG).
 *
 * The run: two plugins ("cp-1" and "cp-2", as on two control-plane nodes), each with
 * three backends (OpenBao transit, local-kms as AWS KMS, a local key file), quorum 2,
 * serving their KMS sockets. The real test servers of test/servers/up.sh answer, each
 * behind a TCP proxy of its own per plugin (test/chaos/fault-proxy.ts), so one node's
 * path to one backend can be cut without stopping a server others use. A KMS v2 client
 * drives Encrypt + Decrypt on both sockets while /metrics of both is scraped every
 * second. Timeline: from 25 % of the run to 55 %, cp-2's connections to OpenBao are
 * refused (the backend is down for that node only); from 70 % to 85 %, cp-1's path to
 * local-kms gets 250 ms of added latency.
 *
 * Queries are those of the dashboard, with a 10 s rate window instead of 5 min (the run
 * is minutes long). `--samples FILE` also writes every scraped sample (JSON lines) to
 * check the picture against.
 *
 * Needs: test/servers/up.sh openbao local-kms.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { generateKeyFile } from '../src/backends/local.ts';
import { call, clientsFor } from '../src/cli/client.ts';
import { startPlugin, type RunningPlugin } from '../src/cli/serve.ts';
import { parseConfig } from '../src/config/load.ts';
import { silentLogger } from '../src/observability/logger.ts';
import { FaultProxy } from '../test/chaos/fault-proxy.ts';
import { requireServer, requireVar } from '../test/helpers/servers.ts';
import { stamp } from './record.ts';

const root = path.resolve(import.meta.dirname, '..');
const { values: args } = parseArgs({
  options: {
    seconds: { type: 'string', default: '150' },
    out: { type: 'string', default: path.join(root, 'docs/charts/dashboard.svg') },
    concurrency: { type: 'string', default: '3' },
    samples: { type: 'string' },
    warmup: { type: 'string', default: '20' },
  },
});
const SECONDS = Number(args.seconds);
const CONCURRENCY = Number(args.concurrency);
const WINDOW_S = 10;

function env(server: string): Record<string, string> {
  const found = requireServer(server);
  if ('missing' in found) throw new Error(`${found.missing} (run test/servers/up.sh openbao local-kms)`);
  return found.env;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------
// The two plugins
// ---------------------------------------------------------------------------

interface Node {
  name: string;
  running: RunningPlugin;
  proxies: { vault: FaultProxy; aws: FaultProxy };
  socket: string;
}

async function startNode(name: string): Promise<Node> {
  const bao = env('openbao');
  const kms = env('local-kms');
  const need = (e: Record<string, string>, v: string, s: string) => requireVar(e, v, s);
  process.env.AWS_ACCESS_KEY_ID = need(kms, 'LOCAL_KMS_ACCESS_KEY_ID', 'local-kms');
  process.env.AWS_SECRET_ACCESS_KEY = need(kms, 'LOCAL_KMS_SECRET_ACCESS_KEY', 'local-kms');
  const vault = await FaultProxy.start(`${name}-vault`, need(bao, 'VAULT_ADDR', 'openbao'));
  const aws = await FaultProxy.start(`${name}-aws`, need(kms, 'LOCAL_KMS_ENDPOINT', 'local-kms'));
  const dir = mkdtempSync(path.join(tmpdir(), `trousseau-dash-${name}-`));
  await generateKeyFile(path.join(dir, 'local.key'));
  const socket = path.join(dir, 'kms.sock');
  const config = parseConfig({
    socket: { path: socket },
    quorum: 2,
    backends: [
      {
        name: 'vault',
        type: 'vault',
        priority: 10,
        timeoutMs: 1000,
        address: `http://127.0.0.1:${vault.port}`,
        transitMount: need(bao, 'VAULT_TRANSIT_MOUNT', 'openbao'),
        keyName: need(bao, 'VAULT_KEY_NAME', 'openbao'),
        auth: { method: 'token', tokenFile: need(bao, 'VAULT_TOKEN_FILE', 'openbao') },
      },
      {
        name: 'aws',
        type: 'aws',
        priority: 20,
        timeoutMs: 1000,
        keyId: need(kms, 'LOCAL_KMS_KEY_ARN', 'local-kms'),
        region: need(kms, 'LOCAL_KMS_REGION', 'local-kms'),
        endpoint: `http://127.0.0.1:${aws.port}`,
      },
      { name: 'local', type: 'local', priority: 90, keyFile: 'local.key' },
    ],
    http: { listen: '127.0.0.1:0' },
    health: { probeIntervalMs: 1000, minBackoffMs: 500, maxBackoffMs: 2000, recoverAfterMs: 5000 },
    escrow: { initialDelayMs: 2000, intervalMs: 15_000 },
  });
  const running = await startPlugin(config, dir, silentLogger());
  return { name, running, proxies: { vault, aws }, socket };
}

// ---------------------------------------------------------------------------
// Load and scrape
// ---------------------------------------------------------------------------

async function drive(node: Node, until: number): Promise<void> {
  const clients = clientsFor(node.socket);
  const worker = async () => {
    while (Date.now() < until) {
      try {
        const enc = await call<{ plaintext: Buffer; uid: string }, { ciphertext: Buffer; keyId: string; annotations: Record<string, Buffer> }>(
          clients.v2,
          'Encrypt',
          { plaintext: Buffer.from('a data encryption key, 32 bytes!'), uid: 'dash' },
          3000,
        );
        await call(clients.v2, 'Decrypt', { ciphertext: enc.ciphertext, keyId: enc.keyId, annotations: enc.annotations, uid: 'dash' }, 3000);
      } catch {
        await sleep(50); // a refused call is a sample too; do not spin
      }
      await sleep(40);
    }
  };
  await Promise.all(Array.from({ length: CONCURRENCY }, worker));
  clients.close();
}

interface Sample {
  t: number;
  instance: string;
  name: string;
  labels: Record<string, string>;
  value: number;
}

function parseScrape(text: string, t: number, instance: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split('\n')) {
    if (!line.startsWith('trousseau_')) continue;
    const m = /^([a-z_:]+)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m) continue;
    const labels: Record<string, string> = {};
    for (const [, k, v] of (m[2] ?? '').matchAll(/([a-z_]+)="((?:[^"\\]|\\.)*)"/g)) labels[k!] = v!;
    out.push({ t, instance, name: m[1]!, labels, value: Number(m[3]) });
  }
  return out;
}

// ---------------------------------------------------------------------------
// The dashboard's queries over the samples
// ---------------------------------------------------------------------------

type Series = Map<string, { t: number; v: number }[]>;

/** Samples of `name` grouped by instance + the given labels, with a filter on labels. */
function select(samples: Sample[], name: string, by: string[], where: (l: Record<string, string>) => boolean = () => true): Map<string, Sample[]> {
  const groups = new Map<string, Sample[]>();
  for (const s of samples) {
    if (s.name !== name || !where(s.labels)) continue;
    const key = [s.instance, ...by.map((b) => s.labels[b] ?? '')].join(' ');
    const list = groups.get(key) ?? [];
    list.push(s);
    groups.set(key, list);
  }
  return groups;
}

/** sum by (instance, by...) of a gauge, per scrape time. */
function gauge(samples: Sample[], name: string, by: string[], where?: (l: Record<string, string>) => boolean): Series {
  const out: Series = new Map();
  for (const [key, list] of select(samples, name, by, where)) {
    const perT = new Map<number, number>();
    for (const s of list) perT.set(s.t, (perT.get(s.t) ?? 0) + s.value);
    out.set(key, [...perT].map(([t, v]) => ({ t, v })).sort((a, b) => a.t - b.t));
  }
  return out;
}

/** Per-second increase of a counter sum, over the last WINDOW_S seconds, at each scrape. */
function rate(samples: Sample[], name: string, by: string[], where?: (l: Record<string, string>) => boolean): Series {
  const sums = gauge(samples, name, by, where);
  const out: Series = new Map();
  for (const [key, points] of sums) {
    out.set(
      key,
      points.flatMap((p, i) => {
        const back = points.findLast((q, j) => j < i && p.t - q.t >= WINDOW_S);
        return back ? [{ t: p.t, v: Math.max(0, p.v - back.v) / (p.t - back.t) }] : [];
      }),
    );
  }
  return out;
}

/** histogram_quantile(q, sum by (instance, by..., le) (rate(name_bucket[window]))), as Prometheus interpolates. */
function quantile(samples: Sample[], q: number, name: string, by: string[], where?: (l: Record<string, string>) => boolean): Series {
  const buckets = rate(samples, `${name}_bucket`, [...by, 'le'], where);
  const grouped = new Map<string, Map<number, { le: number; v: number }[]>>();
  for (const [key, points] of buckets) {
    const parts = key.split(' ');
    const le = parts.pop()!;
    const group = parts.join(' ');
    const perT = grouped.get(group) ?? new Map<number, { le: number; v: number }[]>();
    for (const p of points) perT.set(p.t, [...(perT.get(p.t) ?? []), { le: le === '+Inf' ? Infinity : Number(le), v: p.v }]);
    grouped.set(group, perT);
  }
  const out: Series = new Map();
  for (const [group, perT] of grouped) {
    const points: { t: number; v: number }[] = [];
    for (const [t, list] of perT) {
      list.sort((a, b) => a.le - b.le);
      const total = list.at(-1)!.v;
      if (total <= 0) continue;
      const rank = q * total;
      const i = list.findIndex((b) => b.v >= rank);
      const upper = list[i]!;
      if (upper.le === Infinity) {
        points.push({ t, v: list.at(-2)?.le ?? 0 });
        continue;
      }
      const lowerLe = i === 0 ? 0 : list[i - 1]!.le;
      const lowerV = i === 0 ? 0 : list[i - 1]!.v;
      points.push({ t, v: lowerLe + (upper.le - lowerLe) * ((rank - lowerV) / (upper.v - lowerV || 1)) });
    }
    out.set(group, points.sort((a, b) => a.t - b.t));
  }
  return out;
}

// ---------------------------------------------------------------------------
// SVG
// ---------------------------------------------------------------------------

const COLORS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf'];
const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
const PW = 560;
const PH = 250;
const PM = { top: 30, right: 12, bottom: 28, left: 56 };

interface Panel {
  title: string;
  series: Series;
  unit: (v: number) => string;
  /** A horizontal line with a label (the apiserver's timeout, the quorum). */
  marker?: { value: number; label: string };
  step?: boolean;
  max?: number;
}

function niceMax(v: number): number {
  if (v <= 0) return 1;
  const mag = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 2.5, 5, 10].map((f) => f * mag).find((c) => c >= v)!;
}

function drawPanel(panel: Panel, x0: number, y0: number, span: { from: number; to: number }, events: { from: number; to: number; label: string }[]): string {
  const w = PW - PM.left - PM.right;
  const h = PH - PM.top - PM.bottom;
  const all = [...panel.series.values()].flat().filter((p) => p.t >= span.from).map((p) => p.v);
  const max = panel.max ?? niceMax(Math.max(...all, panel.marker?.value ?? 0) * 1.05);
  const X = (t: number) => x0 + PM.left + ((t - span.from) / (span.to - span.from)) * w;
  const Y = (v: number) => y0 + PM.top + h - (Math.min(v, max) / max) * h;
  let svg = `<rect x="${x0 + 4}" y="${y0 + 4}" width="${PW - 8}" height="${PH - 8}" fill="#fff" stroke="#d0d0d0" rx="4"/>`;
  svg += `<text x="${x0 + 14}" y="${y0 + 21}" font-size="13" font-weight="bold">${esc(panel.title)}</text>`;
  for (const e of events) {
    svg += `<rect x="${X(e.from)}" y="${y0 + PM.top}" width="${X(e.to) - X(e.from)}" height="${h}" fill="#fbe3e3" opacity="0.7"/>`;
  }
  for (let i = 0; i <= 4; i++) {
    const v = (max / 4) * i;
    svg += `<line x1="${x0 + PM.left}" x2="${x0 + PM.left + w}" y1="${Y(v)}" y2="${Y(v)}" stroke="#eee"/>`;
    svg += `<text x="${x0 + PM.left - 6}" y="${Y(v) + 4}" text-anchor="end" font-size="10" fill="#555">${esc(panel.unit(v))}</text>`;
  }
  for (let s = 0; s <= span.to - span.from; s += 30) {
    svg += `<text x="${X(span.from + s)}" y="${y0 + PM.top + h + 14}" text-anchor="middle" font-size="10" fill="#555">${s}s</text>`;
  }
  if (panel.marker) {
    svg += `<line x1="${x0 + PM.left}" x2="${x0 + PM.left + w}" y1="${Y(panel.marker.value)}" y2="${Y(panel.marker.value)}" stroke="#d62728" stroke-dasharray="5,4"/>`;
    svg += `<text x="${x0 + PM.left + w - 4}" y="${Y(panel.marker.value) - 4}" text-anchor="end" font-size="10" fill="#d62728">${esc(panel.marker.label)}</text>`;
  }
  const keys = [...panel.series.keys()].sort();
  keys.forEach((key, i) => {
    const points = panel.series.get(key)!.filter((p) => p.t >= span.from);
    if (points.length === 0) return;
    const color = COLORS[i % COLORS.length]!;
    let d = '';
    points.forEach((p, j) => {
      const cmd = j === 0 ? 'M' : 'L';
      if (panel.step && j > 0) d += `L${X(p.t).toFixed(1)},${Y(points[j - 1]!.v).toFixed(1)}`;
      d += `${cmd}${X(p.t).toFixed(1)},${Y(p.v).toFixed(1)}`;
    });
    // Offset step lines a little so that equal series stay visible.
    const shift = panel.step ? (i - keys.length / 2) * 1.2 : 0;
    svg += `<path d="${d}" fill="none" stroke="${color}" stroke-width="1.6" transform="translate(0,${shift.toFixed(1)})"/>`;
    const lx = x0 + PM.left + 8 + (i % 3) * 165;
    const ly = y0 + PM.top + 12 + Math.floor(i / 3) * 13;
    svg += `<rect x="${lx}" y="${ly - 8}" width="10" height="3" fill="${color}"/><text x="${lx + 14}" y="${ly - 3}" font-size="10">${esc(key)}</text>`;
  });
  return svg;
}

// ---------------------------------------------------------------------------

const nodes = [await startNode('cp-1'), await startNode('cp-2')];
// The first seconds (SDKs loading, first connections, first probes) are not what the
// picture is about: load and scraping start WARMUP seconds before its time 0.
const WARMUP_S = Number(args.warmup);
const startedAt = Date.now() + WARMUP_S * 1000;
const samples: Sample[] = [];
const until = startedAt + SECONDS * 1000;
const at = (fraction: number) => startedAt + SECONDS * 1000 * fraction;
const events = [
  { from: 0.25, to: 0.55, label: 'cp-2: OpenBao refused', node: 1, backend: 'vault' as const, mode: { kind: 'refuse', how: 'close' } as const },
  { from: 0.7, to: 0.85, label: 'cp-1: local-kms +250 ms', node: 0, backend: 'aws' as const, mode: { kind: 'latency', baseMs: 250, jitterMs: 20, tailFraction: 0, tailMs: 0 } as const },
];
console.error(`dashboard picture: ${WARMUP_S} s warm-up, then ${SECONDS} s, two plugins, ${CONCURRENCY} Encrypt+Decrypt loops each`);

const load = Promise.all(nodes.map((n) => drive(n, until)));
const faults = (async () => {
  for (const e of events) {
    await sleep(Math.max(0, at(e.from) - Date.now()));
    await nodes[e.node]!.proxies[e.backend].set(e.mode);
    console.error(`${Math.round((Date.now() - startedAt) / 1000)} s: ${e.label}`);
    await sleep(Math.max(0, at(e.to) - Date.now()));
    await nodes[e.node]!.proxies[e.backend].pass();
    console.error(`${Math.round((Date.now() - startedAt) / 1000)} s: ${e.label}: over`);
  }
})();
while (Date.now() < until) {
  const t = (Date.now() - startedAt) / 1000;
  await Promise.all(
    nodes.map(async (n) => {
      const text = await (await fetch(`http://${n.running.httpAddress}/metrics`)).text();
      samples.push(...parseScrape(text, t, n.name));
    }),
  );
  await sleep(1000 - ((Date.now() - startedAt) % 1000));
}
await load;
await faults;
for (const n of nodes) {
  await n.running.stop();
  await n.proxies.vault.close();
  await n.proxies.aws.close();
}

const kmsOnly = (l: Record<string, string>) => l.api === 'v2';
const ms = (v: number) => `${Math.round(v * 1000)} ms`;
const perS = (v: number) => `${Math.round(v)}/s`;
const panels: Panel[] = [
  { title: 'Backend up (health probe), per node', series: gauge(samples, 'trousseau_backend_up', ['backend']), unit: (v) => (v >= 1 ? 'up' : v <= 0 ? 'down' : ''), step: true, max: 1.2 },
  {
    title: 'KMS RPCs by method and gRPC code, per node',
    series: rate(samples, 'trousseau_kms_requests_total', ['method', 'code'], (l) => kmsOnly(l) && (l.method === 'Encrypt' || l.method === 'Decrypt')),
    unit: perS,
  },
  {
    title: 'KMS RPC latency p99 per node (apiserver timeout 3 s)',
    series: quantile(samples, 0.99, 'trousseau_kms_request_duration_seconds', ['method'], (l) => kmsOnly(l) && (l.method === 'Encrypt' || l.method === 'Decrypt')),
    unit: ms,
  },
  { title: 'Backend latency p99, per node', series: quantile(samples, 0.99, 'trousseau_backend_request_duration_seconds', ['backend'], (l) => l.backend !== 'local'), unit: ms },
  {
    title: 'Backend calls that failed, per node (by outcome)',
    series: rate(samples, 'trousseau_backend_requests_total', ['backend', 'outcome'], (l) => l.outcome !== 'success' && l.outcome !== 'cancelled'),
    unit: (v) => `${Math.round(v * 10) / 10}/s`,
  },
  {
    title: 'Encrypt: copies written per Encrypt, per node',
    series: (() => {
      const sum = rate(samples, 'trousseau_encrypt_wrapped_copies_sum', []);
      const count = rate(samples, 'trousseau_encrypt_wrapped_copies_count', []);
      const out: Series = new Map();
      for (const [key, points] of sum) {
        const c = count.get(key) ?? [];
        out.set(`${key} copies`, points.flatMap((p) => {
          const n = c.find((q) => q.t === p.t)?.v ?? 0;
          return n > 0 ? [{ t: p.t, v: p.v / n }] : [];
        }));
      }
      return out;
    })(),
    unit: (v) => String(Math.round(v * 10) / 10),
    marker: { value: 2, label: 'quorum 2 (3 configured)' },
    max: 3.5,
  },
];
// The KMS latency panel shows the timeout only when the data comes near it.
const span = { from: 0, to: SECONDS };
const shaded = events.map((e) => ({ from: e.from * SECONDS, to: e.to * SECONDS, label: e.label }));
const info = stamp('dashboard-picture');
const W = PW * 2 + 20;
const H = PH * 3 + 110;
let body = '';
panels.forEach((p, i) => {
  body += drawPanel(p, 10 + (i % 2) * PW, 60 + Math.floor(i / 2) * PH, span, shaded);
});
const legend = shaded.map((e) => `${Math.round(e.from)}-${Math.round(e.to)} s: ${e.label}`).join(' · ');
const footer = `commit ${info.commit}${info.dirty ? '+changes' : ''} · ${info.date.slice(0, 16).replace('T', ' ')} UTC · Node ${info.node} · ${info.cpus} CPUs (${info.cpuModel}) · load ${info.load} · rate window ${WINDOW_S} s, scraped every 1 s`;
const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif" font-size="12">
<rect width="${W}" height="${H}" fill="#f4f5f7"/>
<text x="${W / 2}" y="26" text-anchor="middle" font-size="17" font-weight="bold">Trousseau dashboard: main panels, two plugins (cp-1, cp-2), real backends</text>
<text x="${W / 2}" y="46" text-anchor="middle" font-size="11" fill="#555">${esc(`shaded: ${legend}`)}</text>
${body}
<text x="${W / 2}" y="${H - 14}" text-anchor="middle" font-size="10" fill="#777">${esc(footer)}</text>
</svg>
`;
await mkdir(path.dirname(args.out), { recursive: true });
await writeFile(args.out, svg);
if (args.samples) writeFileSync(args.samples, samples.map((s) => JSON.stringify(s)).join('\n') + '\n');
console.error(`wrote ${args.out} (${samples.length} samples)`);
const ok = panels[0]!.series.get('cp-2 vault')?.some((p) => p.t >= 0 && p.v === 0) ?? false;
console.error(ok ? 'cp-2 vault went down and the panel shows it' : 'WARNING: the outage does not show in "Backend up"');
process.exit(0);
