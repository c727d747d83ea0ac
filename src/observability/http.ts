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
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import type { Metrics } from './metrics.ts';

export interface ReadinessSource {
  readiness(): { ready: boolean; reasons: string[] };
}

export class ObservabilityServer {
  private readonly server: http.Server;
  private readonly logger: Logger;

  constructor(metrics: Metrics, readiness: ReadinessSource, logger: Logger) {
    this.logger = logger;
    this.server = http.createServer((request, response) => {
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
    this.server.keepAliveTimeout = 5000;
    this.server.headersTimeout = 10000;
    this.server.requestTimeout = 10000;
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
    this.logger.info({ address: `${bound.address}:${bound.port}` }, 'serving /metrics, /healthz, /readyz');
    return bound;
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
