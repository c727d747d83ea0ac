/**
 * The worker thread of one PKCS#11 module: the only thread of the process that
 * calls it. Every pkcs11 backend configured with that module is a client of this
 * worker (the module's initialisation and login are one per process, see
 * LoadedModule). Requests run one at a time, in order (a session runs one operation
 * at a time, and the blocking C calls never touch the plugin's event loop). A
 * request whose deadline passed while it waited is answered `expired` without a
 * call, so a slow token never works through a backlog nobody waits for any more.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { LoadedModule, TokenConnection, TokenFailure, type TokenSettings } from './pkcs11-token.ts';

interface Addressed {
  id: number;
  /** Which backend of this module the request is for. */
  backend: number;
  deadline: number;
}

export type WorkerRequest =
  | (Addressed & { op: 'register'; settings: TokenSettings })
  | (Addressed & { op: 'release' })
  | (Addressed & { op: 'version' })
  | (Addressed & { op: 'wrap'; dataKey: Uint8Array; aad: Uint8Array })
  | (Addressed & { op: 'unwrap'; wrapped: Uint8Array; keyVersion: string; aad: Uint8Array });

export type WorkerReply =
  | { id: number; ok: true; keyVersion?: string; wrapped?: Uint8Array; dataKey?: Uint8Array; logins: number }
  | { id: number; ok: false; kind: 'rejected' | 'unavailable' | 'expired'; message: string; ckr?: string | undefined };

const port = parentPort!;
const modulePath = workerData as string;
let loaded: LoadedModule | undefined;
/** Loaded at the first connection; a failure is reported to that call and retried at the next. */
const module = (): LoadedModule => (loaded ??= new LoadedModule(modulePath));
const tokens = new Map<number, TokenConnection>();

function answer(request: WorkerRequest): WorkerReply {
  if (request.op === 'register') {
    tokens.set(request.backend, new TokenConnection(request.settings, module));
    return { id: request.id, ok: true, logins: 0 };
  }
  const token = tokens.get(request.backend);
  if (!token) return { id: request.id, ok: false, kind: 'unavailable', message: 'backend is not registered with its module worker' };
  if (request.op === 'release') {
    token.close();
    tokens.delete(request.backend);
    return { id: request.id, ok: true, logins: token.logins };
  }
  if (Date.now() >= request.deadline) return { id: request.id, ok: false, kind: 'expired', message: 'the call expired before the token was free' };
  switch (request.op) {
    case 'version':
      return { id: request.id, ok: true, keyVersion: token.currentKeyVersion(), logins: token.logins };
    case 'wrap': {
      try {
        const { wrapped, keyVersion } = token.wrap(request.dataKey, Buffer.from(request.aad));
        // Its own 60 bytes: Buffer.concat may return a view into the shared pool slab.
        return { id: request.id, ok: true, wrapped: new Uint8Array(wrapped), keyVersion, logins: token.logins };
      } finally {
        request.dataKey.fill(0);
      }
    }
    case 'unwrap':
      return { id: request.id, ok: true, dataKey: token.unwrap(request.wrapped, request.keyVersion, Buffer.from(request.aad)), logins: token.logins };
  }
}

port.on('message', (request: WorkerRequest) => {
  let reply: WorkerReply;
  try {
    reply = answer(request);
  } catch (error) {
    const failure = error instanceof TokenFailure ? error : new TokenFailure('unavailable', `token call failed (${error instanceof Error ? error.name : 'error'})`);
    reply = { id: request.id, ok: false, kind: failure.kind, message: failure.message, ckr: failure.ckr };
  }
  if (reply.ok && reply.dataKey) {
    // A buffer of its own, moved (not copied) to the plugin's thread; the token's is zeroed.
    const moved = new Uint8Array(reply.dataKey);
    reply.dataKey.fill(0);
    port.postMessage({ ...reply, dataKey: moved }, [moved.buffer]);
    return;
  }
  port.postMessage(reply);
  // The last backend gone: release the module (C_Finalize) and end the thread.
  if (request.op === 'release' && tokens.size === 0) {
    loaded?.reinitialize();
    port.close();
  }
});
