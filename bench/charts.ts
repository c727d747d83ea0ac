/**
 * `node bench/charts.ts [results.jsonl] [outdir]`: draws the SVG charts embedded in
 * docs/performance.md from the newest line of each kind in bench/results.jsonl
 * (written by `npm run bench -- ... --out bench/results.jsonl`):
 *
 *   hedging-latency.svg   Decrypt latency percentiles, hedging on vs off
 *   fanout-latency.svg    Encrypt latency percentiles, grace 0 / 150 ms / serial
 *   matrix-decrypt.svg    Decrypt ops/s by backends x concurrency (and matrix-encrypt.svg)
 *   memory.svg            RSS, heap used and heap after GC over the memory scenario
 *   peers-throughput.svg  Decrypt/s and Encrypt/s of Trousseau and the Go peers (and peers-cpu.svg)
 *
 * Hand-written SVG: no chart library is a dependency, and the charts only need bars
 * and lines. Every chart carries the commit, date, Node version, CPUs and load
 * average of the run it shows.
 */
import { readFileSync, mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { Stamp } from './record.ts';

const root = path.resolve(import.meta.dirname, '..');
const input = process.argv[2] ?? path.join(root, 'bench/results.jsonl');
const outDir = process.argv[3] ?? path.join(root, 'docs/charts');

type Line = Stamp & Record<string, unknown>;
const lines: Line[] = readFileSync(input, 'utf8')
  .split('\n')
  .filter((l) => l.trim() !== '')
  .map((l) => JSON.parse(l) as Line);
const latest = (mode: string, filter: (l: Line) => boolean = () => true): Line | undefined => lines.filter((l) => l.mode === mode && filter(l)).at(-1);

const COLORS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd'];
const W = 760;
const H = 420;
const M = { top: 56, right: 24, bottom: 92, left: 76 };
const plotW = W - M.left - M.right;
const plotH = H - M.top - M.bottom;

const r1 = (x: number) => Math.round(x * 10) / 10;
const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
const num = (x: number) => (x >= 100 ? String(Math.round(x)) : x >= 10 ? x.toFixed(1).replace(/\.0$/, '') : String(Math.round(x * 100) / 100));

function frame(title: string, body: string, stamp: Line, note?: string): string {
  const footer = `commit ${stamp.commit}${stamp.dirty ? '+changes' : ''} · ${stamp.date.slice(0, 16).replace('T', ' ')} UTC · Node ${stamp.node} · ${stamp.cpus} CPUs (${stamp.cpuModel}) · load ${String((stamp as { load?: string }).load ?? '')}`;
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif" font-size="12">
<rect width="${W}" height="${H}" fill="#ffffff"/>
<text x="${W / 2}" y="24" text-anchor="middle" font-size="16" font-weight="bold">${esc(title)}</text>
${note ? `<text x="${W / 2}" y="42" text-anchor="middle" font-size="11" fill="#555">${esc(note)}</text>` : ''}
${body}
<text x="${W / 2}" y="${H - 8}" text-anchor="middle" font-size="10" fill="#777">${esc(footer)}</text>
</svg>
`;
}

interface Axis {
  y: (v: number) => number;
  ticks: number[];
}

function linearAxis(max: number): Axis {
  const raw = max / 5;
  const mag = 10 ** Math.floor(Math.log10(raw || 1));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? mag * 10;
  const top = Math.ceil(max / step) * step || 1;
  const ticks = Array.from({ length: Math.round(top / step) + 1 }, (_, i) => i * step);
  return { y: (v) => r1(M.top + plotH - (v / top) * plotH), ticks };
}

function logAxis(min: number, max: number): Axis {
  const lo = 10 ** Math.floor(Math.log10(Math.max(min, 1e-3)));
  const hi = 10 ** Math.ceil(Math.log10(max));
  const ticks: number[] = [];
  for (let t = lo; t <= hi * 1.0001; t *= 10) ticks.push(t);
  return { y: (v) => r1(M.top + plotH - ((Math.log10(Math.max(v, lo)) - Math.log10(lo)) / (Math.log10(hi) - Math.log10(lo))) * plotH), ticks };
}

function yAxis(axis: Axis, label: string): string {
  const grid = axis.ticks
    .map((t) => `<line x1="${M.left}" x2="${M.left + plotW}" y1="${axis.y(t)}" y2="${axis.y(t)}" stroke="#e5e5e5"/><text x="${M.left - 6}" y="${axis.y(t) + 4}" text-anchor="end">${num(t)}</text>`)
    .join('\n');
  return `${grid}
<line x1="${M.left}" x2="${M.left}" y1="${M.top}" y2="${M.top + plotH}" stroke="#333"/>
<line x1="${M.left}" x2="${M.left + plotW}" y1="${M.top + plotH}" y2="${M.top + plotH}" stroke="#333"/>
<text transform="translate(18 ${M.top + plotH / 2}) rotate(-90)" text-anchor="middle">${esc(label)}</text>`;
}

/** One row of colour keys, centred; each entry as wide as its label (about 6.5 px a character at 12 px). */
function legend(series: string[], y = H - 30, colors: readonly string[] = COLORS): string {
  const widths = series.map((s) => 30 + s.length * 6.5);
  let x = r1(W / 2 - widths.reduce((a, b) => a + b, 0) / 2);
  return series
    .map((s, i) => {
      const entry = `<rect x="${x}" y="${y - 10}" width="12" height="12" fill="${colors[i % colors.length]}"/><text x="${x + 18}" y="${y}">${esc(s)}</text>`;
      x = r1(x + widths[i]!);
      return entry;
    })
    .join('\n');
}

/** Grouped bars: one group per x label, one bar per series; values labelled on the bars. */
function barChart(options: { title: string; note?: string; groups: string[]; series: { name: string; values: number[] }[]; yLabel: string; xLabel: string; log?: boolean; stamp: Line }): string {
  const all = options.series.flatMap((s) => s.values).filter((v) => Number.isFinite(v));
  const axis = options.log ? logAxis(Math.min(...all), Math.max(...all)) : linearAxis(Math.max(...all));
  const groupW = plotW / options.groups.length;
  const barW = Math.min(48, (groupW * 0.8) / options.series.length);
  const bars: string[] = [];
  options.groups.forEach((g, gi) => {
    const x0 = M.left + gi * groupW + (groupW - barW * options.series.length) / 2;
    options.series.forEach((s, si) => {
      const v = s.values[gi];
      if (v === undefined || !Number.isFinite(v)) return;
      const x = r1(x0 + si * barW);
      const y = axis.y(v);
      bars.push(`<rect x="${x}" y="${y}" width="${barW - 2}" height="${r1(M.top + plotH - y)}" fill="${COLORS[si % COLORS.length]}"><title>${esc(`${s.name}, ${g}: ${num(v)}`)}</title></rect>`);
      bars.push(`<text x="${r1(x + (barW - 2) / 2)}" y="${y - 3}" text-anchor="middle" font-size="10">${num(v)}</text>`);
    });
    bars.push(`<text x="${M.left + gi * groupW + groupW / 2}" y="${M.top + plotH + 16}" text-anchor="middle">${esc(g)}</text>`);
  });
  const body = `${yAxis(axis, options.yLabel)}
${bars.join('\n')}
<text x="${M.left + plotW / 2}" y="${M.top + plotH + 34}" text-anchor="middle">${esc(options.xLabel)}</text>
${legend(options.series.map((s) => s.name))}`;
  return frame(options.title, body, options.stamp, options.note);
}

function write(name: string, svg: string): void {
  mkdirSync(outDir, { recursive: true });
  writeFileSync(path.join(outDir, name), svg);
  console.log(`wrote ${path.relative(root, path.join(outDir, name))}`);
}

interface Summary {
  n: number;
  p50: number;
  p90?: number;
  p99: number;
  p999: number;
  max: number;
}
const pcts = (s: Summary) => [s.p50, s.p90 ?? NaN, s.p99, s.p999, s.max];
const PCT_LABELS = ['p50', 'p90', 'p99', 'p99.9', 'max'];

// (a) hedging on vs off
const hedging = latest('scenario:hedging');
if (hedging) {
  const on = hedging.hedgingOn as Summary & { extraCallsPercent: number };
  const off = hedging.hedgingOff as Summary & { extraCallsPercent: number };
  write(
    'hedging-latency.svg',
    barChart({
      title: 'Decrypt latency with a heavy-tailed preferred backend',
      note: "backend a: 2 % of calls 2000 ms, else 5 ms; b, c: 5 ms; timeout 1000 ms; concurrency 16 for 10 s",
      groups: PCT_LABELS,
      series: [
        { name: `hedging on (n=${on.n}, +${on.extraCallsPercent} % calls)`, values: pcts(on) },
        { name: `hedging off (n=${off.n})`, values: pcts(off) },
      ],
      yLabel: 'latency, ms (log scale)',
      xLabel: 'percentile of Decrypt latency',
      log: true,
      stamp: hedging,
    }),
  );
}

// (b) fan-out encrypt latency
const fanout = latest('scenario:fanout');
if (fanout) {
  const g0 = fanout.grace0 as Summary & { copiesPerEnvelope: number };
  const g150 = fanout.grace150 as Summary & { copiesPerEnvelope: number };
  const serial = fanout.serial as Summary;
  write(
    'fanout-latency.svg',
    barChart({
      title: 'Encrypt latency: three backends at 20 / 50 / 200 ms, quorum 2',
      note: '160 Encrypts at concurrency 8 (serial baseline: 20 sequential wraps of all three backends)',
      groups: PCT_LABELS,
      series: [
        { name: `grace 0 ms (${g0.copiesPerEnvelope} copies)`, values: pcts(g0) },
        { name: `grace 150 ms (${g150.copiesPerEnvelope} copies)`, values: pcts(g150) },
        { name: 'serial (3 copies)', values: pcts(serial) },
      ],
      yLabel: 'latency, ms',
      xLabel: 'percentile of Encrypt latency',
      stamp: fanout,
    }),
  );
}

// (c) the matrix
// The Go client is the default and the apiserver-like one (bench/run.ts says why).
const matrix = latest('matrix', (l) => l.client === 'go') ?? latest('matrix');
if (matrix) {
  const results = matrix.results as { backends: number; concurrency: number; operation: string; opsPerSec: number; p99: number }[];
  const backends = [...new Set(results.map((r) => r.backends))].sort((a, b) => a - b);
  const concurrencies = [...new Set(results.map((r) => r.concurrency))].sort((a, b) => a - b);
  for (const operation of ['decrypt', 'encrypt']) {
    const Op = operation[0]!.toUpperCase() + operation.slice(1);
    write(
      `matrix-${operation}.svg`,
      barChart({
        title: `${Op} throughput through the unix socket, local key backends`,
        note: `quorum min(2, n); ${String(matrix.seconds)} s per cell; ${matrix.client === 'go' ? 'Go' : 'Node'} gRPC client on the same machine`,
        groups: backends.map((b) => `${b} backend${b === 1 ? '' : 's'}`),
        series: concurrencies.map((c) => ({
          name: `concurrency ${c}`,
          values: backends.map((b) => results.find((r) => r.backends === b && r.concurrency === c && r.operation === operation)?.opsPerSec ?? NaN),
        })),
        yLabel: `${Op}s per second`,
        xLabel: 'key backends in the envelope',
        stamp: matrix,
      }),
    );
  }
}

// (d) memory over time
const memory = latest('scenario:memory');
if (memory) {
  const samples = memory.samples as { t: number; phase: string; calls: number; rssMiB: number; heapUsedMiB: number; externalMiB: number }[];
  const gc = memory.gc as { label: string; t: number; heapMiB: number }[];
  const tMax = Math.max(...samples.map((s) => s.t), ...gc.map((p) => p.t));
  const axis = linearAxis(Math.max(...samples.map((s) => s.rssMiB)) * 1.05);
  const x = (t: number) => r1(M.left + (t / tMax) * plotW);
  const line = (values: [number, number][], color: string) =>
    `<polyline fill="none" stroke="${color}" stroke-width="1.8" points="${values.map(([t, v]) => `${x(t).toFixed(1)},${axis.y(v).toFixed(1)}`).join(' ')}"/>`;
  const phases: string[] = [];
  for (const phase of ['idle', 'load', 'churn', 'settle']) {
    const inPhase = samples.filter((s) => s.phase === phase);
    if (inPhase.length === 0) continue;
    const start = phase === 'idle' ? 0 : inPhase[0]!.t - 1;
    const end = inPhase.at(-1)!.t;
    const shade = phase === 'churn' ? '#f3f3f3' : phase === 'load' ? '#fbf3e6' : '#ffffff';
    phases.push(`<rect x="${x(start)}" y="${M.top}" width="${r1(Math.max(0, x(end) - x(start)))}" height="${plotH}" fill="${shade}"/>`);
    phases.push(`<text x="${r1((x(start) + x(end)) / 2)}" y="${M.top + 14}" text-anchor="middle" fill="#555">${phase}</text>`);
  }
  const xTicks = linearAxis(tMax).ticks.filter((t) => t <= tMax);
  const xAxis = xTicks.map((t) => `<text x="${x(t)}" y="${M.top + plotH + 16}" text-anchor="middle">${num(t)}</text>`).join('\n');
  const gcMarks = gc
    .map((p) => `<circle cx="${x(p.t)}" cy="${axis.y(p.heapMiB)}" r="4" fill="${COLORS[2]}"><title>${esc(`${p.label}: ${p.heapMiB} MiB`)}</title></circle>`)
    .join('\n');
  const body = `${phases.join('\n')}
${yAxis(axis, 'MiB')}
${line(
  samples.map((s) => [s.t, s.rssMiB]),
  COLORS[0]!,
)}
${line(
  samples.map((s) => [s.t, s.heapUsedMiB]),
  COLORS[1]!,
)}
${line(
  samples.map((s) => [s.t, s.externalMiB]),
  COLORS[3]!,
)}
${gcMarks}
${xAxis}
<text x="${M.left + plotW / 2}" y="${M.top + plotH + 34}" text-anchor="middle">seconds since the plugin was ready</text>
${legend(['RSS', 'heap used (/metrics)', 'heap after forced GC', 'external (Buffers)'], H - 30, [COLORS[0]!, COLORS[1]!, COLORS[2]!, COLORS[3]!])}`;
  write(
    'memory.svg',
    frame(
      'Plugin memory: idle, under load, and across the churn',
      body,
      memory,
      `3 local backends, concurrency ${String(memory.concurrency)}; churn = ${String(memory.churnCalls)} Encrypt + Decrypt calls on distinct envelopes`,
    ),
  );
}

// (e) Trousseau beside the Go peers (bench/peers.ts)
const peers = latest('scenario:peers');
if (peers) {
  const summary = peers.summary as Record<string, Record<string, number>>;
  const ids = Object.keys(summary);
  const note = `medians of ${String(peers.rounds)} interleaved rounds of ${String(peers.seconds)} s, concurrency 16, same local-kms and OpenBao, Go client`;
  write(
    'peers-throughput.svg',
    barChart({
      title: 'Trousseau and the Go KMS plugins: calls per second',
      note,
      groups: ['Decrypt', 'Encrypt'],
      series: ids.map((id) => ({ name: id, values: [summary[id]!.decryptPerSec!, summary[id]!.encryptPerSec!] })),
      yLabel: 'calls per second',
      xLabel: 'operation',
      stamp: peers,
    }),
  );
  write(
    'peers-cpu.svg',
    barChart({
      title: 'Plugin CPU per 1,000 calls (user + system)',
      note,
      groups: ['Decrypt', 'Encrypt'],
      series: ids.map((id) => ({ name: id, values: [summary[id]!.decryptCpuMsPer1000!, summary[id]!.encryptCpuMsPer1000!] })),
      yLabel: 'CPU ms per 1,000 calls',
      xLabel: 'operation',
      stamp: peers,
    }),
  );
}
