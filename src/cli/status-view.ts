/** Renders the admin status as a terminal table. */
import type { BackendEscrow, EscrowReport } from '../engine/escrow-verifier.ts';
import type { BackendHealth } from '../engine/guarded-backend.ts';

export interface StatusDocument {
  keyId: string;
  partial: boolean;
  missing: string[];
  quorum: number;
  healthy: boolean;
  backends: BackendHealth[];
  /** Escrow verification (absent from plugins that predate it). */
  escrow?: EscrowReport;
}

/** "yes 5m" / "NO wrap:BACKEND_REJECTED 2m" / "-" (not verified yet): can this backend alone decrypt? */
export function escrowCell(escrow: BackendEscrow | undefined, now: number): string {
  if (escrow?.verified === undefined) return '-';
  const since = escrow.since === undefined ? '' : ` ${ago(escrow.since, now).replace(' ago', '')}`;
  return escrow.verified ? `yes${since}` : `NO ${escrow.stage ?? '?'}:${escrow.lastError ?? '?'}${since}`;
}

function ms(value: number | undefined): string {
  return value === undefined ? '-' : `${value < 10 ? value.toFixed(1) : Math.round(value)}ms`;
}

function ago(timestamp: number | undefined, now: number): string {
  if (timestamp === undefined) return '-';
  const seconds = Math.round((now - timestamp) / 1000);
  return seconds < 120 ? `${seconds}s ago` : `${Math.round(seconds / 60)}m ago`;
}

function escrowLine(escrow: EscrowReport | undefined, now: number): string {
  if (!escrow) return 'unknown (plugin does not report it)';
  if (escrow.lastRunAt === undefined) return escrow.enabled ? 'not verified yet' : 'scheduled checks disabled (run: trousseau verify)';
  const failing = escrow.backends.filter((b) => b.verified === false).map((b) => b.backend);
  const when = `checked ${ago(escrow.lastRunAt, now)}`;
  return failing.length === 0 ? `every backend alone decrypts (${when})` : `FAILING: ${failing.join(', ')} cannot decrypt alone (${when})`;
}

export function renderStatus(status: StatusDocument, now = Date.now()): string {
  const lines = [
    `key_id:  ${status.keyId}${status.partial ? `  (partial: new envelopes lack ${status.missing.join(', ')})` : ''}`,
    `quorum:  ${status.quorum} of ${status.backends.length}    serving: ${status.healthy ? 'yes' : 'NO BACKEND REACHABLE'}`,
    `escrow:  ${escrowLine(status.escrow, now)}`,
    '',
  ];
  const header = ['BACKEND', 'TYPE', 'PRIO', 'HEALTH', 'BREAKER', 'P50', 'P99', 'KEY VERSION', 'LAST ERROR', 'ALONE DECRYPTS'];
  const escrow = new Map((status.escrow?.backends ?? []).map((e) => [e.backend, e]));
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
    escrowCell(escrow.get(b.name), now),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const format = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  return [...lines, format(header), ...rows.map(format)].join('\n');
}
