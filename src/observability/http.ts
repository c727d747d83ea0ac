/**
 * /metrics, /healthz and /readyz on a loopback address by default.
 *
 * /healthz says the process is alive and never depends on a backend: a liveness
 * probe wired to a KMS round trip turns a KMS outage into a restart loop (the Go
 * Trousseau did that). /readyz is 200 while the plugin can serve (quorum usable) and
 * 503 otherwise, with short reasons only: any local user can reach this port, so
 * key identifiers, versions and error classes stay behind the 0600 admin socket
 * (`trousseau status`).
 */
import { readFileSync } from 'node:fs';
import type http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import type { Metrics } from './metrics.ts';

/**
 * Connection limits of the HTTP listener. It is reachable by every local user (and,
 * with hostNetwork, by the node's network), so it is the first thing to refuse: a
 * flood of it must never take descriptors or time from the KMS socket or from
 * backend calls. Probes and a scraper need a handful of connections.
 */
export interface HttpLimits {
  /** Most connections open at once; also held to 1/16 of the process's descriptor limit. */
  maxConnections: number;
}

export const DEFAULT_HTTP_LIMITS: HttpLimits = { maxConnections: 32 };

/** Share of RLIMIT_NOFILE the HTTP listener may ever hold: the rest is for the socket and backends. */
const FD_SHARE = 16;
/** Whole request (headers and body) and headers alone must arrive within this. */
const REQUEST_TIMEOUT_MS = 5000;
/** A kept-alive connection with no request is closed after this. */
const KEEP_ALIVE_TIMEOUT_MS = 5000;
/** A connection on which nothing moves at all is destroyed after this. */
const SOCKET_IDLE_MS = 10_000;
/** How often Node checks the header and request timeouts (its default, 30 s, lets a slow client hold on 6x longer). */
const TIMEOUT_CHECK_MS = 1000;
const LOG_EVERY_MS = 10_000;
/**
 * The CommonJS module, not an ESM import: importing node:http from ESM builds its
 * namespace, which reads the lazy WebSocket/CloseEvent/MessageEvent getters and so
 * loads Node's bundled undici (about 13 MiB of RSS the plugin never uses).
 */
const { createServer } = process.getBuiltinModule('node:http');

/** The soft RLIMIT_NOFILE of this process, from /proc (Linux), or undefined. */
export function openFileLimit(): number | undefined {
  try {
    const line = readFileSync('/proc/self/limits', 'utf8')
      .split('\n')
      .find((l) => l.startsWith('Max open files'));
    const soft = line?.split(/\s{2,}/)[1];
    return soft !== undefined && /^\d+$/.test(soft) ? Number(soft) : undefined;
  } catch {
    return undefined;
  }
}

/** The HTTP connection cap: the configured one, held far below the descriptor limit. */
export function httpConnectionCap(configured: number, fdLimit = openFileLimit()): number {
  return fdLimit === undefined ? configured : Math.max(1, Math.min(configured, Math.floor(fdLimit / FD_SHARE)));
}

export interface ReadinessSource {
  readiness(): { ready: boolean; reasons: string[] };
}

export class ObservabilityServer {
  private readonly server: http.Server;
  private readonly logger: Logger;

  constructor(metrics: Metrics, readiness: ReadinessSource, logger: Logger, limits: HttpLimits = DEFAULT_HTTP_LIMITS) {
    this.logger = logger;
    const options: http.ServerOptions = {
      connectionsCheckingInterval: TIMEOUT_CHECK_MS,
      headersTimeout: REQUEST_TIMEOUT_MS,
      requestTimeout: REQUEST_TIMEOUT_MS,
      keepAliveTimeout: KEEP_ALIVE_TIMEOUT_MS,
      maxHeaderSize: 8192,
    };
    this.server = createServer(options, (request, response) => {
      const url = (request.url ?? '/').split('?')[0];
      if (request.method !== 'GET' && request.method !== 'HEAD') {
        response.writeHead(405).end();
        return;
      }
      if (url === '/healthz' || url === '/livez') {
        response.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
      } else if (url === '/readyz') {
        const { ready, reasons } = readiness.readiness();
        response.writeHead(ready ? 200 : 503, { 'content-type': 'application/json' }).end(`${JSON.stringify({ ready, reasons })}\n`);
      } else if (url === '/metrics') {
        metrics.registry.metrics().then(
          (text) => response.writeHead(200, { 'content-type': metrics.registry.contentType }).end(text),
          () => response.writeHead(500).end(),
        );
      } else {
        response.writeHead(404).end();
      }
    });
    // Beyond the cap Node accepts and at once closes a connection ('drop'): it never
    // holds a descriptor for longer than that, whatever the flood.
    this.server.maxConnections = httpConnectionCap(limits.maxConnections);
    this.server.setTimeout(SOCKET_IDLE_MS, (socket) => socket.destroy());
    let dropped = 0;
    let lastLogged = 0;
    this.server.on('drop', () => {
      dropped += 1;
      const now = Date.now();
      if (now - lastLogged < LOG_EVERY_MS) return;
      this.logger.warn({ dropped, maxConnections: this.server.maxConnections }, 'HTTP connections refused: at the connection cap');
      lastLogged = now;
      dropped = 0;
    });
  }

  /** The connection cap in force. */
  get maxConnections(): number {
    return this.server.maxConnections;
  }

  async listen(address: string): Promise<AddressInfo> {
    const index = address.lastIndexOf(':');
    const host = address.slice(0, index).replace(/^\[|\]$/g, '');
    const port = Number(address.slice(index + 1));
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
    const bound = this.server.address() as AddressInfo;
    this.logger.info({ address: `${bound.address}:${bound.port}`, maxConnections: this.server.maxConnections }, 'serving /metrics, /healthz, /readyz');
    return bound;
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
