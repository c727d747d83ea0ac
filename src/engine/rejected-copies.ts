/**
 * Copies a backend refused while another copy of the same envelope opened it.
 *
 * The envelope is genuine (another copy passed its key commitment), so a refusal
 * here means this backend can no longer open a copy it wrapped: typically its key
 * was deleted and re-created under the same name, or an old key version was disabled
 * or trimmed. Failover hides that from the apiserver, and without this record the
 * only trace is two counters; yet data whose surviving copies are all from this
 * backend would be lost. So each such copy is counted per backend for `trousseau
 * status`, and a warning naming the backend and the error class (never a value from
 * the envelope) is logged at most once per `warnEveryMs` per backend.
 */
import type { Logger } from 'pino';
import type { ErrorCode } from '../errors.ts';

export interface RejectedCopies {
  backend: string;
  /** Copies refused since the plugin started. */
  count: number;
  /** Error class of the last refusal (BACKEND_REJECTED, TAMPERED). */
  lastReason: ErrorCode;
  lastAt: number;
}

interface Entry extends RejectedCopies {
  warnedAt: number | undefined;
  /** Refusals since the last warning. */
  sinceWarning: number;
}

export class RejectedCopyTracker {
  /** Keyed by configured backend name only (the engine never calls another), so bounded. */
  private readonly entries = new Map<string, Entry>();
  private readonly logger: Logger;
  private readonly warnEveryMs: number;
  private readonly now: () => number;

  constructor(logger: Logger, warnEveryMs = 60_000, now: () => number = Date.now) {
    this.logger = logger;
    this.warnEveryMs = warnEveryMs;
    this.now = now;
  }

  record(backend: string, reason: ErrorCode): void {
    const at = this.now();
    const entry = this.entries.get(backend) ?? { backend, count: 0, lastReason: reason, lastAt: at, warnedAt: undefined, sinceWarning: 0 };
    entry.count++;
    entry.sinceWarning++;
    entry.lastReason = reason;
    entry.lastAt = at;
    this.entries.set(backend, entry);
    if (entry.warnedAt !== undefined && at - entry.warnedAt < this.warnEveryMs) return;
    this.logger.warn(
      { backend, reason, copies: entry.sinceWarning, total: entry.count },
      'a backend refused its copy of an envelope that another copy opened: it can no longer decrypt data it wrapped (key re-created, disabled or trimmed?)',
    );
    entry.warnedAt = at;
    entry.sinceWarning = 0;
  }

  report(): RejectedCopies[] {
    return [...this.entries.values()].map(({ backend, count, lastReason, lastAt }) => ({ backend, count, lastReason, lastAt }));
  }
}
