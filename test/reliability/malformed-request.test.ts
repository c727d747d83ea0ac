/**
 * A request body that is not a valid protobuf message (issue 10, item 8) is the
 * client's fault: INVALID_ARGUMENT, counted in trousseau_kms_requests_total like any
 * call, no backend call, and the server keeps answering. grpc-js on its own answers
 * INTERNAL "Error deserializing request" before any handler runs, uncounted.
 */
import test from 'ava';
import { credentials, makeGenericClientConstructor, status } from '@grpc/grpc-js';
import { call } from '../../src/cli/client.ts';
import { grpcError, startHarness } from '../helpers/plugin-harness.ts';

/** A field tag with wire type 7, which does not exist: no protobuf decoder accepts it. */
const GARBAGE = Buffer.from([0x0f]);

const raw = (b: Buffer) => b;

for (const [path, api, method] of [
  ['/v2.KeyManagementService/Encrypt', 'v2', 'Encrypt'],
  ['/v2.KeyManagementService/Decrypt', 'v2', 'Decrypt'],
  ['/v1beta1.KeyManagementService/Encrypt', 'v1beta1', 'Encrypt'],
  ['/v1beta1.KeyManagementService/Decrypt', 'v1beta1', 'Decrypt'],
] as const) {
  test(`malformed protobuf on ${path}: INVALID_ARGUMENT, counted, no backend call`, async (t) => {
    const h = await startHarness(t);
    const Ctor = makeGenericClientConstructor(
      { [method]: { path, requestStream: false, responseStream: false, requestSerialize: raw, requestDeserialize: raw, responseSerialize: raw, responseDeserialize: raw } },
      'Raw',
    );
    const client = new Ctor(`unix:${h.socketPath}`, credentials.createInsecure());
    t.teardown(() => client.close());
    h.resetCounts();
    const error = await grpcError(t, call<Buffer, Buffer>(client, method, GARBAGE));
    t.is(error.code, status.INVALID_ARGUMENT, `${status[error.code]}: ${error.details}`);
    t.is(h.backendCalls(), 0);
    const counted = (await h.metrics.registry.getSingleMetric('trousseau_kms_requests_total')?.get())?.values.find(
      (v) => v.labels.api === api && v.labels.method === method && v.labels.code === 'INVALID_ARGUMENT',
    );
    t.is(counted?.value, 1, 'the refused call is missing from the request metrics');
    t.is((await h.status()).healthz, 'ok');
  });
}
