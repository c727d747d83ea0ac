/**
 * AWS KMS backend against two real KMS API servers started by test/servers/up.sh:
 * local-kms (enforces key state: disabled keys, pending deletion) and moto (aliases,
 * multi-Region keys with ReplicateKey). See docs/backends/aws-kms.md, "Test servers".
 */
import { createHash, createHmac, randomBytes, type Hash, type Hmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import test from 'ava';
import { HttpRequest } from '@smithy/core/protocols';
import { SignatureV4 } from '@smithy/signature-v4';
import {
  CreateAliasCommand,
  CreateKeyCommand,
  DisableKeyCommand,
  EnableKeyCommand,
  KMSClient,
  ScheduleKeyDeletionCommand,
  KMSInternalException,
  UpdateAliasCommand,
} from '@aws-sdk/client-kms';
import { AwsKmsBackend, awsConfigSchema, classify, loadAwsSdk, SigV4Sha256 } from '../../src/backends/aws.ts';
import { contextMap, type KeyBackend, type WrapContext } from '../../src/backends/backend.ts';
import { errorCodeOf, type ErrorCode } from '../../src/errors.ts';
import { requireServer } from '../helpers/servers.ts';
import { runBackendConformance } from './conformance.ts';

// Built directly below, not through the backend's definition, which loads the SDK itself.
await loadAwsSdk();

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

// The backend takes credentials only from the SDK's default chain, so the tests feed
// it through the environment, as a pod would. Neither server checks signatures, so a
// random secret lets the conformance kit prove it never leaks into a message.
const SECRET = `trousseau-secret-${randomBytes(12).toString('hex')}`;
process.env.AWS_ACCESS_KEY_ID = 'test';
process.env.AWS_SECRET_ACCESS_KEY = SECRET;
delete process.env.AWS_SESSION_TOKEN;
delete process.env.AWS_PROFILE;
process.env.AWS_EC2_METADATA_DISABLED = 'true';

const signal = (): AbortSignal => AbortSignal.timeout(5000);
const contextFor = (backendName: string): WrapContext => ({ envelopeId: randomBytes(16), backendName });

interface Server {
  endpoint: string;
  region: string;
  keyArn: string;
  keyBArn: string;
  alias: string;
  aliasArn: string;
  unreachable: string;
}

function backend(server: Server, fields: Record<string, unknown> = {}): AwsKmsBackend {
  return new AwsKmsBackend(
    awsConfigSchema.parse({ name: 'aws-test', type: 'aws', keyId: server.keyArn, region: server.region, endpoint: server.endpoint, ...fields }),
  );
}

function adminClient(server: Server, region = server.region): KMSClient {
  return new KMSClient({ region, endpoint: server.endpoint, credentials: { accessKeyId: 'test', secretAccessKey: SECRET } });
}

async function using<T>(b: KeyBackend, body: (b: KeyBackend) => Promise<T>): Promise<T> {
  try {
    return await body(b);
  } finally {
    await b.close();
  }
}

async function createKey(admin: KMSClient, description: string): Promise<string> {
  const created = await admin.send(new CreateKeyCommand({ Description: description }));
  const arn = created.KeyMetadata?.Arn;
  if (!arn) throw new Error('CreateKey returned no ARN');
  return arn;
}

function serverFrom(name: string, prefix: string): (Server & { env: Record<string, string> }) | undefined {
  const found = requireServer(name);
  if ('missing' in found) return undefined;
  const get = (key: string): string => {
    const value = found.env[`${prefix}_${key}`];
    if (!value) throw new Error(`${name} env is missing ${prefix}_${key}`);
    return value;
  };
  return {
    endpoint: get('ENDPOINT'),
    region: get('REGION'),
    keyArn: get('KEY_ARN'),
    keyBArn: get('KEY_B_ARN'),
    alias: get('ALIAS'),
    aliasArn: get('ALIAS_ARN'),
    unreachable: get('UNREACHABLE_ENDPOINT'),
    env: found.env,
  };
}

const localKms = serverFrom('local-kms', 'LOCAL_KMS');
const moto = serverFrom('moto', 'MOTO');

/** Tests every KMS server must pass: conformance, alias resolution, wrong-key refusal. */
function commonSuite(label: string, server: Server): void {
  runBackendConformance(test, {
    label,
    create: () => backend(server),
    createUnreachable: () => backend(server, { endpoint: server.unreachable }),
    secrets: [SECRET],
    bindsContext: true,
  });

  test(`${label}: an alias name and an alias ARN resolve to the target key's ARN`, async (t) => {
    for (const keyId of [server.alias, server.aliasArn]) {
      await using(backend(server, { keyId }), async (viaAlias) => {
        t.is(await viaAlias.currentKeyVersion(signal()), server.keyArn);
        const dataKey = randomBytes(32);
        const context = contextFor('aws-test');
        const { wrapped, keyVersion } = await viaAlias.wrap(dataKey, context, signal());
        t.is(keyVersion, server.keyArn);
        // The same key named by its ARN unwraps what the alias wrapped.
        await using(backend(server), async (viaArn) => {
          t.true(Buffer.from(await viaArn.unwrap(wrapped, keyVersion, context, signal())).equals(dataKey));
        });
      });
    }
  });

  test(`${label}: a copy wrapped by key B is refused by a backend configured with key A`, async (t) => {
    // Same backend name and envelope, so the encryption context matches: only the key differs.
    const context = contextFor('aws-test');
    const { wrapped, keyVersion } = await using(backend(server, { keyId: server.keyBArn }), (b) =>
      b.wrap(randomBytes(32), context, signal()),
    );
    t.is(keyVersion, server.keyBArn);
    await using(backend(server), async (a) => {
      const error = await t.throwsAsync(a.unwrap(wrapped, keyVersion, context, signal()));
      t.is(errorCodeOf(error), 'BACKEND_REJECTED');
      t.false((error).message.includes(SECRET));
    });
  });

  test(`${label}: an unknown key is rejected, not unavailable`, async (t) => {
    const missing = server.keyArn.replace(/key\/.*$/, 'key/00000000-0000-4000-8000-000000000000');
    await using(backend(server, { keyId: missing }), async (b) => {
      const error = await t.throwsAsync(b.currentKeyVersion(signal()));
      t.is(errorCodeOf(error), 'BACKEND_REJECTED');
      t.regex((error).message, /not found/);
    });
  });

  test(`${label}: moving an alias to another key changes the key version at the next refresh`, async (t) => {
    const admin = adminClient(server);
    try {
      const alias = `alias/trousseau-move-${randomBytes(4).toString('hex')}`;
      await admin.send(new CreateAliasCommand({ AliasName: alias, TargetKeyId: server.keyArn }));
      await using(backend(server, { keyId: alias }), async (b) => {
        const context = contextFor('aws-test');
        const before = await b.wrap(randomBytes(32), context, signal());
        t.is(before.keyVersion, server.keyArn);
        await admin.send(new UpdateAliasCommand({ AliasName: alias, TargetKeyId: server.keyBArn }));
        t.is(await b.currentKeyVersion(signal()), server.keyBArn);
        const after = await b.wrap(randomBytes(32), context, signal());
        t.is(after.keyVersion, server.keyBArn);
      });
    } finally {
      admin.destroy();
    }
  });
}

if (localKms) {
  const server = localKms;
  commonSuite('aws (local-kms)', server);

  test('aws (local-kms): a disabled key is rejected as disabled, and works again once enabled', async (t) => {
    const admin = adminClient(server);
    try {
      const keyArn = await createKey(admin, 'trousseau disable test');
      await using(backend(server, { keyId: keyArn }), async (b) => {
        const context = contextFor('aws-test');
        const dataKey = randomBytes(32);
        const copy = await b.wrap(dataKey, context, signal());

        await admin.send(new DisableKeyCommand({ KeyId: keyArn }));
        for (const call of [
          () => b.wrap(randomBytes(32), context, signal()),
          () => b.unwrap(copy.wrapped, copy.keyVersion, context, signal()),
          () => b.currentKeyVersion(signal()),
        ]) {
          const error = await t.throwsAsync(call());
          t.is(errorCodeOf(error), 'BACKEND_REJECTED');
          t.regex((error).message, /is disabled/);
        }

        await admin.send(new EnableKeyCommand({ KeyId: keyArn }));
        t.is(await b.currentKeyVersion(signal()), keyArn);
        t.true(Buffer.from(await b.unwrap(copy.wrapped, copy.keyVersion, context, signal())).equals(dataKey));
        const again = await b.wrap(randomBytes(32), context, signal());
        t.is(again.keyVersion, keyArn);
      });
    } finally {
      admin.destroy();
    }
  });

  test('aws (local-kms): a key scheduled for deletion is rejected', async (t) => {
    const admin = adminClient(server);
    try {
      const keyArn = await createKey(admin, 'trousseau deletion test');
      await using(backend(server, { keyId: keyArn }), async (b) => {
        const context = contextFor('aws-test');
        const copy = await b.wrap(randomBytes(32), context, signal());
        await admin.send(new ScheduleKeyDeletionCommand({ KeyId: keyArn, PendingWindowInDays: 7 }));
        const unwrapError = await t.throwsAsync(b.unwrap(copy.wrapped, copy.keyVersion, context, signal()));
        t.is(errorCodeOf(unwrapError), 'BACKEND_REJECTED');
        t.regex((unwrapError).message, /scheduled for deletion/);
        const wrapError = await t.throwsAsync(b.wrap(randomBytes(32), context, signal()));
        t.is(errorCodeOf(wrapError), 'BACKEND_REJECTED');
        const probeError = await t.throwsAsync(b.currentKeyVersion(signal()));
        t.is(errorCodeOf(probeError), 'BACKEND_REJECTED');
        t.regex((probeError).message, /scheduled for deletion/);
      });
    } finally {
      admin.destroy();
    }
  });
} else {
  test('aws (local-kms): server not running', (t) => t.pass('skipped: local-kms is not running'));
}

if (moto) {
  const server = moto;
  const env = moto.env;
  commonSuite('aws (moto)', server);

  const mrkArn = env.MOTO_MRK_ARN ?? '';
  const replicaArn = env.MOTO_MRK_REPLICA_ARN ?? '';
  const replicaRegion = env.MOTO_REPLICA_REGION ?? '';
  // Replicas use their region's endpoint from the SDK's own configuration; here the
  // standard variable points every region at moto, which routes on the SigV4 region.
  process.env.AWS_ENDPOINT_URL_KMS = server.endpoint;

  test('aws (moto): a backend configured with a multi-Region replica works in the replica region', async (t) => {
    t.truthy(mrkArn && replicaArn && replicaRegion, 'moto env lacks the multi-Region key');
    await using(backend(server, { keyId: replicaArn, region: replicaRegion, replicaKeyIds: [mrkArn] }), async (west) => {
      t.is(await west.currentKeyVersion(signal()), replicaArn);
      const { keyVersion } = await west.wrap(randomBytes(32), contextFor('aws-test'), signal());
      t.is(keyVersion, replicaArn);
    });
  });

  test("aws (moto): unwrap asks the replica's region when the key's own region is unreachable", async (t) => {
    const context = contextFor('aws-test');
    const dataKey = randomBytes(32);
    const copy = await using(backend(server, { keyId: mrkArn }), (b) => b.wrap(dataKey, context, signal()));
    t.is(copy.keyVersion, mrkArn);
    // Without replicas the outage is simply unavailable.
    await using(backend(server, { keyId: mrkArn, endpoint: server.unreachable }), async (b) => {
      t.is(errorCodeOf(await t.throwsAsync(b.unwrap(copy.wrapped, copy.keyVersion, context, signal()))), 'BACKEND_UNAVAILABLE');
    });
    await using(backend(server, { keyId: mrkArn, endpoint: server.unreachable, replicaKeyIds: [replicaArn] }), async (b) => {
      try {
        t.true(Buffer.from(await b.unwrap(copy.wrapped, copy.keyVersion, context, signal())).equals(dataKey));
      } catch (error) {
        // moto 5.2.5 cannot decrypt under any mrk- key (its ciphertext keeps 36 of the
        // 40 characters of the key id), so the replica's answer is a refusal. That it
        // is the replica's answer, not the outage of the key's region, shows the call
        // went to the replica in its own region.
        t.is(errorCodeOf(error), 'BACKEND_REJECTED');
        t.true((error as Error).message.includes(replicaArn), (error as Error).message);
      }
      // Wrapping never moves to a replica: a new copy needs the configured key.
      t.is(errorCodeOf(await t.throwsAsync(b.wrap(randomBytes(32), context, signal()))), 'BACKEND_UNAVAILABLE');
    });
  });

  test('aws (moto): assumeRole takes the role from STS before calling KMS', async (t) => {
    // moto serves STS too (AWS_ENDPOINT_URL_STS is the SDK's standard override). An
    // unreachable STS must make the backend unavailable: proof the role is used.
    const assumeRole = { roleArn: 'arn:aws:iam::123456789012:role/trousseau-kms', externalId: 'trousseau-test' };
    process.env.AWS_ENDPOINT_URL_STS = server.unreachable;
    await using(backend(server, { assumeRole }), async (b) => {
      const error = await t.throwsAsync(b.wrap(randomBytes(32), contextFor('aws-test'), signal()));
      t.is(errorCodeOf(error), 'BACKEND_UNAVAILABLE');
      t.false((error).message.includes(SECRET));
    });
    process.env.AWS_ENDPOINT_URL_STS = server.endpoint;
    await using(backend(server, { assumeRole }), async (b) => {
      const context = contextFor('aws-test');
      const dataKey = randomBytes(32);
      const copy = await b.wrap(dataKey, context, signal());
      t.true(Buffer.from(await b.unwrap(copy.wrapped, copy.keyVersion, context, signal())).equals(dataKey));
    });
  });
} else {
  test('aws (moto): server not running', (t) => t.pass('skipped: moto is not running'));
}

test('aws: a Decrypt answered with another key is refused (local stub: no real server can be made to lie)', async (t) => {
  const configured = 'arn:aws:kms:us-east-1:111122223333:key/6f0c2d1e-3b4a-4c5d-8e9f-0a1b2c3d4e5f';
  const other = 'arn:aws:kms:us-east-1:111122223333:key/7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d';
  const stub = createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      res.setHeader('content-type', 'application/x-amz-json-1.1');
      res.end(JSON.stringify({ KeyId: other, Plaintext: randomBytes(32).toString('base64'), EncryptionAlgorithm: 'SYMMETRIC_DEFAULT' }));
    });
  });
  await new Promise<void>((resolve) => stub.listen(0, '127.0.0.1', resolve));
  try {
    const endpoint = `http://127.0.0.1:${(stub.address() as AddressInfo).port}`;
    const b = new AwsKmsBackend(awsConfigSchema.parse({ name: 'aws-test', type: 'aws', keyId: configured, region: 'us-east-1', endpoint }));
    await using(b, async () => {
      const error = await t.throwsAsync(b.unwrap(randomBytes(64), configured, contextFor('aws-test'), signal()));
      t.is(errorCodeOf(error), 'BACKEND_REJECTED');
      t.regex((error).message, /not the configured key/);
    });
  } finally {
    stub.close();
  }
});

/** A hash of the SigV4 signer's form from node:crypto alone, so the check below does not trust the SDK's hashing. */
class NodeSha256 {
  private readonly hash: Hash | Hmac;
  constructor(secret?: SourceData) {
    this.hash = secret === undefined ? createHash('sha256') : createHmac('sha256', toBytes(secret));
  }
  update(data: SourceData): void {
    this.hash.update(toBytes(data));
  }
  digest(): Promise<Uint8Array> {
    return Promise.resolve(this.hash.digest());
  }
}
type SourceData = string | ArrayBuffer | ArrayBufferView;
const toBytes = (data: SourceData): Buffer =>
  typeof data === 'string' ? Buffer.from(data) : ArrayBuffer.isView(data) ? Buffer.from(data.buffer, data.byteOffset, data.byteLength) : Buffer.from(data);

/**
 * Whether a received request carries a valid SigV4 signature, as AWS checks it: the
 * request is signed again from what arrived (the signed headers, path, body, date) and
 * the signatures must be equal. Neither test server checks signatures, so this is the
 * only proof that what the backend sends is what it signed.
 */
async function validSignature(request: IncomingMessage, body: Buffer, secret: string): Promise<{ valid: boolean; signedHeaders: string[] }> {
  const authorization = request.headers.authorization ?? '';
  const signedHeaders = /SignedHeaders=([^,]+)/.exec(authorization)?.[1]?.split(';') ?? [];
  const headers = Object.fromEntries(signedHeaders.map((name) => [name, String(request.headers[name])]));
  const date = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/.exec(headers['x-amz-date'] ?? '');
  if (!date) return { valid: false, signedHeaders };
  const [, y, mo, d, h, mi, sec] = date.map(Number) as [number, number, number, number, number, number, number];
  const signer = new SignatureV4({ credentials: { accessKeyId: 'test', secretAccessKey: secret }, region: 'us-east-1', service: 'kms', sha256: NodeSha256 });
  const again = await signer.sign(
    new HttpRequest({ method: request.method, protocol: 'http:', hostname: '127.0.0.1', path: request.url, headers, body: body.toString('utf8') }),
    { signingDate: new Date(Date.UTC(y, mo - 1, d, h, mi, sec)) },
  );
  return { valid: again.headers.authorization === authorization, signedHeaders };
}

interface StubAnswer {
  status: number;
  body: string;
}

/** A KMS stand-in answering each request with the next of `answers`, recording what it got. */
async function scriptedKms(answers: StubAnswer[]): Promise<{ endpoint: string; requests: { headers: IncomingMessage['headers']; signature: Awaited<ReturnType<typeof validSignature>> }[]; close(): void }> {
  const requests: { headers: IncomingMessage['headers']; signature: Awaited<ReturnType<typeof validSignature>> }[] = [];
  const stub = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      void validSignature(req, Buffer.concat(chunks), SECRET).then((signature) => {
        requests.push({ headers: req.headers, signature });
        const answer = answers.shift() ?? { status: 500, body: '{"__type":"KMSInternalException"}' };
        res.writeHead(answer.status, { 'content-type': 'application/x-amz-json-1.1' });
        res.end(answer.body);
      });
    });
  });
  await new Promise<void>((resolve) => stub.listen(0, '127.0.0.1', resolve));
  return { endpoint: `http://127.0.0.1:${(stub.address() as AddressInfo).port}`, requests, close: () => stub.close() };
}

test('aws: throttling and 5xx are retried once (signed anew), a refusal is not retried (local stub: no real server throttles on demand)', async (t) => {
  const keyArn = 'arn:aws:kms:us-east-1:111122223333:key/6f0c2d1e-3b4a-4c5d-8e9f-0a1b2c3d4e5f';
  const dataKey = randomBytes(32);
  const ok: StubAnswer = { status: 200, body: JSON.stringify({ KeyId: keyArn, Plaintext: dataKey.toString('base64'), EncryptionAlgorithm: 'SYMMETRIC_DEFAULT' }) };
  const throttled: StubAnswer = { status: 400, body: '{"__type":"ThrottlingException","message":"Rate exceeded"}' };
  const unavailable: StubAnswer = { status: 503, body: 'Service Unavailable' };
  const refused: StubAnswer = { status: 400, body: '{"__type":"InvalidCiphertextException","message":"no"}' };
  const cases: { answers: StubAnswer[]; requests: number; result: 'ok' | ErrorCode; message?: RegExp }[] = [
    { answers: [throttled, ok], requests: 2, result: 'ok' },
    { answers: [unavailable, ok], requests: 2, result: 'ok' },
    { answers: [throttled, throttled], requests: 2, result: 'BACKEND_UNAVAILABLE', message: /throttled/ },
    { answers: [refused], requests: 1, result: 'BACKEND_REJECTED', message: /refused the wrapped copy/ },
  ];
  for (const [index, c] of cases.entries()) {
    const stub = await scriptedKms([...c.answers]);
    try {
      const b = new AwsKmsBackend(awsConfigSchema.parse({ name: 'aws-test', type: 'aws', keyId: keyArn, region: 'us-east-1', endpoint: stub.endpoint }));
      await using(b, async () => {
        const unwrapping = b.unwrap(randomBytes(64), keyArn, contextFor('aws-test'), signal());
        if (c.result === 'ok') {
          t.true(Buffer.from(await unwrapping).equals(dataKey), `case ${index}`);
        } else {
          const error = await t.throwsAsync(unwrapping);
          t.is(errorCodeOf(error), c.result, `case ${index}`);
          if (c.message) t.regex(error.message, c.message);
        }
      });
      t.is(stub.requests.length, c.requests, `case ${index}: requests`);
      stub.requests.forEach((r, attempt) => {
        t.true(r.signature.valid, `case ${index}, attempt ${attempt + 1}: the signature matches what was sent`);
        for (const name of ['host', 'x-amz-date', 'x-amz-target', 'content-type']) t.true(r.signature.signedHeaders.includes(name), `${name} is signed`);
        t.is(r.headers['x-amz-target'], 'TrentService.Decrypt');
        t.is(r.headers['amz-sdk-request'], `attempt=${attempt + 1}; max=2`);
        t.is(r.headers['amz-sdk-invocation-id'], stub.requests[0]?.headers['amz-sdk-invocation-id']);
        t.regex(String(r.headers['user-agent']), /aws-sdk-js\/3\./);
      });
    } finally {
      stub.close();
    }
  }
});

test("aws: the signer's SHA-256 and HMAC-SHA256 equal node:crypto's, for every key length and any number of parts", async (t) => {
  const message = randomBytes(300);
  for (const secret of [undefined, '', 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY', 'k'.repeat(64), 'k'.repeat(65), randomBytes(32), randomBytes(64), randomBytes(65), randomBytes(200), new Uint8Array(0)]) {
    for (const cut of [0, 1, 150, 300]) {
      const ours = new SigV4Sha256(secret);
      ours.update(message.subarray(0, cut));
      ours.update(message.subarray(cut));
      // An empty string is no secret (a plain hash), as with the SDK's own.
      const theirs = secret === undefined || secret === '' ? createHash('sha256') : createHmac('sha256', secret);
      const expected = theirs.update(message).digest();
      const label = `secret ${typeof secret === 'string' ? `string of ${secret.length}` : secret ? `${secret.length} bytes` : 'none'}, cut ${cut}`;
      t.true(Buffer.from(await ours.digest()).equals(expected), label);
      t.true(Buffer.from(await ours.digest()).equals(expected), `${label}, second digest`);
    }
  }
  const reused = new SigV4Sha256('key');
  reused.update(Buffer.from('a'));
  reused.reset();
  reused.update(Buffer.from('b'));
  t.true(Buffer.from(await reused.digest()).equals(createHmac('sha256', 'key').update('b').digest()), 'reset starts again with the same key');
});

test('aws: SDK errors are classified by name and status, never by their message', (t) => {
  const leak = 'raw server text with AKIAEXAMPLE and secret';
  const sdkError = (name: string, status: number) =>
    Object.assign(new Error(leak), { name, $metadata: { httpStatusCode: status } });
  const cases: [unknown, ErrorCode][] = [
    [sdkError('ThrottlingException', 400), 'BACKEND_UNAVAILABLE'],
    [new KMSInternalException({ message: leak, $metadata: { httpStatusCode: 500 } }), 'BACKEND_UNAVAILABLE'],
    [sdkError('KMSInternalException', 500), 'BACKEND_UNAVAILABLE'],
    [sdkError('DependencyTimeoutException', 503), 'BACKEND_UNAVAILABLE'],
    [sdkError('SomethingNew', 502), 'BACKEND_UNAVAILABLE'],
    [Object.assign(new Error(leak), { code: 'ECONNRESET' }), 'BACKEND_UNAVAILABLE'],
    [sdkError('AccessDeniedException', 400), 'BACKEND_REJECTED'],
    [sdkError('DisabledException', 400), 'BACKEND_REJECTED'],
    [sdkError('KMSInvalidStateException', 400), 'BACKEND_REJECTED'],
    [sdkError('NotFoundException', 400), 'BACKEND_REJECTED'],
    [sdkError('IncorrectKeyException', 400), 'BACKEND_REJECTED'],
    [sdkError('InvalidCiphertextException', 400), 'BACKEND_REJECTED'],
    [sdkError('UnrecognizedClientException', 400), 'BACKEND_REJECTED'],
  ];
  for (const [error, code] of cases) {
    const classified = classify(error, 'alias/k');
    t.is(classified.code, code, (error as Error).name);
    t.false(classified.message.includes(leak));
    t.is(classified.cause, error);
  }
  t.regex(classify(sdkError('AccessDeniedException', 400), 'alias/k').message, /denied/);
});

test('aws: config accepts no credentials of its own and checks the key region', (t) => {
  const base = { name: 'aws-a', type: 'aws', keyId: 'alias/k8s', region: 'eu-west-1' };
  t.true(awsConfigSchema.safeParse(base).success);
  t.false(awsConfigSchema.safeParse({ ...base, accessKeyId: 'AKIA', secretAccessKey: 'x' }).success);
  t.false(awsConfigSchema.safeParse({ ...base, keyId: 'arn:aws:kms:us-east-1:111122223333:key/abc' }).success);
  t.false(awsConfigSchema.safeParse({ ...base, replicaKeyIds: ['arn:aws:kms:eu-west-1:111122223333:key/mrk-1'] }).success);
  t.true(awsConfigSchema.safeParse({ ...base, replicaKeyIds: ['arn:aws:kms:us-east-1:111122223333:key/mrk-1'] }).success);
  t.false(awsConfigSchema.safeParse({ ...base, assumeRole: { roleArn: 'arn:aws:iam::111122223333:role/r', token: 'x' } }).success);
  const parsed = awsConfigSchema.parse({ ...base, assumeRole: { roleArn: 'arn:aws:iam::111122223333:role/r' } });
  t.is(parsed.assumeRole?.sessionName, 'trousseau');
  t.is(parsed.timeoutMs, 1000);
});

test('aws: the IAM policy grants exactly the calls the backend makes, bound to the encryption context', (t) => {
  const policy = JSON.parse(readFileSync(path.join(root, 'policies/aws/trousseau-kms-policy.json'), 'utf8')) as {
    Version: string;
    Statement: { Effect: string; Action: string[]; Resource: string[]; Condition?: Record<string, Record<string, unknown>> }[];
  };
  t.is(policy.Version, '2012-10-17');
  const actions = policy.Statement.flatMap((s) => s.Action).sort();
  t.deepEqual(actions, ['kms:Decrypt', 'kms:DescribeKey', 'kms:Encrypt']);
  for (const statement of policy.Statement) {
    t.is(statement.Effect, 'Allow');
    for (const resource of statement.Resource) t.regex(resource, /^arn:aws:kms:[^:*]+:[^:*]+:key\/[^*]+$/, 'resource must be one key, no wildcard');
  }

  // The operations the backend source calls are exactly the policy's actions: the
  // commands it sends, and the operation schemas of its own call path (kms.Encrypt$).
  const source = readFileSync(path.join(root, 'src/backends/aws.ts'), 'utf8');
  const commands = [...source.matchAll(/new (\w+)Command\(|\bkms\.(\w+)\$/g)].map((m) => `kms:${m[1] ?? m[2]}`);
  t.deepEqual([...new Set(commands)].sort(), actions);

  // Encrypt and Decrypt require exactly the context keys the backend sends.
  const wrapStatement = policy.Statement.find((s) => s.Action.includes('kms:Encrypt'));
  t.deepEqual(wrapStatement?.Action.slice().sort(), ['kms:Decrypt', 'kms:Encrypt']);
  const keys = wrapStatement?.Condition?.['ForAllValues:StringEquals']?.['kms:EncryptionContextKeys'] as string[] | undefined;
  t.deepEqual(keys?.slice().sort(), Object.keys(contextMap(contextFor('x'))).sort());
  t.is(wrapStatement?.Condition?.Null?.['kms:EncryptionContextKeys'], 'false');
});

test('aws: the key policy keeps the administrators and gives the plugin role only the three actions, bound to the encryption context', (t) => {
  type Statement = { Sid?: string; Effect: string; Principal?: { AWS?: string }; Action: string[]; Resource: string; Condition?: Record<string, Record<string, unknown>> };
  const policy = JSON.parse(readFileSync(path.join(root, 'policies/aws/trousseau-key-policy.json'), 'utf8')) as { Version: string; Statement: Statement[] };
  t.is(policy.Version, '2012-10-17');
  const plugin = policy.Statement.filter((s) => s.Principal?.AWS?.endsWith(':role/TROUSSEAU_ROLE'));
  const others = policy.Statement.filter((s) => !plugin.includes(s));
  t.deepEqual(plugin.flatMap((s) => s.Action).sort(), ['kms:Decrypt', 'kms:DescribeKey', 'kms:Encrypt']);
  for (const s of policy.Statement) t.is(s.Effect, 'Allow');
  // The administrators manage the key but cannot use it.
  t.true(others.some((s) => s.Sid === 'KeyAdministrators' && s.Action.includes('kms:ScheduleKeyDeletion')));
  for (const s of others) t.false(s.Action.some((a) => /^kms:(\*|Encrypt|Decrypt|ReEncrypt|GenerateDataKey)/.test(a)), s.Sid);
  const wrapStatement = plugin.find((s) => s.Action.includes('kms:Encrypt'));
  t.deepEqual(wrapStatement?.Action.slice().sort(), ['kms:Decrypt', 'kms:Encrypt']);
  const keys = wrapStatement?.Condition?.['ForAllValues:StringEquals']?.['kms:EncryptionContextKeys'] as string[] | undefined;
  t.deepEqual(keys?.slice().sort(), Object.keys(contextMap(contextFor('x'))).sort());
  t.is(wrapStatement?.Condition?.Null?.['kms:EncryptionContextKeys'], 'false');
});

test.serial('aws: a request that passes the backend timeout writes nothing to the console and ends with the caller\'s signal, as unavailable', async (t) => {
  // The SDK's HTTP handler (@smithy/node-http-handler 4.x), given a requestTimeout,
  // only warns on the console when a request passes it and lets it run on: an
  // unstructured line on the plugin's stderr for every slow request. The bound is the
  // caller's signal (the engine's patient timer, GuardedBackend), here 1 s.
  const keyArn = 'arn:aws:kms:us-east-1:111122223333:key/6f0c2d1e-3b4a-4c5d-8e9f-0a1b2c3d4e5f';
  const silent = createServer(() => undefined); // reads the request, never answers
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
  t.teardown(() => silent.close());
  const written: string[] = [];
  const saved = { warn: console.warn, error: console.error, log: console.log };
  for (const level of ['warn', 'error', 'log'] as const) console[level] = (...args: unknown[]) => void written.push(args.map(String).join(' '));
  t.teardown(() => Object.assign(console, saved));
  const endpoint = `http://127.0.0.1:${(silent.address() as AddressInfo).port}`;
  const b = new AwsKmsBackend(awsConfigSchema.parse({ name: 'aws-test', type: 'aws', keyId: keyArn, region: 'us-east-1', endpoint, timeoutMs: 200 }));
  await using(b, async () => {
    const started = performance.now();
    const error = await t.throwsAsync(b.unwrap(randomBytes(64), keyArn, contextFor('aws-test'), AbortSignal.timeout(1000)));
    const elapsed = performance.now() - started;
    t.is(errorCodeOf(error), 'BACKEND_UNAVAILABLE');
    t.true(elapsed < 3000, `the call took ${Math.round(elapsed)} ms: the caller's signal did not end it`);
  });
  silent.closeAllConnections();
  t.deepEqual(written, [], 'the SDK wrote to the console');
});
