/**
 * The cryptography of envelope format version 1.
 *
 * From the random data key K and the envelope id (as HKDF salt) we derive two
 * independent values: a 32-byte key commitment stored in the header, and the
 * AES-256-GCM key that seals the payload with the whole header as associated data.
 *
 * - The commitment is checked in constant time on every unwrapped key before it is
 *   used, so a copy that wraps a different key (key substitution, "invisible
 *   salamanders") is caught and the next copy tried.
 * - The header is the payload's AAD, so dropping, reordering, swapping or splicing
 *   copies, or changing the quorum or the version, makes the payload fail to open.
 */
import { createCipheriv, createDecipheriv, createSecretKey, randomFillSync, timingSafeEqual, type KeyObject } from 'node:crypto';
import { TrousseauError } from '../errors.ts';
import { COMMITMENT_BYTES, NONCE_BYTES, TAG_BYTES, encodeHeader, headerSize, type CopyToEncode, type ParsedEnvelope } from './format.ts';
import { hkdfExpand32, hkdfExtract } from './hkdf.ts';
import { DATA_KEY_BYTES, ENVELOPE_ID_BYTES, MAX_PLAINTEXT_BYTES } from './limits.ts';
import { pooledRandomBytes } from './random.ts';

const COMMITMENT_INFO = Buffer.from('trousseau/v1 key commitment');
const PAYLOAD_KEY_INFO = Buffer.from('trousseau/v1 payload key');

/**
 * A fresh data key, straight from the CSPRNG into memory of its own that the caller
 * wipes. Never from the random pool (random.ts): the pool holds bytes before they
 * are handed out, so a key drawn from it would sit in memory before its life began.
 * Costs about 4 us of CPU more per Encrypt than the pool (docs/security.md, "What stays in memory").
 */
export function newDataKey(): Buffer {
  return randomFillSync(Buffer.allocUnsafeSlow(DATA_KEY_BYTES));
}

/** Envelope ids are public (they are in the header), so they may come from the pool. */
export function newEnvelopeId(): Buffer {
  return pooledRandomBytes(ENVELOPE_ID_BYTES);
}

/**
 * What one data key yields for one envelope: HKDF-SHA256 with the envelope id as salt,
 * extracted once and expanded twice (the commitment and the payload key). Call
 * `wipe()` when done.
 */
export class EnvelopeKeys {
  readonly commitment: Buffer;
  private readonly payloadKeyBytes: Buffer;

  constructor(dataKey: Uint8Array, envelopeId: Uint8Array) {
    const pseudorandomKey = hkdfExtract(envelopeId, dataKey);
    try {
      this.commitment = hkdfExpand32(pseudorandomKey, COMMITMENT_INFO);
      this.payloadKeyBytes = hkdfExpand32(pseudorandomKey, PAYLOAD_KEY_INFO);
    } finally {
      pseudorandomKey.fill(0);
    }
  }

  /** Constant-time comparison with the commitment an envelope carries. */
  matches(commitment: Uint8Array): boolean {
    return commitment.length === this.commitment.length && timingSafeEqual(this.commitment, commitment);
  }

  /**
   * The payload key as a KeyObject. Why not hand the Buffer to createCipheriv: Node 24
   * first asks whether a key is a KeyObject or a CryptoKey by catching two thrown
   * TypeErrors: 32 us per Decrypt in a profile under load, more than the cipher. The
   * KeyObject's native copy is cleared when it is freed.
   */
  payloadKey(): KeyObject {
    return createSecretKey(this.payloadKeyBytes);
  }

  wipe(): void {
    this.payloadKeyBytes.fill(0);
  }
}

/** A data key, or the keys already derived from it for this envelope. */
export type DataKeyMaterial = Uint8Array | EnvelopeKeys;

function keysFor(material: DataKeyMaterial, envelopeId: Uint8Array): { keys: EnvelopeKeys; owned: boolean } {
  return material instanceof EnvelopeKeys ? { keys: material, owned: false } : { keys: new EnvelopeKeys(material, envelopeId), owned: true };
}

export function keyCommitment(dataKey: Uint8Array, envelopeId: Uint8Array): Buffer {
  const keys = new EnvelopeKeys(dataKey, envelopeId);
  keys.wipe();
  return keys.commitment;
}

/** Constant-time check that `candidate` is the key the envelope committed to. */
export function matchesCommitment(candidate: DataKeyMaterial, envelope: Pick<ParsedEnvelope, 'envelopeId' | 'commitment'>): boolean {
  if (candidate instanceof Uint8Array && candidate.length !== DATA_KEY_BYTES) return false;
  const { keys, owned } = keysFor(candidate, envelope.envelopeId);
  try {
    return keys.matches(envelope.commitment);
  } finally {
    if (owned) keys.wipe();
  }
}

export interface SealInput {
  dataKey: Uint8Array;
  envelopeId: Uint8Array;
  quorum: number;
  configuredBackends: number;
  copies: readonly CopyToEncode[];
  plaintext: Uint8Array;
}

/** Build a complete envelope. The caller decides where each copy lives (see placement.ts). */
export function sealEnvelope(input: SealInput): Buffer {
  if (input.plaintext.length > MAX_PLAINTEXT_BYTES) throw new TrousseauError('INVALID_INPUT', 'plaintext too large');
  const nonce = pooledRandomBytes(NONCE_BYTES); // public: it is in the header
  const keys = new EnvelopeKeys(input.dataKey, input.envelopeId);
  try {
    const header = encodeHeader({
      envelopeId: input.envelopeId,
      quorum: input.quorum,
      configuredBackends: input.configuredBackends,
      copies: input.copies,
      commitment: keys.commitment,
      nonce,
      payloadLength: input.plaintext.length + TAG_BYTES,
    });
    const cipher = createCipheriv('aes-256-gcm', keys.payloadKey(), nonce);
    cipher.setAAD(header);
    return Buffer.concat([header, cipher.update(input.plaintext), cipher.final(), cipher.getAuthTag()]);
  } finally {
    keys.wipe();
  }
}

/** Size the envelope will have, for placement decisions. */
export function envelopeSize(copies: readonly CopyToEncode[], plaintextLength: number): number {
  return headerSize(copies) + plaintextLength + TAG_BYTES;
}

/**
 * Open the payload with a data key that already passed matchesCommitment. A failure
 * here means the header or payload was altered: no other copy can do better.
 */
export function openPayload(envelope: ParsedEnvelope, dataKey: DataKeyMaterial): Buffer {
  const { keys, owned } = keysFor(dataKey, envelope.envelopeId);
  try {
    const sealed = envelope.sealedPayload;
    const decipher = createDecipheriv('aes-256-gcm', keys.payloadKey(), envelope.nonce);
    decipher.setAAD(envelope.headerBytes);
    decipher.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES));
    // GCM gives every byte from update(); final() only checks the tag, and nothing
    // unauthenticated leaves this function.
    const plaintext = decipher.update(sealed.subarray(0, sealed.length - TAG_BYTES));
    try {
      decipher.final();
    } catch (error) {
      plaintext.fill(0);
      throw error;
    }
    return plaintext;
  } catch (error) {
    throw new TrousseauError('TAMPERED', 'envelope failed authentication: its header or payload was altered', { cause: error });
  } finally {
    if (owned) keys.wipe();
  }
}

export { COMMITMENT_BYTES };
