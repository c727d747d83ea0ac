/**
 * A TCP fault proxy on 127.0.0.1 in front of a real backend server (test code only).
 *
 * The plugin is configured with the proxy's address instead of the server's, so
 * production code needs no test branch. The fault is switched at run time by calling
 * a method; it applies to connections already open too, because every SDK keeps
 * connections alive and a fault that only hit new connections would hit nothing.
 *
 * Faults:
 * - pass: forward both ways;
 * - blackhole: accept, read and drop everything, never answer, keep the socket;
 * - refuse: stop listening (ECONNREFUSED), or accept and reset at once;
 * - reset mid-request / mid-response: forward the first bytes, then reset;
 * - latency with jitter, and a heavy tail (a fraction of requests delayed by seconds);
 * - hold: keep every byte from clients until the mode changes, then forward it all
 *   (a test holds a backend call in flight for exactly as long as it needs);
 * - HTTP status (5xx, 429): parse just enough of each request (headers, then
 *   Content-Length or chunked body) to answer it with a canned response. Only for
 *   plain-HTTP upstreams: behind TLS (lowkey-vault, for azure) the proxy sees ciphertext,
 *   so a TLS proxy allows TCP-level faults only and refuses httpStatus().
 */
import net from 'node:net';

export type FaultMode =
  | { kind: 'pass' }
  | { kind: 'blackhole' }
  | { kind: 'refuse'; how: 'close' | 'reset' }
  | { kind: 'reset'; when: 'request' | 'response'; afterBytes: number }
  | { kind: 'latency'; baseMs: number; jitterMs: number; tailFraction: number; tailMs: number }
  | { kind: 'http'; status: number; retryAfterS: number | undefined }
  | { kind: 'hold' };

export interface FaultProxyOptions {
  /** Name used in logs and tables. */
  label: string;
  upstreamHost: string;
  upstreamPort: number;
  /** True when the upstream speaks TLS: HTTP answers are then impossible. */
  tls?: boolean;
  /** Fixed listening port; default an ephemeral one, kept for the proxy's life. */
  port?: number;
}

export interface FaultProxyStats {
  connections: number;
  refused: number;
  resets: number;
  httpAnswers: number;
  dropped: number;
}

/** Modes that only delay bytes: a switch between them keeps open connections intact. */
function bytesIntact(mode: FaultMode): boolean {
  return mode.kind === 'pass' || mode.kind === 'latency' || mode.kind === 'hold';
}

const HEADER_LIMIT = 64 * 1024;

class Link {
  readonly client: net.Socket;
  upstream: net.Socket | undefined;
  private readonly proxy: FaultProxy;
  private readonly pendingUp: Buffer[] = [];
  /** Bytes from the client kept while the proxy holds. */
  private readonly heldUp: Buffer[] = [];
  private upstreamReady = false;
  private readonly nextSendAt = { up: 0, down: 0 };
  private readonly timers = new Set<NodeJS.Timeout>();
  private httpBuffer = Buffer.alloc(0);
  private resetOnResponse = false;
  closed = false;

  constructor(proxy: FaultProxy, client: net.Socket) {
    this.proxy = proxy;
    this.client = client;
    client.setNoDelay(true);
    client.on('data', (chunk: Buffer) => this.fromClient(chunk));
    client.on('error', () => this.destroy(false));
    client.on('close', () => this.destroy(false));
    client.on('end', () => this.upstream?.end());
  }

  private connectUpstream(): void {
    if (this.upstream) return;
    const upstream = net.connect({ host: this.proxy.upstreamHost, port: this.proxy.upstreamPort });
    this.upstream = upstream;
    upstream.setNoDelay(true);
    upstream.on('connect', () => {
      this.upstreamReady = true;
      for (const chunk of this.pendingUp.splice(0)) upstream.write(chunk);
    });
    upstream.on('data', (chunk: Buffer) => this.fromUpstream(chunk));
    upstream.on('error', () => this.destroy(true));
    upstream.on('close', () => this.destroy(false));
    upstream.on('end', () => this.client.end());
  }

  private writeUp(chunk: Buffer): void {
    if (this.closed) return;
    this.connectUpstream();
    if (this.upstreamReady) this.upstream!.write(chunk);
    else this.pendingUp.push(chunk);
  }

  private writeDown(chunk: Buffer): void {
    if (!this.closed) this.client.write(chunk);
  }

  /** Send in order, each chunk no earlier than `delayMs` from now. */
  private delayed(direction: 'up' | 'down', delayMs: number, chunk: Buffer): void {
    const now = Date.now();
    const at = Math.max(this.nextSendAt[direction], now + delayMs);
    this.nextSendAt[direction] = at;
    if (at <= now) {
      if (direction === 'up') this.writeUp(chunk);
      else this.writeDown(chunk);
      return;
    }
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      if (direction === 'up') this.writeUp(chunk);
      else this.writeDown(chunk);
    }, at - now);
    this.timers.add(timer);
  }

  private fromClient(chunk: Buffer): void {
    const mode = this.proxy.mode;
    switch (mode.kind) {
      case 'pass':
        return this.delayed('up', 0, chunk);
      case 'latency': {
        let delay = mode.baseMs + Math.random() * mode.jitterMs;
        if (mode.tailFraction > 0 && Math.random() < mode.tailFraction) delay += mode.tailMs;
        return this.delayed('up', delay, chunk);
      }
      case 'blackhole':
        this.proxy.stats.dropped += chunk.length;
        return;
      case 'refuse':
        return this.reset();
      case 'reset':
        if (mode.when === 'request') {
          this.writeUp(chunk.subarray(0, Math.min(mode.afterBytes, chunk.length)));
          // Let the partial request leave before cutting both sides.
          setImmediate(() => this.reset());
          return;
        }
        this.resetOnResponse = true;
        return this.writeUp(chunk);
      case 'http':
        return this.answerHttp(chunk, mode);
      case 'hold':
        this.heldUp.push(chunk);
        this.proxy.noteHeld();
        return;
    }
  }

  /** Chunks a latency fault scheduled that have not been sent yet. */
  get delayedChunks(): number {
    return this.timers.size;
  }

  /** Forward what was held, in order (the hold has ended). */
  releaseHeld(): void {
    for (const chunk of this.heldUp.splice(0)) this.delayed('up', 0, chunk);
  }

  private fromUpstream(chunk: Buffer): void {
    const mode = this.proxy.mode;
    if (mode.kind === 'blackhole') {
      this.proxy.stats.dropped += chunk.length;
      return;
    }
    if (this.resetOnResponse || (mode.kind === 'reset' && mode.when === 'response')) {
      const after = mode.kind === 'reset' ? mode.afterBytes : 16;
      this.writeDown(chunk.subarray(0, Math.min(after, chunk.length)));
      setImmediate(() => this.reset());
      return;
    }
    if (mode.kind === 'latency') return this.delayed('down', mode.baseMs + Math.random() * mode.jitterMs, chunk);
    this.delayed('down', 0, chunk);
  }

  /** Consume whole HTTP requests from the stream and answer each with the canned status. */
  private answerHttp(chunk: Buffer, mode: Extract<FaultMode, { kind: 'http' }>): void {
    this.httpBuffer = Buffer.concat([this.httpBuffer, chunk]);
    for (;;) {
      const end = this.httpBuffer.indexOf('\r\n\r\n');
      if (end < 0) {
        if (this.httpBuffer.length > HEADER_LIMIT) this.reset();
        return;
      }
      const head = this.httpBuffer.subarray(0, end).toString('latin1');
      let bodyEnd = end + 4;
      const length = /\r\ncontent-length:\s*(\d+)/i.exec(head);
      if (length) {
        bodyEnd += Number(length[1]);
        if (this.httpBuffer.length < bodyEnd) return;
      } else if (/\r\ntransfer-encoding:\s*chunked/i.test(head)) {
        const last = this.httpBuffer.indexOf('\r\n0\r\n\r\n', end);
        const first = this.httpBuffer.subarray(end + 4, end + 9).toString('latin1') === '0\r\n\r\n' ? end + 4 : -1;
        if (first >= 0) bodyEnd = first + 5;
        else if (last >= 0) bodyEnd = last + 7;
        else return;
      }
      this.httpBuffer = this.httpBuffer.subarray(bodyEnd);
      this.proxy.stats.httpAnswers++;
      this.writeDown(cannedResponse(mode.status, mode.retryAfterS));
    }
  }

  reset(): void {
    if (this.closed) return;
    this.proxy.stats.resets++;
    this.client.resetAndDestroy();
    this.destroy(false);
  }

  destroy(resetClient: boolean): void {
    if (this.closed) return;
    this.closed = true;
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
    if (resetClient) this.client.resetAndDestroy();
    else this.client.destroy();
    this.upstream?.destroy();
    this.proxy.forget(this);
  }
}

function reasonPhrase(status: number): string {
  return ({ 429: 'Too Many Requests', 500: 'Internal Server Error', 502: 'Bad Gateway', 503: 'Service Unavailable', 504: 'Gateway Timeout' } as Record<number, string>)[status] ?? 'Error';
}

/**
 * One body for every HTTP backend: `__type` is what the AWS SDK reads (JSON 1.1
 * protocol), `errors` what Vault clients read; neither names a real key or token.
 */
function cannedResponse(status: number, retryAfterS: number | undefined): Buffer {
  const type = status === 429 ? 'ThrottlingException' : 'KMSInternalException';
  const body = JSON.stringify({ __type: type, message: `chaos proxy answered ${status}`, errors: [`chaos proxy answered ${status}`] });
  const headers = [
    `HTTP/1.1 ${status} ${reasonPhrase(status)}`,
    'Content-Type: application/x-amz-json-1.1',
    `Content-Length: ${Buffer.byteLength(body)}`,
    'Connection: keep-alive',
    ...(retryAfterS === undefined ? [] : [`Retry-After: ${retryAfterS}`]),
  ];
  return Buffer.from(`${headers.join('\r\n')}\r\n\r\n${body}`);
}

export class FaultProxy {
  readonly label: string;
  readonly upstreamHost: string;
  readonly upstreamPort: number;
  readonly tls: boolean;
  readonly stats: FaultProxyStats = { connections: 0, refused: 0, resets: 0, httpAnswers: 0, dropped: 0 };
  private current: FaultMode = { kind: 'pass' };
  private server: net.Server | undefined;
  private boundPort = 0;
  private readonly links = new Set<Link>();
  private closed = false;
  private holdWaiters: (() => void)[] = [];

  private constructor(options: FaultProxyOptions) {
    this.label = options.label;
    this.upstreamHost = options.upstreamHost;
    this.upstreamPort = options.upstreamPort;
    this.tls = options.tls ?? false;
    this.boundPort = options.port ?? 0;
  }

  /** Start a proxy in front of `upstream` (a URL or host:port). */
  static async start(label: string, upstream: string, options: { tls?: boolean; port?: number } = {}): Promise<FaultProxy> {
    const url = new URL(upstream.includes('://') ? upstream : `tcp://${upstream}`);
    const port = Number(url.port || (url.protocol === 'https:' ? 443 : 80));
    const proxy = new FaultProxy({ label, upstreamHost: url.hostname === 'localhost' ? '127.0.0.1' : url.hostname, upstreamPort: port, tls: options.tls ?? url.protocol === 'https:', port: options.port });
    await proxy.listen();
    return proxy;
  }

  get port(): number {
    return this.boundPort;
  }

  get mode(): FaultMode {
    return this.current;
  }

  /** Short text for tables: "blackhole", "http 503", "latency 600±50ms". */
  describe(): string {
    const m = this.current;
    switch (m.kind) {
      case 'refuse':
        return `refuse(${m.how})`;
      case 'reset':
        return `reset-${m.when}`;
      case 'latency':
        return m.tailFraction > 0 ? `tail ${Math.round(m.tailFraction * 100)}%/${m.tailMs}ms` : `latency ${m.baseMs}±${m.jitterMs}ms`;
      case 'http':
        return `http ${m.status}`;
      default:
        return m.kind;
    }
  }

  pass(): Promise<void> {
    return this.set({ kind: 'pass' });
  }
  blackhole(): Promise<void> {
    return this.set({ kind: 'blackhole' });
  }
  /** `close`: nothing listens (ECONNREFUSED); `reset`: accept then reset at once. */
  refuse(how: 'close' | 'reset' = 'close'): Promise<void> {
    return this.set({ kind: 'refuse', how });
  }
  resetMidRequest(afterBytes = 16): Promise<void> {
    return this.set({ kind: 'reset', when: 'request', afterBytes });
  }
  resetMidResponse(afterBytes = 16): Promise<void> {
    return this.set({ kind: 'reset', when: 'response', afterBytes });
  }
  latency(baseMs: number, jitterMs = 0): Promise<void> {
    return this.set({ kind: 'latency', baseMs, jitterMs, tailFraction: 0, tailMs: 0 });
  }
  /** `fraction` of requests delayed by `tailMs` more (e.g. 0.01 and 2000). */
  heavyTail(fraction: number, tailMs: number, baseMs = 0, jitterMs = 0): Promise<void> {
    return this.set({ kind: 'latency', baseMs, jitterMs, tailFraction: fraction, tailMs });
  }
  /** Keep client bytes until the next mode; `whenHolding()` tells when some arrived. */
  hold(): Promise<void> {
    return this.set({ kind: 'hold' });
  }
  /** Resolves once a client has sent bytes that the proxy now holds. */
  whenHolding(): Promise<void> {
    return new Promise((resolve) => this.holdWaiters.push(resolve));
  }
  noteHeld(): void {
    for (const wake of this.holdWaiters.splice(0)) wake();
  }
  httpStatus(status: number, retryAfterS?: number): Promise<void> {
    if (this.tls) throw new Error(`proxy ${this.label} fronts a TLS server: HTTP answers are impossible, use TCP-level faults`);
    if (status < 400 || status > 599) throw new Error('httpStatus takes a 4xx or 5xx status');
    return this.set({ kind: 'http', status, retryAfterS });
  }

  async set(next: FaultMode): Promise<void> {
    if (this.closed) throw new Error(`proxy ${this.label} is closed`);
    const previous = this.current;
    this.current = next;
    // Keep open connections only when no byte was or will be lost on them: a blackhole
    // keeps them too (their requests must hang, not fail fast). Anything else starts clean.
    const keep = bytesIntact(previous) && (bytesIntact(next) || next.kind === 'blackhole');
    if (!keep) for (const link of [...this.links]) link.destroy(true);
    else if (previous.kind === 'hold' && next.kind !== 'hold') for (const link of this.links) link.releaseHeld();
    if (next.kind === 'refuse' && next.how === 'close') await this.unlisten();
    else await this.listen();
  }

  /**
   * Resolves once no request or response a latency fault delayed is still on its
   * way (a heavy tail's 2 s request outlives the switch back to `pass`, and its
   * outcome, a timeout at the plugin, lands whenever it lands). Rejects after
   * `timeoutMs`.
   */
  async drained(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while ([...this.links].some((link) => link.delayedChunks > 0)) {
      if (Date.now() > deadline) throw new Error(`proxy ${this.label}: delayed chunks still pending after ${timeoutMs} ms`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  forget(link: Link): void {
    this.links.delete(link);
  }

  private async listen(): Promise<void> {
    if (this.server || this.closed) return;
    const server = net.createServer((socket) => {
      this.stats.connections++;
      if (this.current.kind === 'refuse') {
        this.stats.refused++;
        socket.on('error', () => undefined);
        socket.resetAndDestroy();
        return;
      }
      this.links.add(new Link(this, socket));
    });
    server.on('error', () => undefined);
    // The port may be briefly taken right after a close; retry for a moment.
    for (let attempt = 0; ; attempt++) {
      try {
        await new Promise<void>((resolve, reject) => {
          server.once('error', reject);
          server.listen({ host: '127.0.0.1', port: this.boundPort, exclusive: true }, () => {
            server.removeListener('error', reject);
            resolve();
          });
        });
        break;
      } catch (error) {
        if (attempt >= 50) throw error;
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    }
    this.boundPort = (server.address() as net.AddressInfo).port;
    this.server = server;
  }

  private async unlisten(): Promise<void> {
    const server = this.server;
    if (!server) return;
    this.server = undefined;
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    for (const link of [...this.links]) link.destroy(false);
    await this.unlisten();
    this.closed = true;
  }
}
