/**
 * The KMS v2 key_id, and when it changes. docs/design/key-id-and-health.md explains
 * the reasoning; in short:
 *
 * - Full key_id: a hash of the quorum and every configured backend's name, type and
 *   current key version. Same configuration and keys => same key_id on every
 *   instance; any key rotation or backend-set change => new key_id, so the
 *   apiserver makes a new DEK and reports older data stale.
 * - Partial key_id: while some (but at least quorum) backends are unhealthy, new
 *   envelopes lack their copies. The key_id then names the healthy set and the
 *   missing one. Data written meanwhile carries it, so once every backend is healthy
 *   again the key_id returns to the full one and that data reads as stale: a storage
 *   migration re-wraps it with every backend.
 * - Hysteresis: a backend counts as healthy again only after `recoverAfterMs` of
 *   uninterrupted health, so a flapping backend moves the key_id once, not on every
 *   flap (no DEK rotation storm).
 * - Below quorum the key_id is frozen: a change would make the apiserver call an
 *   Encrypt that cannot succeed, while the apiserver's current DEK keeps writes going.
 *   A process that starts below quorum has no key_id to freeze on, and any it made up
 *   would be new to the apiserver: it announces none (current() is undefined) until
 *   quorum is usable, so the rule holds across restarts without state on disk.
 */
import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import type { Metrics } from '../observability/metrics.ts';
import type { GuardedBackend } from './guarded-backend.ts';

export const KEY_ID_PREFIX = 'trousseau-v1-';

export interface KeyIdState {
  keyId: string;
  partial: boolean;
  /** Backends whose copies new envelopes may lack. */
  missing: string[];
}

function digest(text: string): string {
  return createHash('sha256').update(text).digest('hex').slice(0, 40);
}

/** How many distinct key_id inputs are remembered (full, partial ones, rotations) before the memo starts afresh. */
const MEMO_ENTRIES = 16;

export class KeyIdTracker {
  private last: KeyIdState | undefined;
  /** The configured backends, in key_id order (by name): the set never changes while the plugin runs. */
  private readonly byName: readonly GuardedBackend[];
  /**
   * Digests already computed, by their input (names, types, key versions: nothing
   * secret). Every Encrypt asks for its envelope's key_id, and the inputs change only
   * when a key rotates or a backend's health does.
   */
  private readonly memo = new Map<string, string>();
  private readonly quorum: number;
  private readonly recoverAfterMs: number;
  private readonly metrics: Metrics;
  private readonly logger: Logger;

  constructor(
    backends: readonly GuardedBackend[],
    quorum: number,
    recoverAfterMs: number,
    metrics: Metrics,
    logger: Logger) {
    this.byName = [...backends].sort((a, b) => (a.name < b.name ? -1 : 1));
    this.quorum = quorum;
    this.recoverAfterMs = recoverAfterMs;
    this.metrics = metrics;
    this.logger = logger;
  }

  /**
   * The key_id to announce now; undefined while none may be announced (below quorum
   * ever since this process started, see above).
   */
  current(): KeyIdState | undefined {
    const sorted = this.sorted();
    const healthy = this.healthy(sorted);
    if (healthy.length < sorted.length && healthy.length < this.quorum) {
      if (this.last !== undefined) return this.last; // below quorum: frozen, see above
      // Nothing announced yet: only once an Encrypt could succeed, so the first key_id
      // the apiserver sees is one it can get a DEK for.
      const usable = sorted.filter((b) => b.usable && b.knownKeyVersion !== undefined);
      if (usable.length < this.quorum) return undefined;
    }
    return this.adopt(this.stateFor(sorted, healthy));
  }

  /**
   * Backends whose copies new envelopes may lack right now: every one not healthy for
   * `recoverAfterMs` or without a known key version. Unlike `current().missing` this
   * is never frozen, so it is the complete list while below quorum.
   */
  lacking(): string[] {
    const sorted = this.sorted();
    const healthy = this.healthy(sorted);
    return sorted.filter((b) => !healthy.includes(b)).map((b) => b.name);
  }

  /**
   * The key_id for an envelope that Encrypt has just written with copies from
   * `wrappedBy`: the current one, unless that claims a copy the envelope lacks (the
   * key_id was frozen below quorum while a backend it names was down, or none was
   * announced yet). Then a partial key_id naming exactly the backends that wrapped is
   * adopted instead, so an envelope never carries a key_id that claims more copies
   * than it has.
   */
  forEnvelope(wrappedBy: readonly string[]): KeyIdState {
    const state = this.current();
    const sorted = this.sorted();
    if (state !== undefined) {
      const claimed = sorted.filter((b) => !state.missing.includes(b.name));
      if (claimed.every((b) => wrappedBy.includes(b.name))) return state;
    }
    const present = sorted.filter((b) => wrappedBy.includes(b.name) && b.knownKeyVersion !== undefined);
    return this.adopt(this.stateFor(sorted, present));
  }

  private healthy(sorted: readonly GuardedBackend[]): GuardedBackend[] {
    return sorted.filter((b) => b.settledHealthy(this.recoverAfterMs) && b.knownKeyVersion !== undefined);
  }

  private sorted(): readonly GuardedBackend[] {
    return this.byName;
  }

  private stateFor(sorted: readonly GuardedBackend[], healthy: readonly GuardedBackend[]): KeyIdState {
    const describe = (b: GuardedBackend) => [b.name, b.kind, b.knownKeyVersion];
    if (healthy.length === sorted.length) {
      return { keyId: KEY_ID_PREFIX + this.digestOf(['full', this.quorum, sorted.map(describe)]), partial: false, missing: [] };
    }
    const missing = sorted.filter((b) => !healthy.includes(b)).map((b) => b.name);
    return { keyId: `${KEY_ID_PREFIX}${this.digestOf(['partial', this.quorum, healthy.map(describe), missing])}-partial`, partial: true, missing };
  }

  private digestOf(parts: unknown): string {
    const text = JSON.stringify(parts);
    let known = this.memo.get(text);
    if (known === undefined) {
      if (this.memo.size >= MEMO_ENTRIES) this.memo.clear();
      known = digest(text);
      this.memo.set(text, known);
    }
    return known;
  }

  private adopt(next: KeyIdState): KeyIdState {
    if (next.keyId !== this.last?.keyId) {
      if (this.last) this.metrics.keyIdChanges.inc();
      this.logger.info({ keyId: next.keyId, partial: next.partial, missing: next.missing }, 'key_id changed');
      this.metrics.keyIdDegraded.set(next.partial ? 1 : 0);
    }
    this.last = next;
    return next;
  }
}
