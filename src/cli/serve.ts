/**
 * `trousseau serve`: start the plugin, the gRPC server and the HTTP endpoints, and
 * shut them down in order on SIGTERM/SIGINT: stop accepting, drain in-flight calls
 * within a bound, stop probes and breakers, remove the socket.
 */
import type { Config } from '../config/schema.ts';
import { KmsServer } from '../kms/server.ts';
import { ObservabilityServer } from '../observability/http.ts';
import { createLogger, type Logger } from '../observability/logger.ts';
import { Metrics } from '../observability/metrics.ts';
import { Plugin } from '../plugin.ts';

export interface RunningPlugin {
  plugin: Plugin;
  kms: KmsServer;
  http: ObservabilityServer | undefined;
  httpAddress: string | undefined;
  stop(): Promise<void>;
}

export async function startPlugin(config: Config, baseDir: string, logger: Logger = createLogger(config.log.level)): Promise<RunningPlugin> {
  const metrics = new Metrics({ processMetrics: true });
  const plugin = new Plugin({ config, baseDir, logger, metrics });
  const kms = new KmsServer(plugin, { path: config.socket.path, mode: config.socket.mode, group: config.socket.group }, metrics, logger);
  let http: ObservabilityServer | undefined;
  let httpAddress: string | undefined;
  try {
    await plugin.start();
    await kms.start();
    if (config.http.listen) {
      http = new ObservabilityServer(metrics, plugin, logger);
      const bound = await http.listen(config.http.listen);
      httpAddress = `${bound.address}:${bound.port}`;
    }
  } catch (error) {
    await plugin.close();
    throw error;
  }
  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      logger.info({ inFlight: kms.inFlight }, 'shutting down');
      await kms.stop(config.shutdown.drainTimeoutMs);
      await http?.close();
      await plugin.close();
      logger.info('stopped');
    })());
  return { plugin, kms, http, httpAddress, stop };
}

/** Serve until a signal arrives; the process exits with 0 after a clean shutdown. */
export async function serveUntilSignalled(config: Config, baseDir: string, logger: Logger): Promise<void> {
  // Last-resort handlers: log the error class and message (ours are safe; a stack of
  // our own code holds no secret) rather than let Node print a crash dump of objects.
  process.on('unhandledRejection', (reason) => {
    logger.error({ error: reason instanceof Error ? reason.name : typeof reason }, 'unhandled rejection (bug); continuing');
  });
  // Signals are caught from the start: one that arrives while the plugin is still
  // starting (the socket may already exist) must still lead to a clean shutdown that
  // removes the socket, not to Node's default immediate exit.
  let signalled: NodeJS.Signals | undefined;
  let wake: () => void = () => undefined;
  const onSignal = (signal: NodeJS.Signals) => {
    logger.info({ signal }, 'signal received');
    signalled = signal;
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
    wake();
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);

  const running = await startPlugin(config, baseDir, logger);
  process.once('uncaughtException', (error) => {
    logger.fatal({ error: error.name, message: error.message }, 'uncaught exception (bug); shutting down');
    void running.stop().finally(() => process.exit(1));
  });
  if (!signalled) await new Promise<void>((resolve) => (wake = resolve));
  try {
    await running.stop();
  } catch (error) {
    logger.error({ err: error }, 'shutdown failed');
  }
}
