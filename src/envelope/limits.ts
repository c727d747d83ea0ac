/**
 * Hard limits of envelope format version 1. Every length read from an envelope is
 * checked against these before anything is allocated or any backend is called, so a
 * hostile envelope costs a few comparisons and nothing else.
 */

/** Bytes of a data key (AES-256). */
export const DATA_KEY_BYTES = 32;
/** Bytes of the random per-envelope id (HKDF salt and wrap binding). */
export const ENVELOPE_ID_BYTES = 16;
/** Most wrapped copies one envelope may carry (AWS ESDK's maxEncryptedDataKeys lesson). */
export const MAX_COPIES = 16;
/** Largest wrapped copy: RSA-4096 is 512 bytes, Vault's text form of a 32-byte key ~90. */
export const MAX_WRAPPED_BYTES = 2048;
/** Longest key version string a backend may report. */
export const MAX_KEY_VERSION_BYTES = 255;
/** Largest plaintext Encrypt accepts (the apiserver sends 32-byte seeds; v1 DEKs are 32 bytes too). */
export const MAX_PLAINTEXT_BYTES = 16 * 1024;
/** Largest ciphertext Decrypt accepts (v1 carries every copy inline). */
export const MAX_CIPHERTEXT_BYTES = MAX_COPIES * (MAX_WRAPPED_BYTES + 64 + MAX_KEY_VERSION_BYTES) + MAX_PLAINTEXT_BYTES + 128;
/** KMS v2: the apiserver refuses an EncryptResponse.ciphertext larger than this. */
export const V2_MAX_CIPHERTEXT_BYTES = 1024;
/** KMS v2: sum of len(key)+len(value) over all annotations. */
export const V2_MAX_ANNOTATION_BYTES = 32 * 1024;
/** Most annotations a Decrypt request may carry before it is refused unread. */
export const MAX_ANNOTATIONS = 64;
