/**
 * The scrape listener (`http.scrape`): /metrics only, over TLS, for a caller that
 * presents the bearer token from `bearerTokenFile`. It is how Prometheus reaches the
 * plugin from off the node while `http.listen` (probes, /readyz) stays on loopback.
 *
 * Why in the plugin and not a kube-rbac-proxy sidecar (docs/operations/monitoring.md):
 * such a proxy asks the Kubernetes API (TokenReview, SubjectAccessReview) about every
 * scrape, and the Kubernetes API is what this plugin keeps alive: when the apiserver
 * cannot start because of the plugin, the proxy cannot authenticate anyone and the
 * metrics that explain the outage are unreachable. A static token file and a
 * certificate on the node work for the static pod and the DaemonSet alike and depend
 * on nothing but the node.
 *
 * What anyone else gets: 401 for every path (nothing about health, nothing about which
 * paths exist), within the same connection and time limits as the loopback listener.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { open } from 'node:fs/promises';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import type { Logger } from 'pino';
import { TrousseauError } from '../errors.ts';
import { httpConnectionCap, type HttpLimits } from './http.ts';
import type { Metrics } from './metrics.ts';

export interface ScrapeListenerConfig {
  listen: string;
  certFile: string;
  keyFile: string;
  bearerTokenFile: string;
}

/** Open for reading without following a link, without blocking on a FIFO. */
const READ_FLAGS = fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK | fsConstants.O_NOCTTY;
/** A certificate chain, a key or a token file is far smaller than this. */
const MAX_FILE_BYTES = 256 * 1024;
/** Shorter tokens are guessable by a scraper that tries. */
const MIN_TOKEN_CHARS = 16;
/** How often the files are looked at again, so that a rotated certificate or token is taken without a restart. */
const RELOAD_EVERY_MS = 30_000;
const REQUEST_TIMEOUT_MS = 5000;
const KEEP_ALIVE_TIMEOUT_MS = 5000;
const SOCKET_IDLE_MS = 10_000;
/** A TLS handshake that has not finished by then gives its slot back. */
const HANDSHAKE_TIMEOUT_MS = 5000;
const LOG_EVERY_MS = 10_000;

type FileField = 'certFile' | 'keyFile' | 'bearerTokenFile';

/**
 * Read one of the listener's files. The private key and the token must be regular
 * files owned by the plugin's user or root that group and others cannot read (like a
 * key file): whoever can read the token can read the metrics, whoever can write it
 * can lock Prometheus out. Errors name the field, not the path or the content.
 */
async function readListenerFile(field: FileField, file: string, secret: boolean): Promise<{ text: string; identity: string }> {
  const where = `http.scrape.${field}`;
  let handle;
  try {
    handle = await open(file, READ_FLAGS);
  } catch (error) {
    throw new TrousseauError('CONFIG', `${where} cannot be opened (${(error as NodeJS.ErrnoException).code ?? 'error'})`, { cause: error });
  }
  try {
    const info = await handle.stat();
    if (!info.isFile()) throw new TrousseauError('CONFIG', `${where} is not a regular file`);
    if (info.size > MAX_FILE_BYTES) throw new TrousseauError('CONFIG', `${where} is larger than such a file can be`);
    if (secret) {
      const euid = process.geteuid?.() ?? info.uid;
      if (info.uid !== euid && info.uid !== 0) throw new TrousseauError('CONFIG', `${where} is owned by uid ${info.uid}, not by the plugin's user (uid ${euid}) or root`);
      const mode = info.mode & 0o777;
      if ((mode & 0o077) !== 0) throw new TrousseauError('CONFIG', `${where} is readable by group or others (mode ${mode.toString(8)}); chmod 600 it`);
    }
    const text = await handle.readFile('utf8');
    return { text, identity: `${info.dev}:${info.ino}:${info.mtimeMs}:${info.size}` };
  } finally {
    await handle.close();
  }
}

interface LoadedFiles {
  cert: string;
  key: string;
  /** SHA-256 of the token: compared in constant time, whatever the length presented. */
  tokenDigest: Buffer;
  identity: string;
}

async function loadFiles(config: ScrapeListenerConfig): Promise<LoadedFiles> {
  const cert = await readListenerFile('certFile', config.certFile, false);
  const key = await readListenerFile('keyFile', config.keyFile, true);
  const token = await readListenerFile('bearerTokenFile', config.bearerTokenFile, true);
  const value = token.text.trim();
  if (value.length < MIN_TOKEN_CHARS || /\s/.test(value)) {
    throw new TrousseauError('CONFIG', `http.scrape.bearerTokenFile must hold one token of at least ${MIN_TOKEN_CHARS} characters without spaces`);
  }
  return {
    cert: cert.text,
    key: key.text,
    tokenDigest: createHash('sha256').update(value).digest(),
    identity: [cert.identity, key.identity, token.identity].join('|'),
  };
}

const digest = (value: string) => createHash('sha256').update(value).digest();

export class ScrapeListener {
  private server: https.Server | undefined;
  private files: LoadedFiles | undefined;
  private reloadTimer: NodeJS.Timeout | undefined;
  private readonly config: ScrapeListenerConfig;
  private readonly metrics: Metrics;
  private readonly logger: Logger;
  private readonly limits: HttpLimits;

  /** Paths in `config` are resolved against `baseDir` (the configuration file's folder). */
  constructor(config: ScrapeListenerConfig, baseDir: string, metrics: Metrics, logger: Logger, limits: HttpLimits) {
    this.config = {
      listen: config.listen,
      certFile: path.resolve(baseDir, config.certFile),
      keyFile: path.resolve(baseDir, config.keyFile),
      bearerTokenFile: path.resolve(baseDir, config.bearerTokenFile),
    };
    this.metrics = metrics;
    this.logger = logger;
    this.limits = limits;
  }

  private authorised(header: string | undefined): boolean {
    const files = this.files;
    if (!files || header === undefined) return false;
    const match = /^Bearer[ ]+(\S+)\s*$/i.exec(header);
    return match !== null && timingSafeEqual(digest(match[1]!), files.tokenDigest);
  }

  async listen(): Promise<AddressInfo> {
    this.files = await loadFiles(this.config);
    const server = https.createServer({
      cert: this.files.cert,
      key: this.files.key,
      minVersion: 'TLSv1.2',
      handshakeTimeout: HANDSHAKE_TIMEOUT_MS,
      connectionsCheckingInterval: 1000,
      headersTimeout: REQUEST_TIMEOUT_MS,
      requestTimeout: REQUEST_TIMEOUT_MS,
      keepAliveTimeout: KEEP_ALIVE_TIMEOUT_MS,
      maxHeaderSize: 8192,
    });
    this.server = server;
    let refused = 0;
    let lastLogged = 0;
    server.on('request', (request, response) => {
      if (!this.authorised(request.headers.authorization)) {
        refused += 1;
        const now = Date.now();
        if (now - lastLogged >= LOG_EVERY_MS) {
          // The count only: never the header, which may be someone's real token for something else.
          this.logger.warn({ refused }, 'scrape listener: requests without the bearer token refused');
          lastLogged = now;
          refused = 0;
        }
        response.writeHead(401, { 'www-authenticate': 'Bearer' }).end();
        return;
      }
      const url = (request.url ?? '/').split('?')[0];
      if (request.method !== 'GET' && request.method !== 'HEAD') {
        response.writeHead(405).end();
      } else if (url === '/metrics') {
        this.metrics.registry.metrics().then(
          (text) => response.writeHead(200, { 'content-type': this.metrics.registry.contentType }).end(text),
          () => response.writeHead(500).end(),
        );
      } else {
        response.writeHead(404).end();
      }
    });
    // The same caps as the loopback listener (docs/security.md, "The HTTP port").
    server.maxConnections = httpConnectionCap(this.limits.maxConnections);
    server.setTimeout(SOCKET_IDLE_MS, (socket) => socket.destroy());
    server.on('tlsClientError', (_error, socket) => socket.destroy());
    const index = this.config.listen.lastIndexOf(':');
    const host = this.config.listen.slice(0, index).replace(/^\[|\]$/g, '');
    const port = Number(this.config.listen.slice(index + 1));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    this.reloadTimer = setInterval(() => void this.reload(), RELOAD_EVERY_MS).unref();
    const bound = server.address() as AddressInfo;
    this.logger.info({ address: `${bound.address}:${bound.port}`, maxConnections: server.maxConnections }, 'serving /metrics over TLS to bearer-token holders');
    return bound;
  }

  /** Take a rotated certificate, key or token; on a bad file keep what is loaded and say so. */
  async reload(): Promise<void> {
    if (!this.server) return;
    try {
      const files = await loadFiles(this.config);
      if (files.identity === this.files?.identity) return;
      this.server.setSecureContext({ cert: files.cert, key: files.key });
      this.files = files;
      this.logger.info('scrape listener: certificate, key or token reloaded');
    } catch (error) {
      this.logger.warn({ err: error instanceof TrousseauError ? error.message : 'cannot load' }, 'scrape listener: kept the files loaded before');
    }
  }

  async close(): Promise<void> {
    clearInterval(this.reloadTimer);
    const server = this.server;
    if (!server) return;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}
