/**
 * Every error Trousseau raises on purpose is a TrousseauError with a stable `code`.
 *
 * The code, not the message, decides how the error reaches a client (see
 * kms/grpc-status.ts) and whether it counts against a backend's circuit breaker
 * (see engine/guarded-backend.ts). Messages are written for operators and must never
 * contain plaintext, key material, tokens or raw SDK messages: those go to `cause`,
 * which is never serialised to a client.
 */
export type ErrorCode =
  /** The request itself is malformed (bad envelope, oversized input, unknown field). */
  | 'INVALID_INPUT'
  /** The envelope parsed but failed authentication: tampered, spliced or foreign. */
  | 'TAMPERED'
  /** A backend refused the call because of the caller or the key (denied, disabled key, wrong ciphertext). */
  | 'BACKEND_REJECTED'
  /** A backend could not be reached or answered with a transient failure (timeout, 5xx, throttling). */
  | 'BACKEND_UNAVAILABLE'
  /** A backend's circuit breaker is open: the call was not attempted. */
  | 'BREAKER_OPEN'
  /** Fewer backends than the quorum wrapped the key. */
  | 'QUORUM_NOT_MET'
  /** No backend could unwrap any copy of the data key. */
  | 'NO_COPY_UNWRAPPED'
  /** The call ran past its deadline. */
  | 'DEADLINE'
  /** The configuration file is invalid. */
  | 'CONFIG'
  /** The caller abandoned the call (a hedge that lost, a client that went away). */
  | 'CANCELLED'
  /** The plugin is shutting down. */
  | 'SHUTTING_DOWN'
  /** Refused or shed by the plugin's own admission control: says nothing about any backend. */
  | 'OVERLOADED'
  /** A bug: an invariant did not hold. */
  | 'INTERNAL';

const MARKER = Symbol.for('trousseau.error');

export class TrousseauError extends Error {
  readonly code: ErrorCode;
  readonly [MARKER] = true;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'TrousseauError';
    this.code = code;
  }
}

/** True for a TrousseauError, even one created by another copy of this package. */
export function isTrousseauError(error: unknown): error is TrousseauError {
  return typeof error === 'object' && error !== null && (error as Record<symbol, unknown>)[MARKER] === true;
}

/** The error code of any thrown value; anything we did not raise on purpose is INTERNAL. */
export function errorCodeOf(error: unknown): ErrorCode {
  return isTrousseauError(error) ? error.code : 'INTERNAL';
}
