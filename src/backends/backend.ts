/**
 * The one extension point for key-management systems.
 *
 * A backend wraps and unwraps 32-byte data keys with a key it holds. It does nothing
 * else: timeouts, circuit breaking, retries of other copies, size checks, metrics and
 * error-to-status mapping all live in engine/guarded-backend.ts, which wraps every
 * call, so a backend file stays small and cannot skip them.
 *
 * Errors: throw a TrousseauError with code BACKEND_REJECTED when the server refused
 * because of the request or the key (access denied, disabled key, ciphertext not
 * ours), and BACKEND_UNAVAILABLE for anything that may succeed later (connection,
 * timeout, 5xx, throttling). Never put an SDK message that may hold a secret into
 * the error message; attach the original as `cause` instead.
 */
export interface KeyBackend {
  /** Configured instance name: a DNS label, unique in the configuration, recorded in every envelope. */
  readonly name: string;
  /** Backend type ("local", "vault", "aws", "azure"), for status and metrics. */
  readonly kind: string;

  /**
   * The key version new wraps will use (transit latest_version, Azure key version,
   * local key fingerprint). It feeds the key_id, so it must change when the key
   * rotates and be the same on every plugin instance with the same key.
   * Resolving it may call the server; it is refreshed by the health probe.
   */
  currentKeyVersion(signal: AbortSignal): Promise<string>;

  /** Wrap `dataKey`, bound to `context` where the backend supports it. */
  wrap(dataKey: Uint8Array, context: WrapContext, signal: AbortSignal): Promise<WrappedKey>;

  /** Unwrap a copy this backend made; `keyVersion` is what wrap() reported. */
  unwrap(wrapped: Uint8Array, keyVersion: string, context: WrapContext, signal: AbortSignal): Promise<Uint8Array>;

  /** Release clients, timers and file watchers. */
  close(): Promise<void>;

  /**
   * Optional, for backends that know it: when the credential they currently use expires
   * unless renewed or replaced, in Unix milliseconds (a Vault token's expiry). Undefined
   * when it never expires or is not known. Must answer from memory, without a call: it
   * is read at every escrow verification and exported as
   * `trousseau_backend_credential_expiry_timestamp_seconds` (in seconds).
   */
  credentialExpiresAt?(): number | undefined;
}

export interface WrappedKey {
  /** Opaque bytes the backend needs to unwrap, at most MAX_WRAPPED_KEY_BYTES. */
  wrapped: Uint8Array;
  /** Key version that made this copy (recorded in the envelope header). */
  keyVersion: string;
}

/**
 * What binds a wrapped copy to the envelope it belongs to. Backends with associated
 * data (AES-GCM AAD, Vault transit associated_data, AWS EncryptionContext) must pass
 * it, so a copy moved to another envelope fails to unwrap at the server.
 */
export interface WrapContext {
  /** Random per-envelope identifier (16 bytes). */
  envelopeId: Uint8Array;
  /** Name of the backend the copy is for. */
  backendName: string;
}

/** The context as bytes, for backends that take raw associated data. */
export function contextBytes(context: WrapContext): Buffer {
  return Buffer.from(`trousseau/v1/${Buffer.from(context.envelopeId).toString('hex')}/${context.backendName}`, 'utf8');
}

/** The context as a string map, for backends that take key/value context (AWS). */
export function contextMap(context: WrapContext): Record<string, string> {
  return {
    'trousseau:envelope': Buffer.from(context.envelopeId).toString('base64url'),
    'trousseau:backend': context.backendName,
  };
}
