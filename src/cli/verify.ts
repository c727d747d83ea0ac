/**
 * `trousseau verify`: one escrow verification (see engine/escrow-verifier.ts), for CI
 * pipelines and game days. Exit status 0 only when every backend alone decrypted.
 *
 * With --config it builds the plugin in-process from the configuration, without
 * serving anything, so it needs no running plugin; with --socket it asks a running
 * plugin through the admin API (and so also updates that plugin's status/metrics).
 */
import type { Command } from 'commander';
import { Option } from 'commander';
import { loadConfigFile } from '../config/load.ts';
import type { EscrowReport } from '../engine/escrow-verifier.ts';
import type * as T from '../kms/types.ts';
import { createLogger } from '../observability/logger.ts';
import { Metrics } from '../observability/metrics.ts';
import { Plugin } from '../plugin.ts';
import { call, clientsFor } from './client.ts';
import { escrowCell } from './status-view.ts';

export interface VerifyOptions {
  config?: string;
  socket?: string;
  renewCanary?: boolean;
  logLevel?: string;
}

const DEFAULT_SOCKET = '/var/run/trousseau/kms.sock';

/** Run one verification, in-process (--config) or through a running plugin (--socket). */
export async function runVerify(options: VerifyOptions): Promise<EscrowReport> {
  if (options.config && options.socket) throw new Error('give either --config FILE or --socket PATH, not both');
  const renew = options.renewCanary === true;
  if (options.config) {
    const { config, baseDir } = await loadConfigFile(options.config);
    const logger = createLogger((options.logLevel ?? 'error') as 'error');
    const plugin = await Plugin.create({ config, baseDir, logger, metrics: new Metrics() });
    try {
      return await plugin.verifyEscrow(undefined, renew);
    } finally {
      await plugin.close();
    }
  }
  const clients = clientsFor(options.socket ?? DEFAULT_SOCKET);
  try {
    // The plugin bounds the run by escrow.timeoutMs (at most 120 s); wait a little longer.
    const response = await call<T.AdminVerifyRequest, T.AdminVerifyResponse>(clients.admin, 'Verify', { renew_canary: renew }, 130_000);
    return JSON.parse(response.report_json) as EscrowReport;
  } finally {
    clients.close();
  }
}

export function renderEscrowReport(report: EscrowReport, now = Date.now()): string {
  const passed = report.backends.filter((b) => b.verified === true).length;
  const lines = [
    `escrow verification: ${report.ok ? 'PASS' : 'FAIL'} (${passed} of ${report.backends.length} ${report.backends.length === 1 ? 'backend decrypts' : 'backends decrypt'} alone${report.durationMs === undefined ? '' : `; ${report.durationMs} ms`})`,
    '',
  ];
  const header = ['BACKEND', 'ALONE DECRYPTS', 'FAILED STEP', 'LAST ERROR', 'KEY VERSION', 'OLD CANARY'];
  const rows = report.backends.map((b) => [
    b.backend,
    escrowCell(b, now),
    b.verified === false ? (b.stage ?? '?') : '-',
    b.lastError ?? '-',
    b.keyVersion ?? '-',
    b.retained === true ? 'opens' : b.verified === false && b.stage === 'retained' ? 'DOES NOT OPEN' : 'not covered',
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const format = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  return [...lines, format(header), ...rows.map(format)].join('\n');
}

export function registerVerifyCommand(program: Command): void {
  program
    .command('verify')
    .description('prove that each backend ALONE decrypts a canary envelope; exits 1 when any backend cannot')
    .option('-c, --config <file>', 'build the plugin from this configuration in-process (no running plugin needed)')
    .option('-s, --socket <path>', `ask the running plugin on this socket (default ${DEFAULT_SOCKET} when no --config)`)
    .option('--json', 'print the report as JSON')
    .option('--renew-canary', 'replace the reference canary with this run\'s one (after deliberately retiring an old key version)')
    .addOption(new Option('--log-level <level>', 'with --config: log level on stderr').choices(['fatal', 'error', 'warn', 'info', 'debug', 'silent']).default('error'))
    .action(async (options: VerifyOptions & { json?: boolean }) => {
      const report = await runVerify(options);
      console.log(options.json ? JSON.stringify(report, null, 2) : renderEscrowReport(report));
      if (!report.ok) process.exitCode = 1;
    });
}
