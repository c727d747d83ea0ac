/** The labels of `trousseau_kms_requests_total` for a gRPC method path. */

export type Api = 'v2' | 'v1beta1' | 'admin';

/** The request metrics' labels of a method path such as `/v2.KeyManagementService/Encrypt`. */
export function methodLabels(path: string): { api: Api; method: string } {
  const slash = path.lastIndexOf('/');
  const service = path.slice(1, slash);
  const api: Api = service.startsWith('v2.') ? 'v2' : service.startsWith('v1beta1.') ? 'v1beta1' : 'admin';
  return { api, method: path.slice(slash + 1) };
}
