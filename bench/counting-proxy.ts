/**
 * An HTTP proxy on 127.0.0.1 that counts the requests a KMS plugin sends to its
 * backend server (bench code only). The peers bench points a plugin at it for a
 * short check phase, to see how many backend requests each Encrypt and Decrypt
 * costs: a plugin that cached unwrapped keys would make fewer than one per Decrypt,
 * and its throughput would not be comparable.
 *
 * Requests are counted under a label (`labelOf`: the AWS X-Amz-Target operation, the
 * Vault path...). Plain HTTP only, one keep-alive agent towards the server.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';

export class CountingProxy {
  readonly counts = new Map<string, number>();
  private readonly server: http.Server;
  private readonly agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
  private readonly upstream: URL;
  private readonly labelOf: (request: http.IncomingMessage) => string;

  private constructor(upstream: string, labelOf: (request: http.IncomingMessage) => string) {
    this.upstream = new URL(upstream);
    this.labelOf = labelOf;
    this.server = http.createServer((request, response) => this.forward(request, response));
    this.server.keepAliveTimeout = 60_000;
  }

  static async start(upstream: string, labelOf: (request: http.IncomingMessage) => string): Promise<CountingProxy> {
    const proxy = new CountingProxy(upstream, labelOf);
    await new Promise<void>((resolve) => proxy.server.listen(0, '127.0.0.1', resolve));
    return proxy;
  }

  get url(): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  /** Counts so far, and a fresh start. */
  take(): Record<string, number> {
    const snapshot = Object.fromEntries(this.counts);
    this.counts.clear();
    return snapshot;
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(resolve));
    this.agent.destroy();
  }

  private forward(request: http.IncomingMessage, response: http.ServerResponse): void {
    const label = this.labelOf(request);
    this.counts.set(label, (this.counts.get(label) ?? 0) + 1);
    const chunks: Buffer[] = [];
    request.on('data', (chunk: Buffer) => chunks.push(chunk));
    request.on('end', () => {
      const body = Buffer.concat(chunks);
      // A Vault transit batch request carries several data keys: count them as well,
      // so that batching does not look like a cache ("<label> keys").
      const keys = batchItems(body);
      if (keys !== undefined) this.counts.set(`${label} keys`, (this.counts.get(`${label} keys`) ?? 0) + keys);
      const outgoing = http.request(
        {
          host: this.upstream.hostname,
          port: this.upstream.port,
          method: request.method,
          path: request.url,
          headers: { ...request.headers, host: this.upstream.host },
          agent: this.agent,
        },
        (answer) => {
          response.writeHead(answer.statusCode ?? 502, answer.headers);
          answer.pipe(response);
        },
      );
      outgoing.on('error', () => {
        if (!response.headersSent) response.writeHead(502);
        response.end();
      });
      outgoing.end(body);
    });
  }
}

/** The number of `batch_input` items of a JSON request body, if it has that field. */
function batchItems(body: Buffer): number | undefined {
  if (body.length === 0 || body[0] !== 0x7b) return undefined;
  try {
    const items = (JSON.parse(body.toString('utf8')) as { batch_input?: unknown }).batch_input;
    return Array.isArray(items) ? items.length : undefined;
  } catch {
    return undefined;
  }
}

/** AWS JSON protocol: the operation is named by X-Amz-Target ("TrentService.Decrypt"). */
export const awsOperation = (request: http.IncomingMessage): string =>
  String(request.headers['x-amz-target'] ?? 'other').replace(/^TrentService\./, '');

/** Vault HTTP API: the path without the key name ("transit/decrypt", "auth/approle/login"). */
export const vaultOperation = (request: http.IncomingMessage): string => {
  const path = (request.url ?? '').split('?')[0]!.replace(/^\/v1\//, '');
  const transit = /^transit\/(encrypt|decrypt|keys|datakey|rewrap)\b/.exec(path);
  return transit ? `transit/${transit[1]}` : path;
};
