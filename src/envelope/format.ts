/**
 * Envelope format version 1: byte layout, encoding and bounds-checked parsing.
 * docs/envelope.md describes the layout and the reasons for it.
 *
 *   magic "TR" | version 0x01 | flags 0x00 | envelope id (16)
 *   quorum (1) | backends configured at write time (1) | copy count (1)
 *   copies: name len (1) name | key version len (1) version | location (1) | wrapped len (2)
 *           | inline: wrapped bytes  or  annotation: SHA-256 of the wrapped bytes (32)
 *   key commitment (32) | payload nonce (12) | payload len (2)
 *   ---------------------------- header ends here: all of it is the payload's AAD
 *   payload: AES-256-GCM(ciphertext | tag)
 *
 * Parsing never decrypts anything: it only checks structure and bounds, so the
 * result may be forged until crypto.ts opens the payload.
 */
import { createHash } from 'node:crypto';
import { TrousseauError } from '../errors.ts';
import {
  ENVELOPE_ID_BYTES,
  MAX_COPIES,
  MAX_KEY_VERSION_BYTES,
  MAX_PLAINTEXT_BYTES,
  MAX_WRAPPED_BYTES,
} from './limits.ts';

export const MAGIC = Buffer.from('TR', 'ascii');
export const FORMAT_VERSION = 1;
export const COMMITMENT_BYTES = 32;
export const NONCE_BYTES = 12;
export const TAG_BYTES = 16;
const DIGEST_BYTES = 32;

/** Annotation domain for wrapped copies that do not fit in a KMS v2 ciphertext. */
export const ANNOTATION_DOMAIN = 'wrapped-key.trousseau.io';
export function annotationKeyFor(backendName: string): string {
  return `${backendName}.${ANNOTATION_DOMAIN}`;
}

const NAME_PATTERN = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
const VERSION_PATTERN = /^[\x21-\x7e]{1,255}$/;

export type Location = 'inline' | 'annotation';

export interface CopyEntry {
  backendName: string;
  keyVersion: string;
  location: Location;
  /** The wrapped key; for annotation copies, resolved from the annotations (undefined if absent or altered). */
  wrapped: Uint8Array | undefined;
  /** Declared length of the wrapped key. */
  wrappedLength: number;
}

export interface EnvelopeHeader {
  formatVersion: number;
  envelopeId: Uint8Array;
  quorum: number;
  configuredBackends: number;
  copies: CopyEntry[];
  commitment: Uint8Array;
  nonce: Uint8Array;
}

export interface ParsedEnvelope extends EnvelopeHeader {
  /** The header bytes, authenticated as the payload's associated data. */
  headerBytes: Uint8Array;
  /** Payload ciphertext followed by its GCM tag. */
  sealedPayload: Uint8Array;
}

export interface CopyToEncode {
  backendName: string;
  keyVersion: string;
  wrapped: Uint8Array;
  location: Location;
}

export interface HeaderToEncode {
  envelopeId: Uint8Array;
  quorum: number;
  configuredBackends: number;
  copies: readonly CopyToEncode[];
  commitment: Uint8Array;
  nonce: Uint8Array;
  payloadLength: number;
}

function invalid(message: string): TrousseauError {
  return new TrousseauError('INVALID_INPUT', `malformed envelope: ${message}`);
}

/** Size of the encoded header, computed without encoding it. */
export function headerSize(copies: readonly Pick<CopyToEncode, 'backendName' | 'keyVersion' | 'wrapped' | 'location'>[]): number {
  let size = MAGIC.length + 2 + ENVELOPE_ID_BYTES + 3;
  for (const copy of copies) {
    size += 1 + Buffer.byteLength(copy.backendName) + 1 + Buffer.byteLength(copy.keyVersion) + 1 + 2;
    size += copy.location === 'inline' ? copy.wrapped.length : DIGEST_BYTES;
  }
  return size + COMMITMENT_BYTES + NONCE_BYTES + 2;
}

export function encodeHeader(header: HeaderToEncode): Buffer {
  const { copies } = header;
  if (copies.length < 1 || copies.length > MAX_COPIES) throw new TrousseauError('INTERNAL', 'copy count out of range');
  const out = Buffer.alloc(headerSize(copies));
  let at = MAGIC.copy(out, 0);
  at = out.writeUInt8(FORMAT_VERSION, at);
  at = out.writeUInt8(0, at); // flags: none defined in version 1
  at += Buffer.from(header.envelopeId).copy(out, at);
  at = out.writeUInt8(header.quorum, at);
  at = out.writeUInt8(header.configuredBackends, at);
  at = out.writeUInt8(copies.length, at);
  for (const copy of copies) {
    if (!NAME_PATTERN.test(copy.backendName)) throw new TrousseauError('INTERNAL', 'backend name is not a DNS label');
    if (!VERSION_PATTERN.test(copy.keyVersion)) throw new TrousseauError('INTERNAL', 'key version is not printable ASCII of 1..255 bytes');
    if (copy.wrapped.length < 1 || copy.wrapped.length > MAX_WRAPPED_BYTES) throw new TrousseauError('INTERNAL', 'wrapped key size out of range');
    at = out.writeUInt8(copy.backendName.length, at);
    at += out.write(copy.backendName, at, 'ascii');
    at = out.writeUInt8(copy.keyVersion.length, at);
    at += out.write(copy.keyVersion, at, 'ascii');
    at = out.writeUInt8(copy.location === 'inline' ? 0 : 1, at);
    at = out.writeUInt16BE(copy.wrapped.length, at);
    at += copy.location === 'inline' ? Buffer.from(copy.wrapped).copy(out, at) : sha256(copy.wrapped).copy(out, at);
  }
  at += Buffer.from(header.commitment).copy(out, at);
  at += Buffer.from(header.nonce).copy(out, at);
  at = out.writeUInt16BE(header.payloadLength, at);
  if (at !== out.length) throw new TrousseauError('INTERNAL', 'header size mismatch');
  return out;
}

/** A cursor that refuses to read past the end: every read is bounds-checked first. */
class Reader {
  private at = 0;
  private readonly bytes: Buffer;

  constructor(bytes: Uint8Array) {
    // A Buffer view of the same memory (no copy), for its latin1 decoding.
    this.bytes = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  get offset(): number {
    return this.at;
  }

  private need(length: number, what: string): number {
    if (length > this.bytes.length - this.at) throw invalid(`truncated ${what}`);
    const start = this.at;
    this.at += length;
    return start;
  }

  take(length: number, what: string): Uint8Array {
    const start = this.need(length, what);
    return this.bytes.subarray(start, start + length);
  }

  u8(what: string): number {
    return this.bytes[this.need(1, what)]!;
  }

  u16(what: string): number {
    return this.bytes.readUInt16BE(this.need(2, what));
  }

  ascii(length: number, what: string): string {
    const start = this.need(length, what);
    return this.bytes.toString('latin1', start, start + length);
  }
}

/**
 * Parse an envelope. `annotations` supplies the copies stored outside the ciphertext
 * (KMS v2); a copy whose annotation is missing or does not match its digest is kept
 * with `wrapped: undefined`, so the remaining copies can still be tried.
 */
export function parseEnvelope(ciphertext: Uint8Array, annotations: ReadonlyMap<string, Uint8Array> = new Map()): ParsedEnvelope {
  const r = new Reader(ciphertext);
  if (!MAGIC.equals(r.take(MAGIC.length, 'magic'))) throw invalid('not a Trousseau envelope');
  const formatVersion = r.u8('version');
  if (formatVersion !== FORMAT_VERSION) throw invalid(`unsupported format version ${formatVersion}`);
  const flags = r.u8('flags');
  if (flags !== 0) throw invalid('unknown flags');
  const envelopeId = r.take(ENVELOPE_ID_BYTES, 'envelope id');
  const quorum = r.u8('quorum');
  const configuredBackends = r.u8('backend count');
  const count = r.u8('copy count');
  if (count < 1 || count > MAX_COPIES) throw invalid(`copy count ${count} outside 1..${MAX_COPIES}`);
  if (quorum < 1 || quorum > configuredBackends) throw invalid('quorum outside 1..backend count');

  const copies: CopyEntry[] = [];
  const seen = new Set<string>();
  for (let i = 0; i < count; i++) {
    const backendName = r.ascii(r.u8('name length'), 'backend name');
    if (!NAME_PATTERN.test(backendName)) throw invalid('backend name is not a DNS label');
    if (seen.has(backendName)) throw invalid('backend named twice');
    seen.add(backendName);
    const versionLength = r.u8('key version length');
    if (versionLength < 1 || versionLength > MAX_KEY_VERSION_BYTES) throw invalid('key version length out of range');
    const keyVersion = r.ascii(versionLength, 'key version');
    if (!VERSION_PATTERN.test(keyVersion)) throw invalid('key version is not printable ASCII');
    const locationByte = r.u8('location');
    if (locationByte > 1) throw invalid('unknown copy location');
    const wrappedLength = r.u16('wrapped length');
    if (wrappedLength < 1 || wrappedLength > MAX_WRAPPED_BYTES) throw invalid('wrapped key length out of range');
    if (locationByte === 0) {
      copies.push({ backendName, keyVersion, location: 'inline', wrapped: r.take(wrappedLength, 'wrapped key'), wrappedLength });
    } else {
      const digest = r.take(DIGEST_BYTES, 'wrapped key digest');
      const value = annotations.get(annotationKeyFor(backendName));
      const matches = value !== undefined && value.length === wrappedLength && sha256(value).equals(digest);
      copies.push({ backendName, keyVersion, location: 'annotation', wrapped: matches ? value : undefined, wrappedLength });
    }
  }
  const commitment = r.take(COMMITMENT_BYTES, 'key commitment');
  const nonce = r.take(NONCE_BYTES, 'nonce');
  const payloadLength = r.u16('payload length');
  if (payloadLength < TAG_BYTES || payloadLength > MAX_PLAINTEXT_BYTES + TAG_BYTES) throw invalid('payload length out of range');
  const headerBytes = ciphertext.subarray(0, r.offset);
  const sealedPayload = r.take(payloadLength, 'payload');
  if (r.offset !== ciphertext.length) throw invalid('trailing bytes');
  return { formatVersion, envelopeId, quorum, configuredBackends, copies, commitment, nonce, headerBytes, sealedPayload };
}

export function sha256(bytes: Uint8Array): Buffer {
  return createHash('sha256').update(bytes).digest();
}
