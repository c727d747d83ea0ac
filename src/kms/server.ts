/**
 * The gRPC server: KMS v2, KMS v1beta1 and the admin API on one unix socket.
 */
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import type { Metrics } from '../observability/metrics.ts';
import { admissionGate } from './admission-gate.ts';
import { receiveGuard } from './call-limits.ts';
import { LoopLag } from './loop-lag.ts';
import type { KmsCore } from './core.ts';
import { AdminService, V1Service, V2Service } from './proto.ts';
import { adminHandlers, v1Handlers, v2Handlers, type HandlerContext } from './services.ts';
import {
  bindPrivately,
  prepareSocketPath,
  removeOwnSocket,
  removeOwnSocketSync,
  resolveGroup,
  socketReplacedReason,
  type SocketIdentity,
  type SocketSettings,
} from './socket.ts';

/** Largest request accepted: the biggest envelope plus annotations, with room to spare. */
const MAX_MESSAGE_BYTES = 256 * 1024;

/** Connection limits a configuration may change (the `connections` block). */
export interface ConnectionLimits {
  /** Calls open at once on one connection (HTTP/2 MAX_CONCURRENT_STREAMS). */
  maxConcurrentStreams: number;
  /** A connection with no call open for this long is closed (the client reconnects when it needs to). */
  idleTimeoutMs: number;
  /** How long a refused Encrypt or Decrypt holds its stream before the refusal is answered (admission-gate.ts). */
  refusalHoldMs?: number;
}

/**
 * 256 streams per connection (docs/design/overload.md):
 * - above what admission control lets wait (32 in flight + 192 queued by default): the
 *   apiserver sends a burst over its one connection, and a call beyond the stream
 *   bound waits in the client, on its deadline clock, where the plugin can neither
 *   serve nor refuse it; above admission's bound the plugin sees the excess and
 *   refuses it at once ("overloaded");
 * - not above the receive guard's 256 (RECEIVE_LIMITS): one connection alone never
 *   trips it, so a burst is refused by admission control after each request arrived
 *   in full, which closes the stream at once. (At 1024, refusals of requests still
 *   arriving left streams half-open; grpc-go reused their slots before the server
 *   had closed them and nghttp2 ended the whole connection, GOAWAY PROTOCOL_ERROR.)
 * Memory stays bounded by the receive guard and the session memory cap below.
 */
export const DEFAULT_CONNECTION_LIMITS: ConnectionLimits = { maxConcurrentStreams: 256, idleTimeoutMs: 300_000 };

/**
 * Fixed limits, each well clear of what the apiserver does (one long-lived connection,
 * unary calls of a few KiB with a 3 s deadline, a Status call at least every minute):
 * - a request has 2 s to arrive in full, and at most 256 may be arriving at once
 *   (256 x 256 KiB = 64 MiB at worst), see call-limits.ts;
 * - keepalive pings after 60 s without traffic, answered within 20 s, find a peer
 *   that hangs without closing its socket;
 * - a connection lives at most about an hour (grpc-js adds +/-10 % jitter), then gets
 *   a GOAWAY and 30 s for its calls to finish: any client reconnects transparently;
 * - Node's HTTP/2 session memory per connection is capped at 64 MiB (past it Node
 *   refuses new streams on that connection): whatever the stream bound, one
 *   connection's buffered requests and unread responses stay under it;
 * - the streams Node's HTTP/2 layer refuses by itself never end the connection
 *   (MAX_SESSION_REJECTED_STREAMS below).
 */
const RECEIVE_LIMITS = { receiveTimeoutMs: 2000, maxReceiving: 256 };
const KEEPALIVE_TIME_MS = 60_000;
const KEEPALIVE_TIMEOUT_MS = 20_000;
const MAX_CONNECTION_AGE_MS = 3_600_000;
const MAX_CONNECTION_AGE_GRACE_MS = 30_000;
const MAX_SESSION_MEMORY_MB = 64;

/**
 * Node's HTTP/2 layer refuses a new stream by itself (RST_STREAM ENHANCE_YOUR_CALM)
 * when its own table of the connection's streams is full. Under a burst the client
 * sits at the stream bound and opens a stream the moment the server closes one, and
 * Node's table drops a closed stream only a turn of the event loop after nghttp2 and
 * the client count it closed: each such race is a refused stream (none to hundreds in
 * a 5,000-call burst, depending on the machine), and since the client answers a
 * refusal with the next stream at once, they come in runs on a busy loop. After more
 * than 100 in a row (Node's default, against CVE-2019-9514's stream floods; the count
 * restarts whenever a stream is accepted) Node ends the connection with GOAWAY
 * INTERNAL_ERROR, failing every call on it: the apiserver's one connection. The peer
 * here is the apiserver behind a 0600 socket, a refusal costs Node no JavaScript, and
 * the stream bound (enforced exactly by nghttp2), the receive guard and the session
 * memory cap still bound what a connection holds, so the limit is lifted out of reach
 * (test/reliability/rejected-streams.test.ts provokes 120 refusals in a row).
 */
const MAX_SESSION_REJECTED_STREAMS = 2 ** 31 - 1;
/** How often the socket path is checked to still be our socket. */
const SOCKET_CHECK_MS = 1000;

export class KmsServer {
  private readonly server: grpc.Server;
  private readonly context: HandlerContext;
  private readonly socket: SocketSettings;
  private readonly logger: Logger;
  private identity: SocketIdentity | undefined;
  private watcher: NodeJS.Timeout | undefined;
  private replacedReported = false;
  private readonly loopLag = new LoopLag();

  constructor(core: KmsCore, socket: SocketSettings, metrics: Metrics, logger: Logger, limits: ConnectionLimits = DEFAULT_CONNECTION_LIMITS) {
    this.socket = socket;
    this.logger = logger;
    this.server = new grpc.Server({
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
      // Channelz (gRPC's introspection service) is never exposed here, but grpc-js still
      // tracks every call for it when enabled: off, the gRPC layer costs 2-18 % less
      // CPU per call (four alternating runs, docs/performance.md).
      'grpc.enable_channelz': 0,
      // Every option below is one grpc-js 1.14 reads in its Server constructor.
      'grpc.max_concurrent_streams': limits.maxConcurrentStreams,
      'grpc.max_connection_idle_ms': limits.idleTimeoutMs,
      'grpc.keepalive_time_ms': KEEPALIVE_TIME_MS,
      'grpc.keepalive_timeout_ms': KEEPALIVE_TIMEOUT_MS,
      'grpc.max_connection_age_ms': MAX_CONNECTION_AGE_MS,
      'grpc.max_connection_age_grace_ms': MAX_CONNECTION_AGE_GRACE_MS,
      'grpc-node.max_session_memory': MAX_SESSION_MEMORY_MB,
      // The receive guard must stay first: it resets the stream of the innermost call.
      // grpc-js runs the last interceptor first: admission control decides before the
      // guard or anything else spends a thing on a call it refuses.
      interceptors: [receiveGuard(RECEIVE_LIMITS, metrics, logger), ...(core.admission ? [admissionGate(core.admission, metrics, logger, limits.refusalHoldMs, this.loopLag)] : [])],
    });
    allowRejectedStreams(this.server, logger);
    this.context = { core, metrics, logger, inFlight: new Set() };
    this.server.addService(V2Service.service, v2Handlers(this.context));
    this.server.addService(V1Service.service, v1Handlers(this.context));
    this.server.addService(AdminService.service, adminHandlers(this.context));
  }

  async start(): Promise<void> {
    // Everything that may read a file or wait happens before the bind: nothing runs
    // between bind and lchown but the lchown.
    const gid = this.socket.group === undefined ? undefined : await resolveGroup(this.socket.group);
    const realPath = await prepareSocketPath(this.socket.path);
    try {
      const { identity } = await bindPrivately(
        this.socket,
        realPath,
        gid,
        (bindPath) =>
          new Promise<number>((resolve, reject) => {
            this.server.bindAsync(`unix:${bindPath}`, grpc.ServerCredentials.createInsecure(), (error, port) =>
              error ? reject(error) : resolve(port),
            );
          }),
      );
      this.identity = identity;
    } catch (error) {
      // Nothing to unlink: bindPrivately removed its private name, and the real path was never ours.
      this.server.forceShutdown();
      throw error;
    }
    this.watcher = setInterval(() => this.socketProblem(), SOCKET_CHECK_MS);
    this.watcher.unref();
    this.logger.info({ socket: this.socket.path, mode: this.socket.mode.toString(8) }, 'serving KMS v2 and v1beta1');
  }

  /**
   * Why the socket path no longer leads to this server (short, no path: /readyz shows
   * it), or undefined while it does. Checked every second and on every readiness
   * question; the first time it fails, an error is logged.
   */
  socketProblem(): string | undefined {
    if (!this.identity) return undefined;
    const reason = socketReplacedReason(this.identity);
    if (reason && !this.replacedReported) {
      this.replacedReported = true;
      this.logger.error({ socket: this.socket.path }, `${reason}: clients dialling it no longer reach this plugin; not ready`);
    }
    return reason;
  }

  /** Remove our socket at once, synchronously: for a process that must exit now. */
  removeSocketNow(): void {
    if (this.identity) removeOwnSocketSync(this.identity);
  }

  /**
   * Stop accepting calls, let in-flight calls finish for at most `drainMs`, then cut
   * the rest and remove the socket. We wait on our own in-flight count rather than on
   * grpc-js's tryShutdown callback, which never fires while an idle client (the
   * apiserver) keeps its connection open.
   */
  async stop(drainMs: number): Promise<void> {
    let closed = false;
    const graceful = new Promise<void>((resolve) =>
      this.server.tryShutdown(() => {
        closed = true;
        resolve();
      }),
    );
    // The timers below stay referenced: they are what keeps the process alive while draining.
    const pause = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
    const deadline = Date.now() + drainMs;
    while (!closed && Date.now() < deadline) {
      if (this.context.inFlight.size === 0) {
        // Every call has been answered; give the responses a moment to flush, then stop
        // waiting for idle clients to hang up.
        await Promise.race([graceful, pause(100)]);
        break;
      }
      await Promise.race([graceful, Promise.allSettled([...this.context.inFlight]), pause(50)]);
    }
    if (this.context.inFlight.size > 0) this.logger.warn({ inFlight: this.context.inFlight.size }, 'drain timed out; cancelling remaining calls');
    if (!closed) this.server.forceShutdown();
    if (this.watcher) clearInterval(this.watcher);
    this.loopLag.close();
    if (this.identity && !(await removeOwnSocket(this.identity))) {
      this.logger.warn({ socket: this.socket.path }, 'the socket path is no longer our socket; left it in place');
    }
    this.identity = undefined;
  }

  get inFlight(): number {
    return this.context.inFlight.size;
  }
}

/**
 * grpc-js passes no option for Node's `maxSessionRejectedStreams` (see
 * MAX_SESSION_REJECTED_STREAMS), but builds each HTTP/2 server at bind time from the
 * options object it keeps; the option is added there. Should a grpc-js release no
 * longer keep it, the plugin still runs with Node's default, and says so
 * (test/k8s/burst_test.go, TestS10_BurstsKeepTheConnection, fails then too).
 */
function allowRejectedStreams(server: grpc.Server, logger: Logger): void {
  const options = (server as unknown as { commonServerOptions?: Record<string, unknown> }).commonServerOptions;
  if (typeof options !== 'object' || options === null) {
    logger.error('grpc-js keeps no HTTP/2 server options: a connection will be ended after 100 streams refused by Node\'s HTTP/2 layer');
    return;
  }
  options.maxSessionRejectedStreams = MAX_SESSION_REJECTED_STREAMS;
}
