/**
 * Checks on KMS requests before any work: sizes, annotation names and the v1
 * version field. Anything that fails here is InvalidArgument and costs no backend call.
 */
import { TrousseauError } from '../errors.ts';
import { MAX_ANNOTATIONS, MAX_CIPHERTEXT_BYTES, MAX_PLAINTEXT_BYTES, V2_MAX_ANNOTATION_BYTES } from '../envelope/limits.ts';

const MAX_KEY_ID_BYTES = 1024;
/** RFC 1123 subdomain with at least two labels, as the apiserver requires of annotation keys. */
const FQDN = /^(?=.{1,253}$)[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)+$/;

function invalid(message: string): TrousseauError {
  return new TrousseauError('INVALID_INPUT', message);
}

export function checkPlaintext(plaintext: Buffer | undefined): Buffer {
  if (!plaintext || plaintext.length === 0) throw invalid('plaintext is empty');
  if (plaintext.length > MAX_PLAINTEXT_BYTES) throw invalid(`plaintext of ${plaintext.length} bytes exceeds the limit of ${MAX_PLAINTEXT_BYTES}`);
  return plaintext;
}

export function checkCiphertext(ciphertext: Buffer | undefined): Buffer {
  if (!ciphertext || ciphertext.length === 0) throw invalid('ciphertext is empty');
  if (ciphertext.length > MAX_CIPHERTEXT_BYTES) throw invalid(`ciphertext of ${ciphertext.length} bytes exceeds the limit of ${MAX_CIPHERTEXT_BYTES}`);
  return ciphertext;
}

export function checkKeyId(keyId: string | undefined): void {
  if (keyId !== undefined && Buffer.byteLength(keyId) > MAX_KEY_ID_BYTES) throw invalid('key_id is longer than 1024 bytes');
}

export function checkAnnotations(annotations: Record<string, Buffer> | undefined): Map<string, Uint8Array> {
  const map = new Map<string, Uint8Array>();
  if (!annotations) return map;
  const keys = Object.keys(annotations);
  if (keys.length > MAX_ANNOTATIONS) throw invalid(`too many annotations (${keys.length}, limit ${MAX_ANNOTATIONS})`);
  let total = 0;
  for (const key of keys) {
    if (!FQDN.test(key)) throw invalid('annotation key is not a fully qualified domain name');
    const value = annotations[key] ?? Buffer.alloc(0);
    total += key.length + value.length;
    if (total > V2_MAX_ANNOTATION_BYTES) throw invalid(`annotations exceed ${V2_MAX_ANNOTATION_BYTES} bytes`);
    map.set(key, value);
  }
  return map;
}

export function checkV1Version(version: string | undefined): void {
  if (version && version !== 'v1beta1') throw invalid(`unsupported KMS API version "${version.slice(0, 32)}"; this is v1beta1`);
}

/** A request uid fit for a log line: the apiserver sends UUIDs, anything else is trimmed. */
export function safeUid(uid: string | undefined): string | undefined {
  if (!uid) return undefined;
  return uid.replace(/[^A-Za-z0-9-]/g, '').slice(0, 64) || undefined;
}
