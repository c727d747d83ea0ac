/** gRPC clients over the plugin's socket, for the CLI's status / encrypt / decrypt. */
import { lstat } from 'node:fs/promises';
import net from 'node:net';
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

const HOW_TO_START = 'start the plugin (`trousseau serve -c CONFIG`, or `npm run dev` in a checkout) or pass its socket with --socket PATH';

/**
 * Why nothing answers on `socketPath`, in an operator's words: grpc-js only says "No
 * connection established" with its resolver's notes. Looks at the path (lstat) and
 * tries one plain connect; never changes anything. Undefined when something listens.
 */
export async function explainUnreachableSocket(socketPath: string): Promise<string | undefined> {
  const info = await lstat(socketPath).catch((error: NodeJS.ErrnoException) => error);
  if (info instanceof Error) {
    if (info.code === 'ENOENT') return `no socket at ${socketPath}: the plugin is not running there; ${HOW_TO_START}`;
    if (info.code === 'EACCES') return `cannot look at ${socketPath} (EACCES): run as the socket's user (root on a control-plane node)`;
    if (info.code === 'ENOTDIR') return `${socketPath} is not a socket path: a part of it is a file, not a folder`;
    return `cannot look at ${socketPath} (${info.code ?? 'error'})`;
  }
  if (!info.isSocket()) return `${socketPath} is not a socket; ${HOW_TO_START}`;
  const code = await new Promise<string | undefined>((resolve) => {
    const probe = net.connect(socketPath);
    probe.once('connect', () => {
      probe.destroy();
      resolve(undefined);
    });
    probe.once('error', (error: NodeJS.ErrnoException) => resolve(error.code ?? 'error'));
  });
  if (code === 'ECONNREFUSED') return `nothing listens on ${socketPath} (a socket left by a plugin that stopped); ${HOW_TO_START}`;
  if (code === 'EACCES') return `permission denied on ${socketPath}: run as the socket's user (root on a control-plane node) or a member of socket.group`;
  if (code) return `cannot connect to ${socketPath} (${code})`;
  return undefined; // something listens: its own answer (an overloaded plugin, below quorum) is the one to show
}

/** grpc-js's details when no connection was made ("No connection established. Last error: ... connect ENOENT ..."). */
const NOT_CONNECTED = /No connection established|Failed to connect|connect (ENOENT|ECONNREFUSED|ENOTDIR|EACCES)/;

/** Call a unary method with a deadline and get a promise. */
export function call<Req, Res>(client: grpc.Client, method: string, request: Req, timeoutMs = 5000): Promise<Res> {
  const fn = (client as unknown as Record<string, UnaryMethod<Req, Res>>)[method];
  if (!fn) throw new Error(`no method ${method}`);
  return new Promise((resolve, reject) => {
    fn.call(client, request, { deadline: Date.now() + timeoutMs }, (error, response) => {
      if (!error) {
        resolve(response);
        return;
      }
      const target = client.getChannel().getTarget();
      // Only a call that never reached a server: the plugin's own UNAVAILABLE answers
      // (overloaded, below quorum) are shown as they are, and cost no extra connection.
      const unreached = (error.code === grpc.status.UNAVAILABLE || error.code === grpc.status.DEADLINE_EXCEEDED) && NOT_CONNECTED.test(error.details);
      if (unreached && target.startsWith('unix:')) {
        void explainUnreachableSocket(target.slice('unix:'.length)).then(
          (why) => reject(why === undefined ? error : Object.assign(new Error(why, { cause: error }), { code: error.code, details: why })),
          () => reject(error),
        );
        return;
      }
      reject(error);
    });
  });
}
