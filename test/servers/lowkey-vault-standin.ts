/**
 * STAND-IN for lowkey-vault, used only when the lowkey-vault jar cannot be installed
 * (see docs/backends/azure-keyvault.md, "Test server"). It is NOT an Azure Key Vault
 * implementation: it answers the handful of Key Vault REST calls the Azure backend
 * and its tests make (keys create/get/rotate/update, wrapkey/unwrapkey with
 * RSA-OAEP-256), over HTTPS with the bearer challenge, with the status codes Azure
 * documents (401 challenge, 403 Forbidden for a disabled key, 404 KeyNotFound,
 * 400 BadParameter). Its behaviour is our reading of the API, so passing against it
 * proves the backend drives the real SDK over real TLS, not that Azure agrees.
 *
 * Usage: node lowkey-vault-standin.ts --cert C --key K --port P --token-port T
 */
import { constants, createPrivateKey, generateKeyPairSync, privateDecrypt, publicEncrypt, randomBytes, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    cert: { type: 'string' },
    key: { type: 'string' },
    port: { type: 'string', default: '8443' },
    'token-port': { type: 'string', default: '8080' },
  },
});
if (!values.cert || !values.key) throw new Error('--cert and --key are required');

interface KeyVersion {
  version: string;
  keySize: number;
  keyType: string;
  privateKey: KeyObject;
  jwk: { n: string; e: string };
  enabled: boolean;
  created: number;
  updated: number;
}
const keys = new Map<string, KeyVersion[]>();

function newVersion(keyType: string, keySize: number): KeyVersion {
  const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: keySize, publicExponent: 65537 });
  const jwk = publicKey.export({ format: 'jwk' });
  const now = Math.floor(Date.now() / 1000);
  return {
    version: randomBytes(16).toString('hex'),
    keySize,
    keyType,
    privateKey: createPrivateKey(privateKey.export({ format: 'pem', type: 'pkcs8' })),
    jwk: { n: jwk.n ?? '', e: jwk.e ?? '' },
    enabled: true,
    created: now,
    updated: now,
  };
}

function bundle(base: string, name: string, k: KeyVersion) {
  return {
    key: {
      kid: `${base}/keys/${name}/${k.version}`,
      kty: k.keyType,
      key_ops: ['encrypt', 'decrypt', 'wrapKey', 'unwrapKey'],
      n: k.jwk.n,
      e: k.jwk.e,
    },
    attributes: { enabled: k.enabled, created: k.created, updated: k.updated, recoveryLevel: 'Recoverable+Purgeable', recoverableDays: 90 },
    tags: {},
  };
}

function send(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

function fail(res: ServerResponse, status: number, code: string, message: string) {
  send(res, status, { error: { code, message } });
}

async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? (JSON.parse(text) as Record<string, unknown>) : {};
}

async function vault(req: IncomingMessage, res: ServerResponse) {
  const url = new URL(req.url ?? '/', `https://${req.headers.host ?? 'localhost'}`);
  const base = `https://${req.headers.host ?? 'localhost'}`;
  if (!/^Bearer \S+/.test(req.headers.authorization ?? '')) {
    // The SDK first sends each request without a token and learns where to get one here.
    send(res, 401, { error: { code: 'Unauthorized', message: 'AKV10000: Request is missing a Bearer or PoP token.' } }, {
      'www-authenticate': 'Bearer authorization="https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000", resource="https://vault.azure.net"',
    });
    return;
  }
  const parts = url.pathname.split('/').filter(Boolean);
  if (parts[0] !== 'keys' || !parts[1]) return fail(res, 400, 'BadParameter', 'unsupported path');
  const name = parts[1];
  const body = req.method === 'POST' || req.method === 'PATCH' ? await readJson(req) : {};
  const versions = keys.get(name);

  if (req.method === 'POST' && parts[2] === 'create' && parts.length === 3) {
    const keyType = typeof body.kty === 'string' ? body.kty : 'RSA';
    const keySize = typeof body.key_size === 'number' ? body.key_size : 2048;
    if (!['RSA', 'RSA-HSM'].includes(keyType) || ![2048, 3072, 4096].includes(keySize)) {
      return fail(res, 400, 'BadParameter', 'only RSA and RSA-HSM keys of 2048, 3072 or 4096 bits are supported');
    }
    const created = newVersion(keyType, keySize);
    keys.set(name, [...(versions ?? []), created]);
    return send(res, 200, bundle(base, name, created));
  }
  if (!versions || versions.length === 0) return fail(res, 404, 'KeyNotFound', `A key with (name/id) ${name} was not found in this key vault.`);
  const latest = versions[versions.length - 1]!;

  if (req.method === 'POST' && parts[2] === 'rotate' && parts.length === 3) {
    const rotated = newVersion(latest.keyType, latest.keySize);
    versions.push(rotated);
    return send(res, 200, bundle(base, name, rotated));
  }
  const version = parts[2] ?? '';
  const key = version === '' ? latest : versions.find((v) => v.version === version);
  if (!key) return fail(res, 404, 'KeyNotFound', `A key with (name/id) ${name}/${version} was not found in this key vault.`);

  if (req.method === 'GET' && parts.length <= 3) return send(res, 200, bundle(base, name, key));
  if (req.method === 'PATCH' && parts.length === 3) {
    const attributes = body.attributes as { enabled?: unknown } | undefined;
    if (typeof attributes?.enabled === 'boolean') key.enabled = attributes.enabled;
    key.updated = Math.floor(Date.now() / 1000);
    return send(res, 200, bundle(base, name, key));
  }
  if (req.method === 'POST' && (parts[3] === 'wrapkey' || parts[3] === 'unwrapkey') && parts.length === 4) {
    if (!key.enabled) return fail(res, 403, 'Forbidden', `Operation ${parts[3] === 'wrapkey' ? 'wrapKey' : 'unwrapKey'} is not allowed on a disabled key.`);
    if (body.alg !== 'RSA-OAEP-256' || typeof body.value !== 'string') return fail(res, 400, 'BadParameter', 'unsupported algorithm or missing value');
    const input = Buffer.from(body.value, 'base64url');
    const options = { key: key.privateKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' };
    let output: Buffer;
    try {
      output = parts[3] === 'wrapkey' ? publicEncrypt(options, input) : privateDecrypt(options, input);
    } catch {
      return fail(res, 400, 'BadParameter', 'The parameter is incorrect.');
    }
    return send(res, 200, { kid: `${base}/keys/${name}/${key.version}`, value: output.toString('base64url') });
  }
  return fail(res, 400, 'BadParameter', 'unsupported operation');
}

const https = createHttpsServer({ cert: readFileSync(values.cert), key: readFileSync(values.key) }, (req, res) => {
  vault(req, res).catch((error: unknown) => fail(res, 500, 'InternalError', String(error)));
});
https.listen(Number(values.port), '127.0.0.1');

// Token side, shaped like lowkey-vault's: /ping, and an App Service style managed
// identity endpoint that hands out a token for any resource.
const http = createHttpServer((req, res) => {
  const url = new URL(req.url ?? '/', 'http://localhost');
  if (url.pathname === '/ping') return send(res, 200, { status: 'ok', server: 'lowkey-vault-standin' });
  if (url.pathname === '/metadata/identity/oauth2/token') {
    const resource = url.searchParams.get('resource') ?? 'https://vault.azure.net';
    const expiresOn = Math.floor(Date.now() / 1000) + 3600;
    return send(res, 200, { access_token: 'standin-token', token_type: 'Bearer', resource, expires_on: String(expiresOn), expires_in: '3600' });
  }
  return fail(res, 404, 'NotFound', 'not found');
});
http.listen(Number(values['token-port']), '127.0.0.1');
