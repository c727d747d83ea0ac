/** gRPC clients over the plugin's socket, for the CLI's status / encrypt / decrypt. */
import * as grpc from '@grpc/grpc-js';
import { AdminService, V1Service, V2Service } from '../kms/proto.ts';

export type UnaryMethod<Req, Res> = (request: Req, options: grpc.CallOptions, callback: (error: grpc.ServiceError | null, response: Res) => void) => void;

export function clientsFor(socketPath: string) {
  const target = `unix:${socketPath}`;
  const credentials = grpc.credentials.createInsecure();
  const v2 = new V2Service(target, credentials);
  const v1 = new V1Service(target, credentials);
  const admin = new AdminService(target, credentials);
  return {
    v2,
    v1,
    admin,
    close() {
      v2.close();
      v1.close();
      admin.close();
    },
  };
}

/** Call a unary method with a deadline and get a promise. */
export function call<Req, Res>(client: grpc.Client, method: string, request: Req, timeoutMs = 5000): Promise<Res> {
  const fn = (client as unknown as Record<string, UnaryMethod<Req, Res>>)[method];
  if (!fn) throw new Error(`no method ${method}`);
  return new Promise((resolve, reject) => {
    fn.call(client, request, { deadline: Date.now() + timeoutMs }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}
