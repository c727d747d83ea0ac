/** Renders the admin status as a terminal table. */
import type { BackendHealth } from '../engine/guarded-backend.ts';

export interface StatusDocument {
  keyId: string;
  partial: boolean;
  missing: string[];
  quorum: number;
  healthy: boolean;
  backends: BackendHealth[];
}

function ms(value: number | undefined): string {
  return value === undefined ? '-' : `${value < 10 ? value.toFixed(1) : Math.round(value)}ms`;
}

function ago(timestamp: number | undefined, now: number): string {
  if (timestamp === undefined) return '-';
  const seconds = Math.round((now - timestamp) / 1000);
  return seconds < 120 ? `${seconds}s ago` : `${Math.round(seconds / 60)}m ago`;
}

export function renderStatus(status: StatusDocument, now = Date.now()): string {
  const lines = [
    `key_id:  ${status.keyId}${status.partial ? `  (partial: new envelopes lack ${status.missing.join(', ')})` : ''}`,
    `quorum:  ${status.quorum} of ${status.backends.length}    serving: ${status.healthy ? 'yes' : 'NO BACKEND REACHABLE'}`,
    '',
  ];
  const header = ['BACKEND', 'TYPE', 'PRIO', 'HEALTH', 'BREAKER', 'P50', 'P99', 'KEY VERSION', 'LAST ERROR'];
  const rows = status.backends.map((b) => [
    b.name,
    b.kind,
    String(b.priority),
    b.probeOk === false ? 'down' : b.probeOk === undefined ? 'unknown' : 'up',
    b.breaker,
    ms(b.latencyMs.p50),
    ms(b.latencyMs.p99),
    b.keyVersion ?? '-',
    b.lastError ? `${b.lastError} ${ago(b.lastErrorAt, now)}` : '-',
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const format = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  return [...lines, format(header), ...rows.map(format)].join('\n');
}
