/**
 * `trousseau doctor`: checks a node and a configuration before the plugin serves, for
 * first installs and after changes. Offline by default: it reads files, resolves
 * names, shakes hands and asks each backend for its key version (which proves the
 * credentials) but never wraps a key; `--live` adds one wrap and unwrap per backend.
 *
 * Each check gives one result: pass, warn, fail (with the fix) or skip (an earlier
 * check failed, so this one cannot run). Any fail makes the exit status 1.
 *
 * What it prints: file paths, host names, backend names, modes, key versions and
 * error classes. Never a file's content, a token, an id from the credentials block,
 * or a message from an SDK or a server (they may quote request data).
 *
 * The permission checks are the plugin's own, not copies: local key files go through
 * `loadKeyRing` (what the backend reads them with), the socket folder through
 * `prepareTrustedFolder` (what `serve` binds with), only when the folder exists, so
 * that doctor creates nothing.
 */
import { constants as fsConstants } from 'node:fs';
import { access, lstat, readFile, stat } from 'node:fs/promises';
import { X509Certificate, createPrivateKey, randomBytes, timingSafeEqual } from 'node:crypto';
import dns from 'node:dns/promises';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import path from 'node:path';
import tls, { rootCertificates } from 'node:tls';
import { awsSdkCredentialFiles } from '../backends/aws.ts';
import { azureSdkCredentialFiles } from '../backends/azure.ts';
import { loadKeyRing } from '../backends/local.ts';
import { definitionFor } from '../backends/registry.ts';
import type { BackendConfig } from '../backends/registry.ts';
import type { KeyBackend } from '../backends/backend.ts';
import { loadConfigFile } from '../config/load.ts';
import type { Config } from '../config/schema.ts';
import { errorCodeOf, isTrousseauError } from '../errors.ts';
import { checkOne, type SdkCredentialFile } from '../config/sdk-credential-files.ts';
import { prepareTrustedFolder, readCredentialFile } from '../config/trusted-path.ts';
import { isServed, resolveGroup } from '../kms/socket.ts';
import { silentLogger } from '../observability/logger.ts';

export type CheckStatus = 'pass' | 'warn' | 'fail' | 'skip';

export interface CheckResult {
  /** What was checked: "config", "socket folder", "vault-a tls", ... */
  check: string;
  status: CheckStatus;
  detail: string;
  /** What to do about a warn or a fail. */
  fix?: string;
}

export interface DoctorOptions {
  config: string;
  live?: boolean;
  /** Clock difference to a backend above which the check fails (default 5 minutes). */
  maxSkewMs?: number;
}

export interface DoctorReport {
  ok: boolean;
  checks: CheckResult[];
}

/** Past this the check fails: AWS SigV4 refuses requests 5 minutes off, tokens' nbf/exp are checked to the minute. */
const MAX_SKEW_MS = 5 * 60_000;
const WARN_SKEW_MS = 60_000;
const NETWORK_TIMEOUT_MS = 5000;
/** Asking for a key version may include a login (Vault's background calls are bounded at 10 s). */
const CREDENTIAL_TIMEOUT_MS = 15_000;
const CERT_EXPIRY_WARN_MS = 30 * 86_400_000;
const MAX_SECRET_FILE_BYTES = 64 * 1024;

const pass = (check: string, detail: string): CheckResult => ({ check, status: 'pass', detail });
const warn = (check: string, detail: string, fix: string): CheckResult => ({ check, status: 'warn', detail, fix });
const fail = (check: string, detail: string, fix: string): CheckResult => ({ check, status: 'fail', detail, fix });
const skip = (check: string, detail: string): CheckResult => ({ check, status: 'skip', detail });

const errnoOf = (error: unknown): string | undefined => {
  const code = (error as NodeJS.ErrnoException | null)?.code;
  return typeof code === 'string' && /^[A-Z0-9_]{1,40}$/.test(code) ? code : undefined;
};

/** A message safe to show: ours are written to be shown; anything else only by class. */
function safeMessage(error: unknown): string {
  if (isTrousseauError(error)) return (error as Error).message;
  return `${errnoOf(error) ?? errorCodeOf(error)} (details withheld: the message may quote request data)`;
}

// ------------------------------------------------------------------ files

type FileRole = 'local key' | 'secret' | 'ca' | 'client certificate' | 'client key' | 'certificate and key';

interface ReferencedFile {
  field: string;
  file: string;
  role: FileRole;
}

/** Every file a backend's configuration names, resolved as the backend resolves it. */
export function referencedFiles(backend: BackendConfig, baseDir: string): ReferencedFile[] {
  const at = (field: string, file: string | undefined, role: FileRole) => (file === undefined ? [] : [{ field, file: path.resolve(baseDir, file), role }]);
  switch (backend.type) {
    case 'local':
      return [...at('keyFile', backend.keyFile, 'local key'), ...backend.previousKeyFiles.flatMap((f, i) => at(`previousKeyFiles.${i}`, f, 'local key'))];
    case 'vault': {
      const auth = backend.auth;
      const authFiles =
        auth.method === 'approle'
          ? [...at('auth.roleIdFile', auth.roleIdFile, 'secret'), ...at('auth.secretIdFile', auth.secretIdFile, 'secret')]
          : at('auth.tokenFile', auth.tokenFile, 'secret');
      return [
        ...authFiles,
        ...at('tls.caFile', backend.tls?.caFile, 'ca'),
        ...at('tls.certFile', backend.tls?.certFile, 'client certificate'),
        ...at('tls.keyFile', backend.tls?.keyFile, 'client key'),
      ];
    }
    case 'azure': {
      const credential = backend.credential;
      return [
        ...at('caFile', backend.caFile, 'ca'),
        ...(credential.method === 'workloadIdentity' ? at('credential.tokenFile', credential.tokenFile, 'secret') : []),
        ...(credential.method === 'clientSecret' ? at('credential.secretFile', credential.secretFile, 'secret') : []),
        ...(credential.method === 'clientCertificate' ? at('credential.certificateFile', credential.certificateFile, 'certificate and key') : []),
      ];
    }
    case 'aws':
    case 'kms-plugin': // its socket is checked by the backend itself (folder ownership, not a link)
      return [];
    case 'pkcs11':
      return at('pinFile', backend.pinFile, 'secret');
  }
}

/**
 * The files the backend's SDK reads itself that the configuration does not name (those
 * go through checkFile): the AWS shared files and token files, the Azure files named by
 * the environment. The same lists the backends check before they are created.
 */
export function sdkFilesToCheck(backend: BackendConfig, baseDir: string): SdkCredentialFile[] {
  const named = new Set(referencedFiles(backend, baseDir).map((ref) => ref.file));
  const files = backend.type === 'aws' ? awsSdkCredentialFiles() : backend.type === 'azure' ? azureSdkCredentialFiles(backend.credential, baseDir) : [];
  return files.filter((file) => !named.has(file.file));
}

/** One SDK file by the plugin's own rule (checkSdkCredentialFile); a missing one is the SDK's business. */
async function checkSdkFile(check: string, who: string, file: SdkCredentialFile): Promise<CheckResult> {
  let present: boolean;
  try {
    present = await checkOne(who, file);
  } catch (error) {
    return fail(check, safeMessage(error), "keep the file in a folder only root and the plugin's user can write, owned by one of them, not writable by others");
  }
  if (!present) {
    return file.variable === undefined
      ? pass(check, `${file.file} does not exist (the SDK goes without it)`)
      : warn(check, `${file.file}, named by ${file.variable}, does not exist`, `mount or write the file, or unset ${file.variable}`);
  }
  const info = await stat(file.file).catch(() => undefined);
  const exposed = file.secret && info ? exposure(info) : undefined;
  if (exposed) return warn(check, `${file.file} ${exposed}`, `chmod 600 ${file.file} (for a projected volume: defaultMode 0400 or 0600)`);
  return pass(check, `${file.file}: only root and the plugin's user can change it`);
}

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

function certificatesIn(pem: string): X509Certificate[] {
  return (pem.match(PEM_CERTIFICATE) ?? []).map((block) => new X509Certificate(block));
}

/** "valid until ...", or a warn/fail when the certificate is expired, not yet valid or near its end. */
function validity(check: string, what: string, certs: X509Certificate[], now = Date.now()): CheckResult {
  const expired = certs.find((c) => Date.parse(c.validTo) < now);
  if (expired) return fail(check, `${what}: a certificate expired on ${new Date(expired.validTo).toISOString()}`, 'replace the certificate');
  const early = certs.find((c) => Date.parse(c.validFrom) > now);
  if (early) return fail(check, `${what}: a certificate is not valid before ${new Date(early.validFrom).toISOString()}`, 'check the node clock, or the certificate');
  const first = Math.min(...certs.map((c) => Date.parse(c.validTo)));
  const until = new Date(first).toISOString();
  if (first - now < CERT_EXPIRY_WARN_MS) return warn(check, `${what}: a certificate expires on ${until}`, 'renew it before then');
  return pass(check, `${what}, valid until ${until}`);
}

/** Why a file holding a secret is open to others, or undefined. The SDKs that read these files do not check. */
function exposure(info: { mode: number; uid: number }): string | undefined {
  const mode = info.mode & 0o777;
  const ownUid = process.geteuid?.() ?? info.uid;
  if ((mode & 0o077) !== 0) return `is readable by group or others (mode ${mode.toString(8)})`;
  if (info.uid !== ownUid && info.uid !== 0) return `is owned by uid ${info.uid}, not by the plugin's user (uid ${ownUid}) or root`;
  return undefined;
}

/** The expiry of a JWT (a projected service-account token), read from its payload; never its content. */
function jwtExpiry(text: string): number | undefined {
  const parts = text.split('.');
  if (parts.length !== 3) return undefined;
  try {
    const exp = (JSON.parse(Buffer.from(parts[1]!, 'base64url').toString('utf8')) as { exp?: unknown }).exp;
    return typeof exp === 'number' && Number.isFinite(exp) ? exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}

async function checkLocalKeyFile(check: string, file: string): Promise<CheckResult> {
  try {
    const ring = await loadKeyRing(file);
    const version = ring.keys[0]!.version;
    const count = ring.keys.length;
    for (const k of ring.keys) k.key.fill(0);
    if (ring.uncheckedLines.length > 0) {
      return warn(check, `${file}: ${count} key(s), current version ${version}; lines ${ring.uncheckedLines.join(', ')} have no check value`, `trousseau keygen --add-checks ${file}`);
    }
    return pass(check, `${file}: ${count} key(s), current version ${version}, mode 600`);
  } catch (error) {
    const code = errnoOf((error as { cause?: unknown }).cause);
    if (code === 'ENOENT') {
      return fail(check, `${file} does not exist`, `restore it from its backup; only for a backend that never wrapped a key: trousseau keygen ${file}`);
    }
    const message = safeMessage(error);
    const info = await lstat(file).catch(() => undefined);
    const ownUid = process.geteuid?.() ?? 0;
    const fix = info?.isSymbolicLink()
      ? 'name the file itself in the configuration, not a link to it'
      : info && (info.mode & 0o077) !== 0
        ? `chmod 600 ${file}`
        : info && info.uid !== ownUid && info.uid !== 0
          ? `chown ${ownUid} ${file} (the plugin's user) or root`
          : code === 'EACCES'
            ? 'run doctor as the plugin\'s user (root on a control-plane node)'
            : 'write the file with `trousseau keygen`, or restore it from its backup';
    return fail(check, message, fix);
  }
}

async function checkFile(check: string, ref: ReferencedFile, certFileOf?: string): Promise<CheckResult> {
  if (ref.role === 'local key') return checkLocalKeyFile(check, ref.file);
  let info;
  try {
    info = await stat(ref.file); // links are fine here: projected tokens are links into ..data
    await access(ref.file, fsConstants.R_OK);
  } catch (error) {
    const code = errnoOf(error);
    if (code === 'ENOENT') return fail(check, `${ref.file} does not exist`, 'mount or write the file, or correct the path in the configuration');
    return fail(check, `${ref.file} cannot be read (${code ?? 'error'})`, 'run doctor as the plugin\'s user; give that user read access');
  }
  if (!info.isFile()) return fail(check, `${ref.file} is not a regular file`, 'name a file');
  // The plugin reads its credential and CA files under the trusted-path rule: the same walk here.
  const refused = await readCredentialFile(ref.file, ref.field).then(
    () => undefined,
    (error: unknown) => (isTrousseauError(error) ? error.message : undefined),
  );
  if (refused) return fail(check, refused, 'keep the file in a folder only root and the plugin\'s user can write, owned by one of them, not writable by others');
  if (info.size > MAX_SECRET_FILE_BYTES) return fail(check, `${ref.file} is larger than such a file can be (${info.size} bytes)`, 'name the right file');
  const text = await readFile(ref.file, 'utf8');
  const secret = ref.role === 'secret' || ref.role === 'client key' || ref.role === 'certificate and key';
  const exposed = secret ? exposure(info) : undefined;
  const exposedFix = `chmod 600 ${ref.file} (for a projected volume: defaultMode 0400 or 0600)`;
  switch (ref.role) {
    case 'secret': {
      const value = text.trim();
      if (!value) return fail(check, `${ref.file} is empty`, 'write the credential into it (or check the agent that writes it)');
      const exp = jwtExpiry(value);
      if (exp !== undefined && exp < Date.now()) return fail(check, `${ref.file} holds a token that expired on ${new Date(exp).toISOString()}`, 'check whatever renews the token (kubelet projection, Vault Agent)');
      if (exposed) return warn(check, `${ref.file} ${exposed}`, exposedFix);
      return pass(check, `${ref.file}: present, not empty${exp === undefined ? '' : `, token valid until ${new Date(exp).toISOString()}`}`);
    }
    case 'ca':
    case 'client certificate': {
      let certs: X509Certificate[];
      try {
        certs = certificatesIn(text);
      } catch {
        return fail(check, `${ref.file} holds a PEM certificate block that does not parse`, 'write the PEM bundle again');
      }
      if (certs.length === 0) return fail(check, `${ref.file} holds no PEM certificate`, 'name a PEM file (-----BEGIN CERTIFICATE-----)');
      return validity(check, `${ref.file}: ${certs.length} certificate(s)`, certs);
    }
    case 'client key':
    case 'certificate and key': {
      let key;
      try {
        key = createPrivateKey(text);
      } catch {
        return fail(check, `${ref.file} holds no PEM private key that parses`, 'write the PEM private key again (unencrypted: the plugin has no passphrase)');
      }
      const certText = ref.role === 'certificate and key' ? text : certFileOf ? await readFile(certFileOf, 'utf8').catch(() => '') : '';
      let certs: X509Certificate[];
      try {
        certs = certificatesIn(certText);
      } catch {
        certs = []; // the certificate file's own check reports it
      }
      if (ref.role === 'certificate and key' && certs.length === 0) return fail(check, `${ref.file} holds no PEM certificate next to the key`, 'put the certificate and its private key in the one file');
      if (certs[0] && !certs[0].checkPrivateKey(key)) return fail(check, `${ref.file}: the private key does not belong to the certificate`, 'pair the certificate with its own key');
      if (exposed) return warn(check, `${ref.file} ${exposed}`, exposedFix);
      return ref.role === 'certificate and key' ? validity(check, `${ref.file}: certificate and matching key`, certs) : pass(check, `${ref.file}: private key${certs[0] ? ' matching the certificate' : ''}`);
    }
  }
}

// ------------------------------------------------------------------ node

async function checkSocket(config: Config): Promise<CheckResult[]> {
  const socketPath = path.resolve(config.socket.path);
  const folder = path.dirname(socketPath);
  const results: CheckResult[] = [];
  const exists = await stat(folder).then(
    (s) => s.isDirectory(),
    () => false,
  );
  if (!exists) {
    results.push(warn('socket folder', `${folder} does not exist yet`, 'nothing to do if its parents are owned by root: serve creates it (mode 750); run doctor again after the first start'));
  } else {
    try {
      const real = await prepareTrustedFolder(folder, 'the socket folder');
      const info = await lstat(real);
      results.push(pass('socket folder', `${folder}: owner uid ${info.uid}, mode ${(info.mode & 0o7777).toString(8)}; only root and the plugin's user can change it`));
      const at = await lstat(path.join(real, path.basename(socketPath))).catch(() => undefined);
      if (at && !at.isSocket()) {
        results.push(fail('socket', `${socketPath} exists and is not a socket`, 'move that file away; serve never replaces it'));
      } else if (at && (await isServed(path.join(real, path.basename(socketPath))))) {
        results.push(warn('socket', `a process already serves ${socketPath}`, 'expected if the plugin runs on this node; serve refuses to start a second one on it'));
      }
    } catch (error) {
      results.push(fail('socket folder', safeMessage(error), `make ${folder} and its parents owned by root (or the plugin's user) and not writable by others: chown root ${folder} && chmod 750 ${folder}`));
    }
  }
  if (config.socket.group !== undefined) {
    try {
      const gid = await resolveGroup(config.socket.group);
      results.push(pass('socket group', `resolves to gid ${gid}`));
    } catch (error) {
      results.push(fail('socket group', safeMessage(error), 'create the group on the node or name an existing one in socket.group'));
    }
  }
  return results;
}

function splitHostPort(listen: string): { host: string; port: number } {
  const at = listen.lastIndexOf(':');
  return { host: listen.slice(0, at).replace(/^\[(.*)\]$/, '$1'), port: Number(listen.slice(at + 1)) };
}

async function checkHttpPort(config: Config, pluginServes: boolean): Promise<CheckResult> {
  const listen = config.http.listen;
  if (!listen) return pass('http port', 'http.listen is unset: no /metrics, /healthz, /readyz (nothing to bind)');
  const { host, port } = splitHostPort(listen);
  const server = net.createServer();
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host, port, exclusive: true }, resolve);
    });
    return pass('http port', `${listen} is free`);
  } catch (error) {
    const code = errnoOf(error);
    if (code === 'EADDRINUSE') {
      // After a change on a node that already runs the plugin, its own listener holds the port.
      if (pluginServes) {
        return warn('http port', `${listen} is in use, and a process serves the socket: most likely this node's running plugin`, 'nothing to do if so; otherwise stop whatever holds the port, or choose another http.listen');
      }
      return fail('http port', `${listen} is in use by another process`, 'stop it (a plugin already running on this node?), or choose another http.listen (serve --http-listen HOST:PORT)');
    }
    if (code === 'EADDRNOTAVAIL') return fail('http port', `${host} is not an address of this node`, 'use 127.0.0.1 or an address of this node in http.listen');
    if (code === 'EACCES') return fail('http port', `${listen}: binding is not permitted (EACCES)`, 'ports below 1024 need root; choose a higher port');
    return fail('http port', `${listen} cannot be bound (${code ?? 'error'})`, 'check http.listen');
  } finally {
    await new Promise((resolve) => server.close(resolve));
  }
}

// ------------------------------------------------------------------ backends over the network

interface Endpoint {
  url: URL;
  /** TLS trust and client identity as the backend uses them. */
  tls: { ca?: (string | Buffer)[] | undefined; cert?: Buffer | undefined; key?: Buffer | undefined; servername?: string | undefined };
  /** A path that answers without credentials (Date header for the clock). */
  probePath: string;
}

async function endpointOf(backend: BackendConfig, baseDir: string): Promise<Endpoint | undefined> {
  const read = (file: string | undefined) => (file === undefined ? Promise.resolve(undefined) : readFile(path.resolve(baseDir, file)).catch(() => undefined));
  switch (backend.type) {
    case 'local':
    case 'kms-plugin':
      return undefined;
    case 'vault': {
      const [ca, cert, key] = await Promise.all([read(backend.tls?.caFile), read(backend.tls?.certFile), read(backend.tls?.keyFile)]);
      // As the backend's agent: caFile replaces the system roots.
      return { url: new URL(backend.address), tls: { ca: ca ? [ca] : undefined, cert, key, servername: backend.tls?.serverName }, probePath: '/v1/sys/health' };
    }
    case 'azure': {
      const ca = await read(backend.caFile);
      // As the backend's agent: caFile extends Node's roots.
      return { url: new URL(backend.vaultUrl), tls: { ca: ca ? [...rootCertificates, ca] : undefined }, probePath: '/' };
    }
    case 'aws':
      return { url: new URL(backend.endpoint ?? `https://kms.${backend.region}.amazonaws.com`), tls: {}, probePath: '/' };
  }
}

const isIp = (host: string) => net.isIP(host.replace(/^\[(.*)\]$/, '$1')) !== 0;
const portOf = (url: URL) => Number(url.port || (url.protocol === 'https:' ? 443 : 80));

async function checkDns(check: string, url: URL): Promise<CheckResult> {
  const host = url.hostname;
  if (isIp(host)) return pass(check, `${host} is an address (nothing to resolve)`);
  try {
    const addresses = await Promise.race([
      dns.lookup(host, { all: true }),
      new Promise<never>((_, reject) => setTimeout(() => reject(Object.assign(new Error('timeout'), { code: 'ETIMEOUT' })), NETWORK_TIMEOUT_MS).unref()),
    ]);
    return pass(check, `${host} resolves to ${addresses.map((a) => a.address).join(', ')}`);
  } catch (error) {
    const code = errnoOf(error) ?? 'error';
    return fail(check, `${host} does not resolve (${code})`, 'check the host name in the configuration, and the node\'s DNS (/etc/resolv.conf, a private zone, a proxy)');
  }
}

/** Why a certificate is refused, in the operator's words, with the fix. */
function tlsRefusal(code: string, caConfigured: boolean): { detail: string; fix: string } {
  const caFix = caConfigured ? 'the configured CA file does not hold the CA that signed the server certificate: use that CA' : 'set the backend\'s CA file (vault: tls.caFile; azure: caFile) to the CA that signed the server certificate';
  switch (code) {
    case 'DEPTH_ZERO_SELF_SIGNED_CERT':
    case 'SELF_SIGNED_CERT_IN_CHAIN':
    case 'UNABLE_TO_VERIFY_LEAF_SIGNATURE':
    case 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY':
    case 'UNABLE_TO_GET_ISSUER_CERT':
      return { detail: `the server certificate is not trusted (${code})`, fix: caFix };
    case 'CERT_HAS_EXPIRED':
      return { detail: 'the server certificate has expired (CERT_HAS_EXPIRED)', fix: 'renew the server certificate, or check the node clock' };
    case 'CERT_NOT_YET_VALID':
      return { detail: 'the server certificate is not valid yet (CERT_NOT_YET_VALID)', fix: 'check the node clock' };
    case 'ERR_TLS_CERT_ALTNAME_INVALID':
      return { detail: 'the server certificate does not name this host (ERR_TLS_CERT_ALTNAME_INVALID)', fix: 'use the name the certificate was issued for (vault: tls.serverName)' };
    default:
      return { detail: `the server certificate is refused (${code})`, fix: caFix };
  }
}

async function checkTls(check: string, endpoint: Endpoint): Promise<CheckResult> {
  const { url } = endpoint;
  if (url.protocol !== 'https:') {
    const loopback = ['localhost', '127.0.0.1', '[::1]', '::1'].includes(url.hostname);
    return loopback
      ? pass(check, 'plain HTTP to this node (no TLS to check)')
      : warn(check, `plain HTTP to ${url.hostname}: tokens and wrapped keys cross the network unencrypted`, 'use an https:// address');
  }
  const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
  const servername = endpoint.tls.servername ?? (isIp(host) ? undefined : host);
  return new Promise((resolve) => {
    const socket = tls.connect({
      host,
      port: portOf(url),
      ...(servername ? { servername } : {}),
      ...(endpoint.tls.ca ? { ca: endpoint.tls.ca } : {}),
      ...(endpoint.tls.cert ? { cert: endpoint.tls.cert } : {}),
      ...(endpoint.tls.key ? { key: endpoint.tls.key } : {}),
      // Checked below, so the reason can be told apart: this socket sends nothing.
      rejectUnauthorized: false,
      ...(endpoint.tls.servername ? { checkServerIdentity: (_: string, cert: tls.PeerCertificate) => tls.checkServerIdentity(endpoint.tls.servername!, cert) } : {}),
    });
    const timer = setTimeout(() => finish(fail(check, `no TLS handshake with ${url.host} within ${NETWORK_TIMEOUT_MS / 1000} s`, 'check the address, the port, a firewall or proxy on the way')), NETWORK_TIMEOUT_MS);
    const finish = (result: CheckResult) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(result);
    };
    socket.once('secureConnect', () => {
      if (!socket.authorized) {
        const { detail, fix } = tlsRefusal(String(socket.authorizationError), endpoint.tls.ca !== undefined);
        finish(fail(check, `${url.host}: ${detail}`, fix));
        return;
      }
      const peer = socket.getPeerCertificate();
      const until = peer.valid_to ? new Date(peer.valid_to).toISOString() : 'unknown';
      const remaining = peer.valid_to ? Date.parse(peer.valid_to) - Date.now() : Infinity;
      const detail = `${url.host}: ${socket.getProtocol() ?? 'TLS'}, certificate chain trusted, valid until ${until}`;
      finish(remaining < CERT_EXPIRY_WARN_MS ? warn(check, detail, 'renew the server certificate before it expires') : pass(check, detail));
    });
    socket.once('error', (error) => {
      const code = errnoOf(error) ?? 'error';
      finish(fail(check, `no TLS handshake with ${url.host} (${code})`, code === 'ECONNREFUSED' ? 'nothing listens there: check the address and port, and that the server runs' : 'check the address, the port, the client certificate (mutual TLS), a firewall or proxy'));
    });
  });
}

/** One unauthenticated GET: the server's Date header against our clock, halfway through the exchange. */
async function checkClock(check: string, endpoint: Endpoint, maxSkewMs: number): Promise<CheckResult> {
  const url = new URL(endpoint.probePath, endpoint.url);
  const sentAt = Date.now();
  let date: string | undefined;
  try {
    date = await new Promise<string | undefined>((resolve, reject) => {
      const options = {
        method: 'GET',
        timeout: NETWORK_TIMEOUT_MS,
        ...(endpoint.tls.ca ? { ca: endpoint.tls.ca } : {}),
        ...(endpoint.tls.cert ? { cert: endpoint.tls.cert } : {}),
        ...(endpoint.tls.key ? { key: endpoint.tls.key } : {}),
        ...(endpoint.tls.servername ? { servername: endpoint.tls.servername } : {}),
      };
      const request = (url.protocol === 'https:' ? https : http).request(url, options, (response) => {
        response.resume();
        resolve(response.headers.date);
      });
      request.once('timeout', () => request.destroy(Object.assign(new Error('timeout'), { code: 'ETIMEDOUT' })));
      request.once('error', reject);
      request.end();
    });
  } catch (error) {
    return fail(check, `no HTTP answer from ${url.host} (${errnoOf(error) ?? 'error'})`, 'check the address, the port, a firewall or proxy');
  }
  const receivedAt = Date.now();
  const server = date === undefined ? NaN : Date.parse(date);
  if (!Number.isFinite(server)) return warn(check, `${url.host} sends no usable Date header: the clock cannot be compared`, 'check the node clock by other means (chronyc tracking, timedatectl)');
  // Date has a resolution of one second; the answer was made somewhere during the exchange.
  const skew = server - (sentAt + receivedAt) / 2;
  const seconds = Math.round(Math.abs(skew) / 1000);
  const direction = skew > 0 ? 'behind' : 'ahead of';
  const detail = `this node's clock is ${seconds} s ${direction} ${url.host}`;
  if (Math.abs(skew) > maxSkewMs) return fail(check, detail, 'synchronise the node clock (chrony or systemd-timesyncd): signed requests and tokens are refused this far off');
  if (Math.abs(skew) > WARN_SKEW_MS) return warn(check, detail, 'synchronise the node clock (chrony or systemd-timesyncd)');
  return pass(check, `${detail} (within ${WARN_SKEW_MS / 1000} s)`);
}

/** The backend itself, built as the plugin builds it, asked for its key version: proves the credentials, wraps nothing. */
async function checkCredentials(check: string, backend: BackendConfig, baseDir: string, live: boolean): Promise<CheckResult[]> {
  const definition = definitionFor(backend.type)!;
  let instance;
  try {
    instance = await definition.create(backend, { logger: silentLogger(), baseDir });
  } catch (error) {
    return [fail(check, `the backend cannot be set up: ${safeMessage(error)}`, 'correct its configuration block')];
  }
  const results: CheckResult[] = [];
  try {
    let version: string;
    try {
      version = await instance.currentKeyVersion(AbortSignal.timeout(CREDENTIAL_TIMEOUT_MS));
    } catch (error) {
      return [fail(check, safeMessage(error), credentialFix(backend))];
    }
    const expires = instance.credentialExpiresAt?.();
    const expiry = expires === undefined ? '' : `; the credential expires at ${new Date(expires).toISOString()}`;
    results.push(backend.type === 'local' ? pass(check, `key loaded, version ${version}`) : pass(check, `credentials accepted, the key is readable; current key version ${version}${expiry}`));
    if (live) results.push(await wrapAndUnwrap(`${backend.name} live`, instance, backend.timeoutMs));
    return results;
  } finally {
    await instance.close().catch(() => undefined);
  }
}

function credentialFix(backend: BackendConfig): string {
  switch (backend.type) {
    case 'local':
      return 'fix the key file (see its file check)';
    case 'vault':
      return `check the ${backend.auth.method} credentials and that the policy allows read on ${backend.transitMount}/keys/${backend.keyName}`;
    case 'aws':
      return 'check the credentials the AWS SDK finds on this node (IRSA, instance profile, environment) and kms:DescribeKey on the key';
    case 'azure':
      return `check the ${backend.credential.method} credential and the get permission on key ${backend.keyName}`;
    case 'kms-plugin':
      return `check that the inner plugin runs, listens on ${backend.socket} and answers Status with healthz "ok"`;
    case 'pkcs11':
      return `check that the token is present, the PIN file, and that key ${backend.key.label} passes policies/pkcs11/`;
  }
}

async function wrapAndUnwrap(check: string, backend: KeyBackend, timeoutMs: number): Promise<CheckResult> {
  const dataKey = randomBytes(32);
  const context = { envelopeId: randomBytes(16), backendName: backend.name };
  const started = Date.now();
  let unwrapped: Uint8Array | undefined;
  try {
    // The plugin's own per-call timeout, so a slow backend shows here as it would in serve.
    const wrapped = await backend.wrap(dataKey, context, AbortSignal.timeout(timeoutMs));
    const wrapMs = Date.now() - started;
    const unwrapStarted = Date.now();
    unwrapped = await backend.unwrap(wrapped.wrapped, wrapped.keyVersion, context, AbortSignal.timeout(timeoutMs));
    const same = unwrapped.length === dataKey.length && timingSafeEqual(unwrapped, dataKey);
    if (!same) return fail(check, 'unwrap returned a different key than was wrapped', 'report this: the backend is broken');
    return pass(check, `wrap ${wrapMs} ms, unwrap ${Date.now() - unwrapStarted} ms (timeout ${timeoutMs} ms), key version ${wrapped.keyVersion}`);
  } catch (error) {
    const timedOut = isTrousseauError(error) ? false : (error as Error | null)?.name === 'TimeoutError';
    return timedOut
      ? fail(check, `no answer within the backend's timeout (${timeoutMs} ms)`, 'raise timeoutMs (below 3000) or bring the backend closer')
      : fail(check, safeMessage(error), 'see the credentials check; the policy must allow encrypt and decrypt');
  } finally {
    dataKey.fill(0);
    unwrapped?.fill(0);
  }
}

async function checkBackend(backend: BackendConfig, baseDir: string, options: DoctorOptions): Promise<CheckResult[]> {
  const name = backend.name;
  const results: CheckResult[] = [];
  const files = referencedFiles(backend, baseDir);
  const certFile = files.find((f) => f.role === 'client certificate')?.file;
  for (const ref of files) results.push(await checkFile(`${name} ${ref.field}`, ref, certFile));
  for (const file of sdkFilesToCheck(backend, baseDir)) results.push(await checkSdkFile(`${name} ${file.variable ?? file.role}`, `${backend.type} backend ${name}`, file));
  const filesOk = !results.some((r) => r.status === 'fail');
  const endpoint = await endpointOf(backend, baseDir);
  if (endpoint) {
    const dnsResult = await checkDns(`${name} dns`, endpoint.url);
    results.push(dnsResult);
    if (dnsResult.status === 'fail') {
      for (const what of ['tls', 'clock', 'credentials']) results.push(skip(`${name} ${what}`, 'not checked: the host does not resolve'));
      return results;
    }
    const tlsResult = await checkTls(`${name} tls`, endpoint);
    results.push(tlsResult);
    if (tlsResult.status === 'fail') {
      for (const what of ['clock', 'credentials']) results.push(skip(`${name} ${what}`, 'not checked: no trusted TLS connection'));
      return results;
    }
    results.push(await checkClock(`${name} clock`, endpoint, options.maxSkewMs ?? MAX_SKEW_MS));
  }
  if (!filesOk) {
    results.push(skip(`${name} credentials`, 'not checked: a file it needs failed its check'));
    return results;
  }
  results.push(...(await checkCredentials(`${name} credentials`, backend, baseDir, options.live === true)));
  return results;
}

/** The file checks alone, for `validate`: every file the configuration names exists, is readable, safe and parses. */
export async function checkReferencedFiles(config: Config, baseDir: string): Promise<CheckResult[]> {
  const perBackend = await Promise.all(
    config.backends.map(async (backend) => {
      const files = referencedFiles(backend, baseDir);
      const certFile = files.find((f) => f.role === 'client certificate')?.file;
      return Promise.all(files.map((ref) => checkFile(`${backend.name} ${ref.field}`, ref, certFile)));
    }),
  );
  return perBackend.flat();
}

export async function runDoctor(options: DoctorOptions): Promise<DoctorReport> {
  let loaded;
  try {
    loaded = await loadConfigFile(options.config);
  } catch (error) {
    // The loader's messages name fields and what they expect, never values.
    // One line per check: the loader's list of issues is joined.
    const detail = safeMessage(error).replace(/:\n\s*/, ': ').replace(/\n\s*/g, '; ');
    const checks = [fail('config', detail, 'correct the configuration (trousseau schema prints what each field takes)')];
    return { ok: false, checks };
  }
  const { config, baseDir } = loaded;
  const plural = (n: number, word: string) => `${n} ${word}${n === 1 ? '' : 's'}`;
  const checks: CheckResult[] = [pass('config', `${options.config}: valid, ${plural(config.backends.length, 'backend')}, quorum ${config.quorum}`)];
  const socketChecks = await checkSocket(config);
  checks.push(...socketChecks);
  checks.push(await checkHttpPort(config, socketChecks.some((c) => c.check === 'socket' && c.status === 'warn')));
  const perBackend = await Promise.all(config.backends.map((b) => checkBackend(b, baseDir, options)));
  checks.push(...perBackend.flat());
  return { ok: !checks.some((c) => c.status === 'fail'), checks };
}

export function renderDoctorReport(report: DoctorReport): string {
  const width = Math.max(...report.checks.map((c) => c.check.length));
  const lines = report.checks.map((c) => `${c.status.toUpperCase().padEnd(4)}  ${c.check.padEnd(width)}  ${c.detail}${c.fix ? `  -> fix: ${c.fix}` : ''}`);
  const count = (s: CheckStatus) => report.checks.filter((c) => c.status === s).length;
  lines.push('', `${report.ok ? 'ok' : 'NOT OK'}: ${count('pass')} passed, ${count('warn')} warnings, ${count('fail')} failed, ${count('skip')} skipped`);
  return lines.join('\n');
}
