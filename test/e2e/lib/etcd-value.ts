/**
 * What kube-apiserver writes to etcd for an object encrypted with KMS, read without
 * the apiserver:
 *
 *   k8s:enc:kms:v2:<provider name>:<EncryptedObject protobuf>
 *   k8s:enc:kms:v1:<provider name>:<2-byte length><encrypted DEK><ciphertext>
 *
 * EncryptedObject (k8s.io/apiserver .../kmsv2/v2/api.proto) is
 *   bytes encryptedData = 1; string keyID = 2; bytes encryptedDEKSource = 3;
 *   map<string, bytes> annotations = 4; EncryptedDEKSourceType encryptedDEKSourceType = 5;
 * Only keyID is needed here (which plugin key_id wrapped the object's seed), so this
 * reads the protobuf wire format just far enough to find field 2.
 */

export function kmsPrefix(apiVersion: 'v1' | 'v2', providerName: string): string {
  return `k8s:enc:kms:${apiVersion}:${providerName}:`;
}

function readVarint(bytes: Buffer, offset: number): [value: number, next: number] {
  let value = 0;
  let shift = 0;
  for (let i = offset; i < bytes.length && shift < 53; i++) {
    const byte = bytes[i]!;
    value += (byte & 0x7f) * 2 ** shift;
    if ((byte & 0x80) === 0) return [value, i + 1];
    shift += 7;
  }
  throw new Error('truncated varint');
}

/** The keyID of a KMS v2 value (the whole etcd value, prefix included). */
export function kmsV2KeyId(value: Buffer, providerName: string): string {
  const prefix = Buffer.from(kmsPrefix('v2', providerName));
  if (!value.subarray(0, prefix.length).equals(prefix)) throw new Error(`not a KMS v2 value of provider ${providerName}`);
  const message = value.subarray(prefix.length);
  for (let offset = 0; offset < message.length;) {
    const [tag, afterTag] = readVarint(message, offset);
    const field = Math.floor(tag / 8);
    const wireType = tag & 7;
    if (wireType === 0) {
      offset = readVarint(message, afterTag)[1];
    } else if (wireType === 2) {
      const [length, start] = readVarint(message, afterTag);
      if (start + length > message.length) throw new Error('truncated field');
      if (field === 2) return message.subarray(start, start + length).toString('utf8');
      offset = start + length;
    } else {
      throw new Error(`unexpected wire type ${wireType} in EncryptedObject`);
    }
  }
  throw new Error('EncryptedObject has no keyID');
}

/** True when `needle` appears in `value` as is, or base64- or hex-encoded. */
export function containsPlaintext(value: Buffer, needle: string): boolean {
  const raw = Buffer.from(needle);
  return value.includes(raw) || value.includes(Buffer.from(raw.toString('base64'))) || value.includes(Buffer.from(raw.toString('hex')));
}
