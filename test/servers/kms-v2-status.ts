/**
 * Asks a KMS v2 plugin's Status over its unix socket, as kube-apiserver does, and exits
 * 0 only when it answers healthz "ok". Used by the peer plugins' server scripts to wait
 * for readiness and to tell a running peer from a dead one.
 *
 * Usage: node test/servers/kms-v2-status.ts SOCKET [TIMEOUT_MS]
 */
import * as grpc from '@grpc/grpc-js';
import { call } from '../../src/cli/client.ts';
import { V2Service } from '../../src/kms/proto.ts';
import type { V2StatusResponse } from '../../src/kms/types.ts';

const [socket, timeout = '2000'] = process.argv.slice(2);
if (!socket) {
  console.error('usage: kms-v2-status.ts SOCKET [TIMEOUT_MS]');
  process.exit(2);
}
const client = new V2Service(`unix:${socket}`, grpc.credentials.createInsecure());
try {
  const response = await call<object, V2StatusResponse>(client, 'Status', {}, Number(timeout));
  console.log(JSON.stringify({ version: response.version, healthz: response.healthz, key_id: response.key_id }));
  process.exitCode = response.healthz === 'ok' ? 0 : 1;
} catch (error) {
  const e = error as Partial<grpc.ServiceError>;
  console.error(`Status failed: ${e.code === undefined ? '' : (grpc.status[e.code] ?? e.code)} ${e.details ?? String(error)}`);
  process.exitCode = 1;
} finally {
  client.close();
}
