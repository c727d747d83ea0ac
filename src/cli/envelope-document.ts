/**
 * The JSON form of an envelope that `encrypt` prints and `decrypt`, `inspect` and
 * `rewrap` read: base64 ciphertext, the key_id and the annotations, as the apiserver
 * stores them. A bare base64 ciphertext (a v1 envelope) is accepted too.
 */
import { TrousseauError } from '../errors.ts';

export interface EnvelopeDocument {
  ciphertext: string;
  keyId?: string;
  annotations?: Record<string, string>;
}

export function parseEnvelopeDocument(text: string): { ciphertext: Buffer; keyId: string; annotations: Record<string, Buffer> } {
  const trimmed = text.trim();
  let doc: EnvelopeDocument;
  if (trimmed.startsWith('{')) {
    try {
      doc = JSON.parse(trimmed) as EnvelopeDocument;
    } catch {
      throw new TrousseauError('INVALID_INPUT', 'input is neither an envelope JSON document nor base64');
    }
  } else {
    doc = { ciphertext: trimmed };
  }
  if (typeof doc.ciphertext !== 'string') throw new TrousseauError('INVALID_INPUT', 'envelope document has no "ciphertext"');
  const annotations: Record<string, Buffer> = {};
  for (const [key, value] of Object.entries(doc.annotations ?? {})) annotations[key] = Buffer.from(value, 'base64');
  return { ciphertext: Buffer.from(doc.ciphertext, 'base64'), keyId: doc.keyId ?? '', annotations };
}

export function formatEnvelopeDocument(ciphertext: Buffer, keyId: string, annotations: Record<string, Buffer>): string {
  const doc: EnvelopeDocument = { ciphertext: ciphertext.toString('base64'), keyId };
  if (Object.keys(annotations).length > 0) {
    doc.annotations = Object.fromEntries(Object.entries(annotations).map(([k, v]) => [k, Buffer.from(v).toString('base64')]));
  }
  return JSON.stringify(doc);
}
