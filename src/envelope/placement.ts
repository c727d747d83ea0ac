/**
 * Where each wrapped copy lives. KMS v1beta1 has no annotations, so everything is
 * inline. KMS v2 caps the ciphertext at 1024 bytes; copies that do not fit move to
 * annotations (largest first, so the fewest move), still authenticated because the
 * header keeps each moved copy's length and SHA-256.
 */
import { TrousseauError } from '../errors.ts';
import { envelopeSize } from './crypto.ts';
import { annotationKeyFor, type CopyToEncode } from './format.ts';
import { V2_MAX_ANNOTATION_BYTES, V2_MAX_CIPHERTEXT_BYTES } from './limits.ts';

export type Transport = 'v1' | 'v2';

export interface WrappedCopy {
  backendName: string;
  keyVersion: string;
  wrapped: Uint8Array;
}

export interface Placement {
  copies: CopyToEncode[];
  annotations: Map<string, Uint8Array>;
}

export function placeCopies(copies: readonly WrappedCopy[], plaintextLength: number, transport: Transport): Placement {
  const placed: CopyToEncode[] = copies.map((c) => ({ ...c, location: 'inline' }));
  const annotations = new Map<string, Uint8Array>();
  if (transport === 'v1') return { copies: placed, annotations };

  const bySizeDescending = [...placed].sort((a, b) => b.wrapped.length - a.wrapped.length);
  for (const copy of bySizeDescending) {
    if (envelopeSize(placed, plaintextLength) <= V2_MAX_CIPHERTEXT_BYTES) break;
    copy.location = 'annotation';
    annotations.set(annotationKeyFor(copy.backendName), copy.wrapped);
  }
  if (envelopeSize(placed, plaintextLength) > V2_MAX_CIPHERTEXT_BYTES) {
    throw new TrousseauError('INVALID_INPUT', `plaintext of ${plaintextLength} bytes does not fit a KMS v2 ciphertext of ${V2_MAX_CIPHERTEXT_BYTES} bytes`);
  }
  let annotationBytes = 0;
  for (const [key, value] of annotations) annotationBytes += key.length + value.length;
  if (annotationBytes > V2_MAX_ANNOTATION_BYTES) throw new TrousseauError('INTERNAL', 'wrapped copies exceed the KMS v2 annotation limit');
  return { copies: placed, annotations };
}
