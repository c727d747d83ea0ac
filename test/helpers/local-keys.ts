/**
 * Helpers for tests of local key files: a LocalKeyBackend behind a real GuardedBackend
 * (so probes, breaker and status are the plugin's own), a logger whose lines the test
 * reads, and a way to run shell commands as an unprivileged user.
 */
import { execFile } from 'node:child_process';
import { Writable } from 'node:stream';
import { promisify } from 'node:util';
import { LocalKeyBackend } from '../../src/backends/local.ts';
import { GuardedBackend } from '../../src/engine/guarded-backend.ts';
import { createLogger, type Logger } from '../../src/observability/logger.ts';
import { Metrics } from '../../src/observability/metrics.ts';

export interface CapturedLog {
  logger: Logger;
  /** Every line written so far, parsed. */
  lines(): { level: string; msg: string; [key: string]: unknown }[];
  /** Everything written so far, raw. */
  text(): string;
}

export function capturedLog(): CapturedLog {
  let raw = '';
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      raw += chunk.toString();
      done();
    },
  });
  return {
    logger: createLogger('debug', sink),
    lines: () =>
      raw
        .split('\n')
        .filter(Boolean)
        .map((l) => JSON.parse(l) as { level: string; msg: string }),
    text: () => raw,
  };
}

export interface GuardedLocal {
  backend: LocalKeyBackend;
  guarded: GuardedBackend;
  metrics: Metrics;
  log: CapturedLog;
}

/** A local backend `name` on `keyFile` behind a GuardedBackend with a small breaker volume. */
export function guardedLocal(name: string, keyFile: string, previousKeyFiles: string[] = []): GuardedLocal {
  const log = capturedLog();
  const metrics = new Metrics();
  const backend = new LocalKeyBackend(name, keyFile, previousKeyFiles, log.logger);
  const guarded = new GuardedBackend(
    backend,
    // A long timeout: these tests check what is refused, not latency, on shared busy cores.
    {
      timeoutMs: 30_000,
      priority: 100,
      breaker: { errorThresholdPercentage: 50, volumeThreshold: 5, rollingWindowMs: 10_000, resetTimeoutMs: 60_000 },
      admission: { maxInFlight: 32, maxQueued: 256, maxWaitMs: 1000 },
    },
    metrics,
    log.logger,
  );
  return { backend, guarded, metrics, log };
}

export const NOBODY = 65534;

/** Run `script` with /bin/sh as uid/gid 65534, no groups, no capabilities: an unprivileged local user. */
export async function asNobody(script: string): Promise<{ stdout: string; stderr: string }> {
  return promisify(execFile)('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--inh-caps=-all', '--no-new-privs', '/bin/sh', '-c', script]);
}

export const never = new AbortController().signal;
