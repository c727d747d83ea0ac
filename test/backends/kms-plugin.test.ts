/**
 * kms-plugin backend against two real third-party KMS v2 plugins started by
 * test/servers/up.sh: aws-encryption-provider (over local-kms) and vault-kubernetes-kms
 * (over OpenBao, AppRole). The conformance kit runs against each; so do the checks of
 * what the copy records (the inner key_id and annotations) and of the Status-based key
 * version. Both peers answer every failure with gRPC UNKNOWN, so the error mapping of
 * the other statuses is checked against a scripted KMS v2 server (a grpc-js server in
 * this file that answers what each test tells it to: the status codes a plugin may send,
 * which no real peer can be made to send on demand). The socket trust checks run an
 * attacker as uid 65534. Kill/restart of a real peer: kms-plugin-chaos.test.ts.
 */
import { randomBytes } from 'node:crypto';
import { chmod, chown, mkdir, mkdtemp, rm, symlink } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import test, { type ExecutionContext } from 'ava';
import type { KeyBackend, WrapContext } from '../../src/backends/backend.ts';
import { decodeCopy, encodeCopy, KmsPluginBackend, keyVersionOf, kmsPluginConfigSchema } from '../../src/backends/kms-plugin.ts';
import { call } from '../../src/cli/client.ts';
import { errorCodeOf, type ErrorCode } from '../../src/errors.ts';
import { V2Service } from '../../src/kms/proto.ts';
import type { V2StatusResponse } from '../../src/kms/types.ts';
import { eventually } from '../helpers/plugin-harness.ts';
import { requireServer, requireVar } from '../helpers/servers.ts';
import { NOBODY, openForTraversal, runAsNobody } from '../helpers/unprivileged.ts';
import { runBackendConformance } from './conformance.ts';

// Generous: CI machines are slow and loaded; the backend's own timeoutMs ends a call first.
const signal = (ms = 20_000): AbortSignal => AbortSignal.timeout(ms);
const contextFor = (backendName: string): WrapContext => ({ envelopeId: randomBytes(16), backendName });

function backendFor(socket: string, fields: Record<string, unknown> = {}): KmsPluginBackend {
  return new KmsPluginBackend(kmsPluginConfigSchema.parse({ name: 'inner', type: 'kms-plugin', socket, timeoutMs: 2900, ...fields }));
}

async function using<T>(backend: KeyBackend, body: (b: KeyBackend) => Promise<T>): Promise<T> {
  try {
    return await body(backend);
  } finally {
    await backend.close();
  }
}

/** A folder only root can change, as the backend demands of a socket's folder. */
async function privateDir(t: ExecutionContext): Promise<string> {
  const dir = await mkdtemp(path.join(tmpdir(), 'trousseau-kms-plugin-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Status of the plugin on `socket`, asked the way the apiserver asks. */
async function innerStatus(socket: string): Promise<V2StatusResponse> {
  const client = new V2Service(`unix:${socket}`, grpc.credentials.createInsecure());
  try {
    return await call<object, V2StatusResponse>(client, 'Status', {}, 3000);
  } finally {
    client.close();
  }
}

const peers = [
  { server: 'aws-encryption-provider', label: 'kms-plugin over aws-encryption-provider (local-kms)', socketVar: 'AWS_ENCRYPTION_PROVIDER_SOCKET' },
  { server: 'vault-kubernetes-kms', label: 'kms-plugin over vault-kubernetes-kms (OpenBao)', socketVar: 'VAULT_KUBERNETES_KMS_SOCKET' },
] as const;

for (const peer of peers) {
  const found = requireServer(peer.server);
  if ('missing' in found) {
    test.skip(`${peer.label}: ${found.missing}`, () => {});
    continue;
  }
  const socket = requireVar(found.env, peer.socketVar, peer.server);

  runBackendConformance(test, {
    label: peer.label,
    create: () => backendFor(socket),
    // A trusted folder where nothing listens: the inner plugin is not running.
    createUnreachable: async () => backendFor(path.join(await mkdtemp(path.join(tmpdir(), 'trousseau-kms-plugin-none-')), 'kms.sock')),
    // No server-side binding through KMS v2: the envelope's header and key commitment bind the copy.
    bindsContext: false,
  });

  test(`${peer.label}: the key version is the inner plugin's Status key_id`, async (t) => {
    await using(backendFor(socket), async (backend) => {
      const status = await innerStatus(socket);
      t.is(status.healthz, 'ok');
      t.is(await backend.currentKeyVersion(signal()), keyVersionOf(status.key_id));
    });
  });

  test(`${peer.label}: the copy records the inner ciphertext, key_id and annotations`, async (t) => {
    await using(backendFor(socket), async (backend) => {
      const dataKey = randomBytes(32);
      const { wrapped, keyVersion } = await backend.wrap(dataKey, contextFor('inner'), signal());
      const copy = decodeCopy(wrapped);
      t.truthy(copy);
      t.is(keyVersionOf(copy!.keyId), keyVersion);
      t.is(copy!.keyId, (await innerStatus(socket)).key_id);
      t.false(Buffer.from(copy!.ciphertext).includes(dataKey));
      // The copy decodes to exactly what it was encoded from.
      t.deepEqual(encodeCopy(copy!), Buffer.from(wrapped));
    });
  });

  test(`${peer.label}: a well-formed copy the inner plugin cannot open is rejected, not an outage`, async (t) => {
    await using(backendFor(socket), async (backend) => {
      const keyVersion = await backend.currentKeyVersion(signal());
      const { wrapped } = await backend.wrap(randomBytes(32), contextFor('inner'), signal());
      const copy = decodeCopy(wrapped)!;
      const corrupted = Buffer.from(copy.ciphertext);
      corrupted[corrupted.length - 1]! ^= 0x01;
      // The peers answer UNKNOWN for a bad ciphertext as for a KMS outage; the fresh
      // Status that follows says healthy, so the copy is what was refused.
      for (const ciphertext of [corrupted, randomBytes(120)]) {
        const forged = encodeCopy({ ciphertext, keyId: copy.keyId, annotations: copy.annotations })!;
        const error = await t.throwsAsync(backend.unwrap(forged, keyVersion, contextFor('inner'), signal()));
        t.is(errorCodeOf(error), 'BACKEND_REJECTED', String(error));
      }
    });
  });

  test(`${peer.label}: a copy relabelled with another key version is refused before any call`, async (t) => {
    await using(backendFor(socket), async (backend) => {
      const { wrapped } = await backend.wrap(randomBytes(32), contextFor('inner'), signal());
      const error = await t.throwsAsync(backend.unwrap(wrapped, 'another-version', contextFor('inner'), signal()));
      t.is(errorCodeOf(error), 'BACKEND_REJECTED');
      t.regex(error.message, /does not match its recorded key version/);
    });
  });
}

// ---------------------------------------------------------------- socket trust

test('a socket path that is a link is refused, and nothing is sent through it', async (t) => {
  const dir = await privateDir(t);
  const listener = await countingListener(path.join(dir, 'real.sock'));
  t.teardown(() => listener.close());
  await symlink(path.join(dir, 'real.sock'), path.join(dir, 'link.sock'));
  await using(backendFor(path.join(dir, 'link.sock')), async (backend) => {
    const error = await t.throwsAsync(backend.wrap(randomBytes(32), contextFor('inner'), signal()));
    t.is(errorCodeOf(error), 'BACKEND_REJECTED');
    t.regex(error.message, /is a link/);
  });
  t.is(listener.connections(), 0);
});

test('a socket in a folder another local user owns is refused: that user could be listening', async (t) => {
  const dir = await privateDir(t);
  await openForTraversal(dir);
  const theirs = path.join(dir, 'theirs');
  await mkdir(theirs);
  await chown(theirs, NOBODY, NOBODY);
  const socket = path.join(theirs, 'kms.sock');
  // The attacker binds the socket the configuration names and logs every connection.
  const attacker = runAsNobody(
    t,
    `const net = require('node:net');
     net.createServer((c) => { console.log('connection'); c.destroy(); }).listen(process.argv[1], () => console.log('listening'));`,
    { args: [socket] },
  );
  await eventually(() => (attacker.stdout.includes('listening') ? true : undefined), 20_000, 50);
  await using(backendFor(socket), async (backend) => {
    for (const attempt of [backend.wrap(randomBytes(32), contextFor('inner'), signal()), backend.currentKeyVersion(signal())]) {
      const error = await t.throwsAsync(attempt);
      t.is(errorCodeOf(error), 'BACKEND_REJECTED');
      t.regex(error.message, /owned by uid 65534/);
    }
  });
  t.false(attacker.stdout.includes('connection'), 'a data key went to a socket another user controls');
});

test('a socket in a folder other users can write is refused', async (t) => {
  const dir = await privateDir(t);
  const shared = path.join(dir, 'shared');
  await mkdir(shared);
  await chmod(shared, 0o777);
  const listener = await countingListener(path.join(shared, 'kms.sock'));
  t.teardown(() => listener.close());
  await using(backendFor(path.join(shared, 'kms.sock')), async (backend) => {
    const error = await t.throwsAsync(backend.wrap(randomBytes(32), contextFor('inner'), signal()));
    t.is(errorCodeOf(error), 'BACKEND_REJECTED');
    t.regex(error.message, /writable by users other than root/);
  });
  t.is(listener.connections(), 0);
});

test('a missing socket or folder is unavailable (the inner plugin is not running yet)', async (t) => {
  const dir = await privateDir(t);
  for (const socket of [path.join(dir, 'kms.sock'), path.join(dir, 'absent', 'kms.sock')]) {
    await using(backendFor(socket), async (backend) => {
      const error = await t.throwsAsync(backend.currentKeyVersion(signal()));
      t.is(errorCodeOf(error), 'BACKEND_UNAVAILABLE');
    });
  }
});

test('configuration: the socket must be a path, and the timeout stays under the apiserver deadline', (t) => {
  t.false(kmsPluginConfigSchema.safeParse({ name: 'x', type: 'kms-plugin', socket: 'unix:///run/kms.sock' }).success);
  t.false(kmsPluginConfigSchema.safeParse({ name: 'x', type: 'kms-plugin', socket: `/${'a'.repeat(120)}` }).success);
  t.false(kmsPluginConfigSchema.safeParse({ name: 'x', type: 'kms-plugin', socket: '/run/kms.sock', timeoutMs: 3000 }).success);
  t.false(kmsPluginConfigSchema.safeParse({ name: 'x', type: 'kms-plugin', socket: '/run/kms.sock', extra: 1 }).success);
  const parsed = kmsPluginConfigSchema.parse({ name: 'x', type: 'kms-plugin', socket: '/run/kms.sock' });
  t.is(parsed.timeoutMs, 1000);
  t.is(parsed.statusIntervalMs, 5000);
});

// ---------------------------------------------------------------- copy layout

test('copy layout: malformed or trailing bytes are not a copy', (t) => {
  const copy = { ciphertext: randomBytes(40), keyId: 'k1', annotations: new Map([['b.example.com', Buffer.from('2')], ['a.example.com', Buffer.from('1')]]) };
  const bytes = encodeCopy(copy)!;
  t.deepEqual(decodeCopy(bytes)?.annotations, new Map([['a.example.com', Buffer.from('1')], ['b.example.com', Buffer.from('2')]]));
  t.is(decodeCopy(Buffer.concat([bytes, Buffer.from([0])])), undefined);
  t.is(decodeCopy(bytes.subarray(0, bytes.length - 1)), undefined);
  t.is(decodeCopy(Buffer.from([0x02, ...bytes.subarray(1)])), undefined);
  t.is(decodeCopy(Buffer.alloc(0)), undefined);
  // Too large for an envelope copy.
  t.is(encodeCopy({ ciphertext: randomBytes(1024), keyId: 'k', annotations: new Map([['a.example.com', randomBytes(1100)]]) }), undefined);
});

test('key version: a short printable key_id as is, anything else by its digest', (t) => {
  t.is(keyVersionOf('arn:aws:kms:us-east-1:1:key/abc'), 'arn:aws:kms:us-east-1:1:key/abc');
  t.regex(keyVersionOf('with space'), /^sha256:[0-9a-f]{64}$/);
  t.regex(keyVersionOf('k'.repeat(256)), /^sha256:[0-9a-f]{64}$/);
  t.not(keyVersionOf('k'.repeat(256)), keyVersionOf('k'.repeat(257)));
});

// ---------------------------------------------------------------- error mapping

/** What the scripted plugin answers; each handler may return a gRPC error instead. */
interface Script {
  status?: () => V2StatusResponse | grpc.ServiceError;
  encrypt?: (plaintext: Buffer) => { ciphertext: Buffer; key_id: string; annotations?: Record<string, Buffer> } | grpc.ServiceError | 'hang';
  decrypt?: (ciphertext: Buffer) => { plaintext: Buffer } | grpc.ServiceError | 'hang';
}

function grpcError(code: grpc.status, details = 'scripted failure'): grpc.ServiceError {
  return Object.assign(new Error(details), { code, details, metadata: new grpc.Metadata() });
}

/** A scripted KMS v2 server on a socket in a private folder (not a real plugin: see the file comment). */
async function scriptedPlugin(t: ExecutionContext, script: Script): Promise<{ socket: string; calls: { Status: number; Encrypt: number; Decrypt: number } }> {
  const dir = await privateDir(t);
  const socket = path.join(dir, 'kms.sock');
  const calls = { Status: 0, Encrypt: 0, Decrypt: 0 };
  const server = new grpc.Server();
  const answer = <R>(result: R | grpc.ServiceError | 'hang', callback: grpc.sendUnaryData<R>) => {
    if (result === 'hang') return; // never answers: the client's deadline or abort must end it
    if (result instanceof Error) callback(result);
    else callback(null, result);
  };
  server.addService(V2Service.service, {
    Status: (_call: unknown, callback: grpc.sendUnaryData<V2StatusResponse>) => {
      calls.Status++;
      answer(script.status?.() ?? { version: 'v2', healthz: 'ok', key_id: 'k1' }, callback);
    },
    Encrypt: (call: grpc.ServerUnaryCall<{ plaintext: Buffer }, unknown>, callback: grpc.sendUnaryData<unknown>) => {
      calls.Encrypt++;
      const plaintext = call.request.plaintext;
      // A reversible stand-in for encryption, enough for a scripted plugin.
      answer(script.encrypt?.(plaintext) ?? { ciphertext: Buffer.from(plaintext.map((b) => b ^ 0x5a)), key_id: 'k1', annotations: {} }, callback);
    },
    Decrypt: (call: grpc.ServerUnaryCall<{ ciphertext: Buffer }, unknown>, callback: grpc.sendUnaryData<unknown>) => {
      calls.Decrypt++;
      const ciphertext = call.request.ciphertext;
      answer(script.decrypt?.(ciphertext) ?? { plaintext: Buffer.from(ciphertext.map((b) => b ^ 0x5a)) }, callback);
    },
  });
  await new Promise<void>((resolve, reject) => server.bindAsync(`unix:${socket}`, grpc.ServerCredentials.createInsecure(), (e) => (e ? reject(e) : resolve())));
  t.teardown(() => server.forceShutdown());
  return { socket, calls };
}

const SECRET_DETAIL = `token=${randomBytes(12).toString('hex')}`;

const mapping: [grpc.status, ErrorCode][] = [
  [grpc.status.INVALID_ARGUMENT, 'BACKEND_REJECTED'],
  [grpc.status.FAILED_PRECONDITION, 'BACKEND_REJECTED'],
  [grpc.status.PERMISSION_DENIED, 'BACKEND_REJECTED'],
  [grpc.status.UNAUTHENTICATED, 'BACKEND_REJECTED'],
  [grpc.status.NOT_FOUND, 'BACKEND_REJECTED'],
  [grpc.status.UNAVAILABLE, 'BACKEND_UNAVAILABLE'],
  [grpc.status.DEADLINE_EXCEEDED, 'BACKEND_UNAVAILABLE'],
  [grpc.status.RESOURCE_EXHAUSTED, 'BACKEND_UNAVAILABLE'],
  [grpc.status.ABORTED, 'BACKEND_UNAVAILABLE'],
];

test('error mapping: each inner status is rejected or unavailable, and its details never reach the message', async (t) => {
  for (const [code, expected] of mapping) {
    const { socket } = await scriptedPlugin(t, {
      encrypt: () => grpcError(code, SECRET_DETAIL),
      decrypt: () => grpcError(code, SECRET_DETAIL),
    });
    await using(backendFor(socket), async (backend) => {
      const wrapError = await t.throwsAsync(backend.wrap(randomBytes(32), contextFor('inner'), signal()));
      t.is(errorCodeOf(wrapError), expected, `Encrypt ${grpc.status[code]}`);
      t.false(wrapError.message.includes(SECRET_DETAIL));
      const copy = encodeCopy({ ciphertext: randomBytes(32), keyId: 'k1', annotations: new Map() })!;
      const unwrapError = await t.throwsAsync(backend.unwrap(copy, 'k1', contextFor('inner'), signal()));
      t.is(errorCodeOf(unwrapError), expected, `Decrypt ${grpc.status[code]}`);
      t.false(unwrapError.message.includes(SECRET_DETAIL));
    });
  }
});

test('error mapping: an UNKNOWN Decrypt is rejected while Status is healthy, unavailable when it is not', async (t) => {
  let healthz = 'ok';
  const { socket, calls } = await scriptedPlugin(t, {
    status: () => ({ version: 'v2', healthz, key_id: 'k1' }),
    decrypt: () => grpcError(grpc.status.UNKNOWN, SECRET_DETAIL),
    encrypt: () => grpcError(grpc.status.UNKNOWN, SECRET_DETAIL),
  });
  await using(backendFor(socket), async (backend) => {
    const copy = encodeCopy({ ciphertext: randomBytes(32), keyId: 'k1', annotations: new Map() })!;
    t.is(errorCodeOf(await t.throwsAsync(backend.unwrap(copy, 'k1', contextFor('inner'), signal()))), 'BACKEND_REJECTED');
    t.is(calls.Status, 1, 'a fresh Status settled it');
    healthz = 'err: the KMS is down';
    const down = await t.throwsAsync(backend.unwrap(copy, 'k1', contextFor('inner'), signal()));
    t.is(errorCodeOf(down), 'BACKEND_UNAVAILABLE');
    t.false(down.message.includes('the KMS is down'), 'the inner healthz text is not echoed');
    // Encrypting our own random key has nothing to refuse: UNKNOWN there is an outage.
    healthz = 'ok';
    t.is(errorCodeOf(await t.throwsAsync(backend.wrap(randomBytes(32), contextFor('inner'), signal()))), 'BACKEND_UNAVAILABLE');
  });
});

test('error mapping: a hung inner plugin is abandoned at the timeout, as unavailable', async (t) => {
  const { socket } = await scriptedPlugin(t, { encrypt: () => 'hang', decrypt: () => 'hang' });
  await using(backendFor(socket, { timeoutMs: 200 }), async (backend) => {
    t.is(errorCodeOf(await t.throwsAsync(backend.wrap(randomBytes(32), contextFor('inner'), signal()))), 'BACKEND_UNAVAILABLE');
    const controller = new AbortController();
    const pending = backend.wrap(randomBytes(32), contextFor('inner'), controller.signal);
    controller.abort(new Error('caller gone'));
    t.is(errorCodeOf(await t.throwsAsync(pending)), 'BACKEND_UNAVAILABLE');
  });
});

test('Status: healthz other than "ok" is unavailable, a non-v2 plugin is rejected, key_id is the key version', async (t) => {
  let status: V2StatusResponse = { version: 'v2', healthz: 'ok', key_id: 'key-1' };
  const { socket, calls } = await scriptedPlugin(t, { status: () => status });
  await using(backendFor(socket, { statusIntervalMs: 0 }), async (backend) => {
    t.is(await backend.currentKeyVersion(signal()), 'key-1');
    status = { version: 'v2', healthz: 'not ok', key_id: 'key-1' };
    t.is(errorCodeOf(await t.throwsAsync(backend.currentKeyVersion(signal()))), 'BACKEND_UNAVAILABLE');
    status = { version: 'v1beta1', healthz: 'ok', key_id: 'key-1' };
    t.is(errorCodeOf(await t.throwsAsync(backend.currentKeyVersion(signal()))), 'BACKEND_REJECTED');
    status = { version: 'v2', healthz: 'ok', key_id: '' };
    t.is(errorCodeOf(await t.throwsAsync(backend.currentKeyVersion(signal()))), 'BACKEND_UNAVAILABLE');
    status = { version: 'v2', healthz: 'ok', key_id: 'key 2 with spaces' };
    t.is(await backend.currentKeyVersion(signal()), keyVersionOf('key 2 with spaces'));
  });
  t.true(calls.Status >= 5);
});

test('Status is reused for statusIntervalMs; an Encrypt under a new key_id makes the next key version ask again', async (t) => {
  let keyId = 'key-1';
  const { socket, calls } = await scriptedPlugin(t, {
    status: () => ({ version: 'v2', healthz: 'ok', key_id: keyId }),
    encrypt: (plaintext) => ({ ciphertext: Buffer.from(plaintext.map((b) => b ^ 0x5a)), key_id: keyId, annotations: { 'a.example.com': Buffer.from('x') } }),
  });
  await using(backendFor(socket, { statusIntervalMs: 300_000 }), async (backend) => {
    t.is(await backend.currentKeyVersion(signal()), 'key-1');
    t.is(await backend.currentKeyVersion(signal()), 'key-1');
    t.is(calls.Status, 1);
    keyId = 'key-2'; // the inner plugin rotated
    const dataKey = randomBytes(32);
    const { wrapped, keyVersion } = await backend.wrap(dataKey, contextFor('inner'), signal());
    t.is(keyVersion, 'key-2');
    t.deepEqual(decodeCopy(wrapped)?.annotations.get('a.example.com'), Buffer.from('x'));
    t.is(await backend.currentKeyVersion(signal()), 'key-2');
    t.is(calls.Status, 2);
    t.deepEqual(Buffer.from(await backend.unwrap(wrapped, keyVersion, contextFor('inner'), signal())), dataKey);
  });
});

/** A plain unix listener that counts connections (for "nothing was sent there"). */
async function countingListener(socket: string): Promise<{ connections(): number; close(): Promise<void> }> {
  let count = 0;
  const server = net.createServer((c) => {
    count++;
    c.destroy();
  });
  await new Promise<void>((resolve) => server.listen(socket, resolve));
  return { connections: () => count, close: () => new Promise((resolve) => server.close(() => resolve())) };
}
