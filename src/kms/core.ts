/** What the gRPC layer needs from the plugin: the KMS operations, nothing about backends. */
import type { Admission } from '../engine/admission.ts';
import type { Transport } from '../envelope/placement.ts';

export interface KmsStatus {
  /** "ok", or what is wrong (below quorum). */
  healthz: string;
  keyId: string;
}

export interface KmsEncrypted {
  ciphertext: Buffer;
  annotations: Map<string, Uint8Array>;
  keyId: string;
}

export interface KmsCore {
  /** Bound on Encrypt and Decrypt calls in flight and waiting; absent: unbounded. */
  readonly admission?: Admission;
  /** Throws (-> a gRPC error) when no backend can serve or no key_id may be announced, so the apiserver stops rotating. */
  status(): KmsStatus;
  encrypt(plaintext: Buffer, transport: Transport, signal: AbortSignal, uid?: string): Promise<KmsEncrypted>;
  decrypt(ciphertext: Buffer, annotations: ReadonlyMap<string, Uint8Array>, signal: AbortSignal, uid?: string): Promise<Buffer>;
  /** Detailed status for `trousseau status` (no secrets). */
  describe(): unknown;
  /** Escrow verification now (`trousseau verify --socket`); absent in cores without backends. */
  verifyEscrow?(signal: AbortSignal, renewReference: boolean): Promise<{ ok: boolean }>;
}
