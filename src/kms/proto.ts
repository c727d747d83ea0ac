/** Loads the .proto files once; used by the server and by the CLI's client. */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

const protoDir = path.join(path.dirname(fileURLToPath(import.meta.url)), 'proto');

const LOADER_OPTIONS: protoLoader.Options = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

function load(file: string): grpc.GrpcObject {
  return grpc.loadPackageDefinition(protoLoader.loadSync(path.join(protoDir, file), LOADER_OPTIONS));
}

type ServiceClientCtor = grpc.ServiceClientConstructor;

/**
 * What a handler receives in place of a request that is not a valid protobuf message.
 * grpc-js answers a deserializer that throws with INTERNAL "Error deserializing
 * request", before any handler runs, so the call is neither refused as the client's
 * fault nor counted. Our deserializer never throws: it hands this marker on, and the
 * handler (kms/services.ts) refuses it as INVALID_ARGUMENT and counts it like any call.
 */
export const MALFORMED_REQUEST: unique symbol = Symbol('malformed request');

function tolerateMalformedRequests(service: grpc.ServiceDefinition): void {
  for (const method of Object.values(service)) {
    const strict = method.requestDeserialize;
    // Only the server deserializes requests; clients built from the same definition are unaffected.
    (method as { requestDeserialize: (bytes: Buffer) => unknown }).requestDeserialize = (bytes: Buffer) => {
      try {
        return strict(bytes);
      } catch {
        return MALFORMED_REQUEST;
      }
    };
  }
}

const v2 = load('v2.proto').v2 as grpc.GrpcObject;
const v1beta1 = load('v1beta1.proto').v1beta1 as grpc.GrpcObject;
const admin = ((load('admin.proto').trousseau as grpc.GrpcObject).admin as grpc.GrpcObject).v1 as grpc.GrpcObject;

export const V2Service = v2.KeyManagementService as ServiceClientCtor;
export const V1Service = v1beta1.KeyManagementService as ServiceClientCtor;
export const AdminService = admin.Admin as ServiceClientCtor;

for (const service of [V2Service, V1Service, AdminService]) tolerateMalformedRequests(service.service);
