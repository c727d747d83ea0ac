/** Renders the admin status as a terminal table. */
import type { BackendEscrow, EscrowReport } from '../engine/escrow-verifier.ts';
import type { BackendHealth } from '../engine/guarded-backend.ts';
import type { RejectedCopies } from '../engine/rejected-copies.ts';

export interface StatusDocument {
  /** Absent while no key_id is announced (below quorum since the plugin started). */
  keyId?: string;
  partial: boolean;
  /** Backends whose copies new envelopes may lack. */
  missing: string[];
  quorum: number;
  /** Backends usable now (absent from plugins that predate it). */
  usable?: number;
  /** Ready to serve: quorum usable (older plugins: at least one backend usable). */
  healthy: boolean;
  /** Why not ready (absent from plugins that predate it). */
  reasons?: string[];
  backends: BackendHealth[];
  /** Copies each backend refused while another copy opened the envelope. */
  rejectedCopies?: RejectedCopies[];
  /** Escrow verification (absent from plugins that predate it). */
  escrow?: EscrowReport;
}

/** "yes 5m" / "NO wrap:BACKEND_REJECTED 2m" / "-" (not verified yet): can this backend alone decrypt? */
export function escrowCell(escrow: BackendEscrow | undefined, now: number): string {
  if (escrow?.verified === undefined) return '-';
  const since = escrow.since === undefined ? '' : ` ${ago(escrow.since, now).replace(' ago', '')}`;
  return escrow.verified ? `yes${since}` : `NO ${escrow.stage ?? '?'}:${escrow.lastError ?? '?'}${since}`;
}

/** Widest KEY VERSION cell: an AWS key ARN is ~75 characters and would push the table past 200 columns. */
const MAX_KEY_VERSION_WIDTH = 40;

/** `text` shortened in the middle, where ARNs and ids differ least usefully; `--json` has it in full. */
export function middleTruncate(text: string, max = MAX_KEY_VERSION_WIDTH): string {
  if (text.length <= max) return text;
  const tail = Math.floor((max - 3) / 2);
  return `${text.slice(0, max - 3 - tail)}...${text.slice(text.length - tail)}`;
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

/** "3 BACKEND_REJECTED 2m ago" / "-": copies this backend could no longer open. */
function rejectedCell(rejected: RejectedCopies | undefined, now: number): string {
  return rejected ? `${rejected.count} ${rejected.lastReason} ${ago(rejected.lastAt, now)}` : '-';
}

/**
 * The cause behind each LAST ERROR, below the table (a cell would make the table as
 * wide as the longest message); `--json` has it whole as lastErrorCause.
 */
function causeLines(backends: StatusDocument['backends'], now: number): string[] {
  const withCause = backends.filter((b) => b.lastError && b.lastErrorCause);
  if (withCause.length === 0) return [];
  const width = Math.max(...withCause.map((b) => b.name.length));
  return ['', 'last errors:', ...withCause.map((b) => `  ${b.name.padEnd(width)}  ${b.lastError} ${ago(b.lastErrorAt, now)}: ${middleTruncate(b.lastErrorCause!, 160)}`)];
}

function servingLine(status: StatusDocument): string {
  if (status.healthy) return 'yes';
  return status.reasons?.length ? `NO: ${status.reasons.join('; ')}` : 'NO BACKEND REACHABLE';
}

export function renderStatus(status: StatusDocument, now = Date.now()): string {
  const usable = status.usable === undefined ? '' : `    usable: ${status.usable}`;
  const lines = [
    `key_id:  ${status.keyId ?? 'none announced yet (below quorum since start)'}${status.partial ? '  (partial)' : ''}`,
    `quorum:  ${status.quorum} of ${status.backends.length}${usable}    serving: ${servingLine(status)}`,
    ...(status.missing.length > 0 ? [`missing: ${status.missing.join(', ')} (new envelopes lack their copies)`] : []),
    `escrow:  ${escrowLine(status.escrow, now)}`,
    '',
  ];
  const header = ['BACKEND', 'TYPE', 'PRIO', 'HEALTH', 'BREAKER', 'P50', 'P99', 'KEY VERSION', 'LAST ERROR', 'REJECTED COPIES', 'ALONE DECRYPTS'];
  const escrow = new Map((status.escrow?.backends ?? []).map((e) => [e.backend, e]));
  const rejected = new Map((status.rejectedCopies ?? []).map((r) => [r.backend, r]));
  const rows = status.backends.map((b) => [
    b.name,
    b.kind,
    String(b.priority),
    b.probeOk === false ? 'down' : b.probeOk === undefined ? 'unknown' : 'up',
    b.breaker,
    ms(b.latencyMs.p50),
    ms(b.latencyMs.p99),
    b.keyVersion === undefined ? '-' : middleTruncate(b.keyVersion),
    b.lastError ? `${b.lastError} ${ago(b.lastErrorAt, now)}` : '-',
    rejectedCell(rejected.get(b.name), now),
    escrowCell(escrow.get(b.name), now),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const format = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  return [...lines, format(header), ...rows.map(format), ...causeLines(status.backends, now)].join('\n');
}
