/**
 * Typed messages of the KMS APIs, exactly as in proto/ (field names kept in
 * snake_case by the proto loader's keepCase option; bytes are Buffers).
 */
export interface V2StatusResponse {
  version: string;
  healthz: string;
  key_id: string;
}
export interface V2EncryptRequest {
  plaintext: Buffer;
  uid: string;
}
export interface V2EncryptResponse {
  ciphertext: Buffer;
  key_id: string;
  annotations: Record<string, Buffer>;
}
export interface V2DecryptRequest {
  ciphertext: Buffer;
  uid: string;
  key_id: string;
  annotations: Record<string, Buffer>;
}
export interface V2DecryptResponse {
  plaintext: Buffer;
}

export interface V1VersionRequest {
  version: string;
}
export interface V1VersionResponse {
  version: string;
  runtime_name: string;
  runtime_version: string;
}
export interface V1EncryptRequest {
  version: string;
  plain: Buffer;
}
export interface V1EncryptResponse {
  cipher: Buffer;
}
export interface V1DecryptRequest {
  version: string;
  cipher: Buffer;
}
export interface V1DecryptResponse {
  plain: Buffer;
}

export interface AdminStatusResponse {
  status_json: string;
}
export interface AdminVerifyRequest {
  renew_canary: boolean;
}
export interface AdminVerifyResponse {
  ok: boolean;
  report_json: string;
}
