/**
 * `trousseau serve`: start the plugin, the gRPC server and the HTTP endpoints, and
 * shut them down in order on SIGTERM/SIGINT: stop accepting, drain in-flight calls
 * within a bound, stop probes and breakers, remove the socket.
 *
 * Start-up fails closed: if any part cannot start (the HTTP port is taken, the socket
 * folder is refused, ...) everything already started is stopped, the socket removed,
 * and the process exits non-zero with the reason. A plugin that serves the socket
 * without its probes would look healthy to nobody and be restarted by nobody.
 */
import * as grpc from '@grpc/grpc-js';
import type { Config } from '../config/schema.ts';
import { buildInfo } from '../build-info.ts';
import { compileCacheOutcome } from '../config/compile-cache.js';
import { TrousseauError } from '../errors.ts';
import { KmsServer } from '../kms/server.ts';
import { ObservabilityServer } from '../observability/http.ts';
import { ScrapeListener } from '../observability/scrape-listener.ts';
import { createLogger, grpcLogSink, type Logger } from '../observability/logger.ts';
import { Metrics } from '../observability/metrics.ts';
import { Plugin } from '../plugin.ts';

export interface RunningPlugin {
  plugin: Plugin;
  kms: KmsServer;
  http: ObservabilityServer | undefined;
  httpAddress: string | undefined;
  /** host:port of the TLS scrape listener (`http.scrape`), when configured. */
  scrapeAddress: string | undefined;
  /** Re-read the scrape listener's certificate, key and token now (it also does every 30 s). */
  reloadScrapeListener(): Promise<void>;
  stop(): Promise<void>;
}

/** Start-up was abandoned because a signal asked the plugin to stop. */
class StartAbandoned extends Error {}

/** `promise`, or a rejection as soon as `signal` aborts (the promise itself runs on; it is cleaned up after). */
function unlessAborted<T>(promise: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return promise;
  if (signal.aborted) return Promise.reject(new StartAbandoned());
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(new StartAbandoned());
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}

/**
 * Start everything, or nothing: on any failure (or when `abort` fires first) what was
 * started is stopped and the socket removed before the error is thrown. `onServer`
 * receives the gRPC server as soon as it exists, so a caller can remove its socket in
 * an emergency.
 */
export async function startPlugin(
  config: Config,
  baseDir: string,
  logger: Logger = createLogger(config.log.level),
  abort?: AbortSignal,
  onServer: (kms: KmsServer) => void = () => undefined,
): Promise<RunningPlugin> {
  const metrics = new Metrics({ processMetrics: true });
  const plugin = await Plugin.create({ config, baseDir, logger, metrics });
  const kms = new KmsServer(plugin, { path: config.socket.path, mode: config.socket.mode, group: config.socket.group }, metrics, logger, {
    maxConcurrentStreams: config.connections.maxConcurrentStreams,
    idleTimeoutMs: config.connections.idleTimeoutMs,
    refusalHoldMs: config.connections.refusalHoldMs,
  });
  onServer(kms);
  // Not ready while the socket path leads somewhere else (moved aside, replaced).
  plugin.addReadinessCheck(() => kms.socketProblem());
  let http: ObservabilityServer | undefined;
  let httpAddress: string | undefined;
  let scrape: ScrapeListener | undefined;
  let scrapeAddress: string | undefined;
  const checkAbort = () => {
    if (abort?.aborted) throw new StartAbandoned();
  };
  try {
    // Only the probes can take long (up to a backend's timeout): the start gives up on
    // them at once. Binding and listening take milliseconds and are awaited, so that
    // the clean-up below always knows what exists.
    await unlessAborted(plugin.start(), abort);
    await kms.start();
    checkAbort();
    if (config.http.listen) {
      http = new ObservabilityServer(metrics, plugin, logger, { maxConnections: config.connections.httpMaxConnections });
      const bound = await http.listen(config.http.listen).catch((error: NodeJS.ErrnoException) => {
        throw new TrousseauError('CONFIG', `cannot listen for HTTP on ${config.http.listen}: ${error.code ?? error.message}`, { cause: error });
      });
      httpAddress = `${bound.address}:${bound.port}`;
      checkAbort();
    }
    if (config.http.scrape) {
      const listener = new ScrapeListener(config.http.scrape, baseDir, metrics, logger, { maxConnections: config.connections.httpMaxConnections });
      scrape = listener;
      const bound = await listener.listen().catch((error: NodeJS.ErrnoException) => {
        if (error instanceof TrousseauError) throw error;
        throw new TrousseauError('CONFIG', `cannot listen for the scrape listener on ${config.http.scrape?.listen}: ${error.code ?? error.message}`, { cause: error });
      });
      scrapeAddress = `${bound.address}:${bound.port}`;
      checkAbort();
    }
  } catch (error) {
    // Undo in reverse order; each step is safe on a part that never started.
    await kms.stop(0).catch(() => undefined);
    await http?.close().catch(() => undefined);
    await scrape?.close().catch(() => undefined);
    await plugin.close();
    throw error;
  }
  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      logger.info({ inFlight: kms.inFlight }, 'shutting down');
      await kms.stop(config.shutdown.drainTimeoutMs);
      await http?.close();
      await scrape?.close();
      await plugin.close();
      logger.info('stopped');
    })());
  return { plugin, kms, http, httpAddress, scrapeAddress, reloadScrapeListener: async () => scrape?.reload(), stop };
}

/** Time past the drain deadline that closing the HTTP listener and the backends may take. */
const CLOSE_GRACE_MS = 1000;

/**
 * Serve until a signal arrives. Resolves with the exit code: 0 after a clean shutdown
 * (also when the signal came during start-up), 1 when start-up failed. Whatever
 * happens, the process is out within the drain deadline (plus a second) of the
 * first signal: past it, the socket is removed and the process exits.
 */
export async function serveUntilSignalled(config: Config, baseDir: string, logger: Logger, configSource = 'unknown'): Promise<number> {
  // The first line: which build, which configuration, which socket.
  logger.info({ ...buildInfo(), config: configSource, socket: config.socket.path }, 'starting trousseau');
  // bin/trousseau.js decided before anything was loaded (src/config/compile-cache.js).
  const cache = compileCacheOutcome();
  if (cache?.used) logger.info({ compileCache: cache.folder }, 'compile cache in use');
  else if (cache) logger.warn({ compileCache: cache.folder }, `compile cache not used: ${cache.reason}`);
  // grpc-js writes its own lines (GRPC_VERBOSITY, GRPC_TRACE) to stderr as plain text;
  // through the plugin's logger they are lines of the same format as every other.
  grpc.setLogger(grpcLogSink(logger));
  // Last-resort handlers: log the error class and message (ours are safe; a stack of
  // our own code holds no secret) rather than let Node print a crash dump of objects.
  process.on('unhandledRejection', (reason) => {
    logger.error({ error: reason instanceof Error ? reason.name : typeof reason }, 'unhandled rejection (bug); continuing');
  });
  let kms: KmsServer | undefined;
  const exitNow = (code: number, why: string) => {
    logger.error({ code }, why);
    kms?.removeSocketNow();
    process.exit(code);
  };
  // Signals are caught from the very start: one that arrives while the plugin is
  // starting abandons the start (what was started is stopped, the socket removed);
  // one that arrives while serving starts the drain. Either way a watchdog ends the
  // process if shutting down takes longer than the drain deadline; a second signal
  // ends it at once.
  const stopRequested = new AbortController();
  const onSignal = (signal: NodeJS.Signals) => {
    if (stopRequested.signal.aborted) {
      exitNow(1, `second ${signal}: exiting now`);
      return;
    }
    logger.info({ signal }, 'signal received');
    setTimeout(() => exitNow(1, 'shutdown did not finish within the drain deadline; exiting'), config.shutdown.drainTimeoutMs + CLOSE_GRACE_MS).unref();
    stopRequested.abort();
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);

  let running: RunningPlugin;
  try {
    running = await startPlugin(config, baseDir, logger, stopRequested.signal, (server) => (kms = server));
  } catch (error) {
    if (error instanceof StartAbandoned) {
      logger.info('stopped during start-up');
      return 0;
    }
    const message = error instanceof TrousseauError || error instanceof Error ? error.message : String(error);
    logger.fatal({ code: error instanceof TrousseauError ? error.code : undefined }, `start-up failed, nothing left running: ${message}`);
    return 1;
  }
  process.once('uncaughtException', (error) => {
    logger.fatal({ error: error.name, message: error.message }, 'uncaught exception (bug); shutting down');
    void running.stop().finally(() => process.exit(1));
  });
  if (!stopRequested.signal.aborted) await new Promise((resolve) => stopRequested.signal.addEventListener('abort', resolve, { once: true }));
  try {
    await running.stop();
    return 0;
  } catch (error) {
    logger.error({ err: error }, 'shutdown failed');
    return 1;
  }
}
