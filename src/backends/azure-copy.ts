/**
 * The bytes an Azure Key Vault copy holds inside an envelope, and the signature that
 * makes it unforgeable. docs/envelope.md ("Threat model per backend type") says why.
 *
 * RSA-OAEP-256 wrap needs only the public key, which any reader of the key can fetch:
 * without more, anyone could wrap a data key of their choice and seal an envelope
 * around it. So each copy also carries a PS256 signature made by Key Vault with the
 * private half of the same key version, over a message that names the envelope, the
 * backend, the key and version, and the wrapped bytes. Decrypt checks it locally with
 * the version's public key before asking Key Vault to unwrap: a copy minted with the
 * public key alone is refused without a server call.
 *
 * Why the key commitment need not be signed too: RSA-OAEP decryption under the vault's
 * private key is a function of the wrapped bytes, so the signed bytes fix the data key,
 * and the data key with the signed envelope id fixes the commitment, which the engine
 * checks after unwrap. Leaving it out lets the signature be checked before unwrap
 * with only what KeyBackend.unwrap receives.
 *
 * Layouts (the copy's own version, independent of the envelope format version):
 *   layout 0, unsigned (before signing): the RSA-OAEP-256 ciphertext, exactly the
 *     modulus length (256, 384 or 512 bytes). Refused unless acceptUnsignedCopies.
 *   layout 1, signed:
 *     magic "AZ" | layout 0x01 | signature algorithm 0x01 (PS256)
 *     | wrapped len (2, big endian) | wrapped | signature len (2) | signature
 *   A signed copy is 8 + 2 x modulus bytes long, never a modulus length, so the two
 *   layouts cannot be confused.
 */
import { constants, createHash, createPublicKey, verify, type KeyObject } from 'node:crypto';
import { TrousseauError } from '../errors.ts';
import type { WrapContext } from './backend.ts';

const MAGIC = Buffer.from('AZ', 'ascii');
export const SIGNED_COPY_LAYOUT = 1;
const PS256 = 1;
const SIGNED_HEADER_BYTES = 6;
/** RSA moduli Key Vault offers (2048, 3072, 4096 bits), in bytes. */
const MODULUS_BYTES = new Set([256, 384, 512]);
const DOMAIN = Buffer.from('trousseau/azure-copy/v1\0', 'ascii');

export type ParsedAzureCopy =
  | { layout: 0; wrapped: Uint8Array }
  | { layout: 1; wrapped: Uint8Array; signature: Uint8Array };

function rejected(message: string): TrousseauError {
  return new TrousseauError('BACKEND_REJECTED', message);
}

/** Parse a copy's bytes. Checks structure only; the signature is checked by verifyCopySignature. */
export function parseAzureCopy(bytes: Uint8Array): ParsedAzureCopy {
  const buffer = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
  if (MODULUS_BYTES.has(buffer.length)) return { layout: 0, wrapped: buffer };
  if (buffer.length < SIGNED_HEADER_BYTES + 2 || !buffer.subarray(0, 2).equals(MAGIC)) {
    throw rejected('Azure copy is neither a signed copy nor an RSA ciphertext');
  }
  if (buffer[2] !== SIGNED_COPY_LAYOUT) throw rejected('Azure copy has an unknown layout version');
  if (buffer[3] !== PS256) throw rejected('Azure copy has an unknown signature algorithm');
  const wrappedLength = buffer.readUInt16BE(4);
  const signatureAt = SIGNED_HEADER_BYTES + wrappedLength;
  if (!MODULUS_BYTES.has(wrappedLength) || buffer.length < signatureAt + 2) throw rejected('Azure copy is truncated');
  const signatureLength = buffer.readUInt16BE(signatureAt);
  if (signatureLength !== wrappedLength || buffer.length !== signatureAt + 2 + signatureLength) {
    throw rejected('Azure copy has inconsistent lengths');
  }
  return {
    layout: 1,
    wrapped: buffer.subarray(SIGNED_HEADER_BYTES, signatureAt),
    signature: buffer.subarray(signatureAt + 2),
  };
}

export function encodeSignedCopy(wrapped: Uint8Array, signature: Uint8Array): Buffer {
  const header = Buffer.alloc(SIGNED_HEADER_BYTES);
  MAGIC.copy(header, 0);
  header[2] = SIGNED_COPY_LAYOUT;
  header[3] = PS256;
  header.writeUInt16BE(wrapped.length, 4);
  const signatureLength = Buffer.alloc(2);
  signatureLength.writeUInt16BE(signature.length, 0);
  return Buffer.concat([header, wrapped, signatureLength, signature]);
}

/** Who the copy is for: the key (its id in the vault) and the envelope. */
export interface CopyBinding {
  context: WrapContext;
  /** The vault key's identifier without version, e.g. https://v.vault.azure.net/keys/kek */
  keyId: string;
  keyVersion: string;
}

function lengthPrefixed(value: Uint8Array | string): Buffer[] {
  const bytes = typeof value === 'string' ? Buffer.from(value, 'utf8') : Buffer.from(value);
  const length = Buffer.alloc(4);
  length.writeUInt32BE(bytes.length, 0);
  return [length, bytes];
}

/** The signed message: every field length-prefixed, so no two bindings share an encoding. */
export function signedMessage(binding: CopyBinding, wrapped: Uint8Array): Buffer {
  return Buffer.concat([
    DOMAIN,
    ...lengthPrefixed(binding.context.envelopeId),
    ...lengthPrefixed(binding.context.backendName),
    ...lengthPrefixed(binding.keyId),
    ...lengthPrefixed(binding.keyVersion),
    ...lengthPrefixed(wrapped),
  ]);
}

/** SHA-256 of the signed message: what Key Vault's sign operation takes for PS256. */
export function signedDigest(binding: CopyBinding, wrapped: Uint8Array): Buffer {
  return createHash('sha256').update(signedMessage(binding, wrapped)).digest();
}

/** Local PS256 check with the key version's public key. Never calls the vault. */
export function verifyCopySignature(publicKey: KeyObject, binding: CopyBinding, wrapped: Uint8Array, signature: Uint8Array): boolean {
  try {
    return verify(
      'sha256',
      signedMessage(binding, wrapped),
      // Key Vault's PS256 uses a salt as long as the digest (RFC 7518 section 3.5).
      { key: publicKey, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 },
      signature,
    );
  } catch {
    return false;
  }
}

/**
 * The RSA public key of a JWK as Key Vault returns it (n and e as bytes). Leading zero
 * bytes of n are dropped (some servers send Java's BigInteger form, one byte longer).
 */
export function rsaPublicKeyFromJwk(jwk: { kty?: string; n?: Uint8Array; e?: Uint8Array }): KeyObject {
  if (!jwk.kty?.startsWith('RSA') || !jwk.n || !jwk.e) throw rejected('Azure key is not an RSA key');
  let n = Buffer.from(jwk.n);
  let start = 0;
  while (start < n.length - 1 && n[start] === 0) start += 1;
  n = n.subarray(start);
  return createPublicKey({ key: { kty: 'RSA', n: n.toString('base64url'), e: Buffer.from(jwk.e).toString('base64url') }, format: 'jwk' });
}
