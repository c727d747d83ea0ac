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
import { createCipheriv, createDecipheriv, createSecretKey, hkdfSync, randomBytes, timingSafeEqual, type KeyObject } from 'node:crypto';
import { TrousseauError } from '../errors.ts';
import { COMMITMENT_BYTES, NONCE_BYTES, TAG_BYTES, encodeHeader, headerSize, type CopyToEncode, type ParsedEnvelope } from './format.ts';
import { DATA_KEY_BYTES, ENVELOPE_ID_BYTES, MAX_PLAINTEXT_BYTES } from './limits.ts';

const COMMITMENT_INFO = Buffer.from('trousseau/v1 key commitment');
const PAYLOAD_KEY_INFO = Buffer.from('trousseau/v1 payload key');

export function newDataKey(): Buffer {
  return randomBytes(DATA_KEY_BYTES);
}

export function newEnvelopeId(): Buffer {
  return randomBytes(ENVELOPE_ID_BYTES);
}

/** A data key as HKDF input. Build it once per key: hkdfSync would otherwise make a KeyObject per derivation. */
export type DataKeyMaterial = Uint8Array | KeyObject;

export function dataKeyMaterial(dataKey: Uint8Array): KeyObject {
  return createSecretKey(dataKey);
}

function derive(dataKey: DataKeyMaterial, envelopeId: Uint8Array, info: Buffer): Buffer {
  return Buffer.from(hkdfSync('sha256', dataKey, envelopeId, info, 32));
}

function keyLength(dataKey: DataKeyMaterial): number {
  return dataKey instanceof Uint8Array ? dataKey.length : (dataKey.symmetricKeySize ?? 0);
}

export function keyCommitment(dataKey: DataKeyMaterial, envelopeId: Uint8Array): Buffer {
  return derive(dataKey, envelopeId, COMMITMENT_INFO);
}

/** Constant-time check that `candidate` is the key the envelope committed to. */
export function matchesCommitment(candidate: DataKeyMaterial, envelope: Pick<ParsedEnvelope, 'envelopeId' | 'commitment'>): boolean {
  if (keyLength(candidate) !== DATA_KEY_BYTES) return false;
  const expected = keyCommitment(candidate, envelope.envelopeId);
  return expected.length === envelope.commitment.length && timingSafeEqual(expected, envelope.commitment);
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
  const nonce = randomBytes(NONCE_BYTES);
  const material = dataKeyMaterial(input.dataKey);
  const header = encodeHeader({
    envelopeId: input.envelopeId,
    quorum: input.quorum,
    configuredBackends: input.configuredBackends,
    copies: input.copies,
    commitment: keyCommitment(material, input.envelopeId),
    nonce,
    payloadLength: input.plaintext.length + TAG_BYTES,
  });
  const payloadKey = derive(material, input.envelopeId, PAYLOAD_KEY_INFO);
  try {
    const cipher = createCipheriv('aes-256-gcm', payloadKey, nonce);
    cipher.setAAD(header);
    return Buffer.concat([header, cipher.update(input.plaintext), cipher.final(), cipher.getAuthTag()]);
  } finally {
    payloadKey.fill(0);
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
  const payloadKey = derive(dataKey, envelope.envelopeId, PAYLOAD_KEY_INFO);
  try {
    const sealed = envelope.sealedPayload;
    const decipher = createDecipheriv('aes-256-gcm', payloadKey, envelope.nonce);
    decipher.setAAD(envelope.headerBytes);
    decipher.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES));
    return Buffer.concat([decipher.update(sealed.subarray(0, sealed.length - TAG_BYTES)), decipher.final()]);
  } catch (error) {
    throw new TrousseauError('TAMPERED', 'envelope failed authentication: its header or payload was altered', { cause: error });
  } finally {
    payloadKey.fill(0);
  }
}

export { COMMITMENT_BYTES };
