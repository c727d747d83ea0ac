/**
 * Logs (pino) to stderr: JSON lines by default, or text in klog's layout for people
 * reading `crictl logs` next to the other control-plane components
 * (`--log-format text`). Nothing secret is ever passed to the logger; the redaction
 * list is a second line of defence for field names that would be secret if someone
 * logged them by mistake. The text form is made from the JSON line after redaction,
 * so it shows nothing the JSON would not.
 */
import { format } from 'node:util';
import { pino, type DestinationStream, type Logger, type LevelWithSilent } from 'pino';

export type { Logger };

export const LOG_FORMATS = ['json', 'text'] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

export function createLogger(level: LevelWithSilent = 'info', destination: NodeJS.WritableStream = process.stderr, logFormat: LogFormat = 'json'): Logger {
  return pino(
    {
      level,
      base: { service: 'trousseau' },
      timestamp: pino.stdTimeFunctions.isoTime,
      redact: {
        paths: ['plaintext', 'ciphertext', 'token', 'secret', 'dataKey', 'key', 'password', '*.plaintext', '*.token', '*.secret', '*.dataKey'],
        censor: '[redacted]',
      },
      formatters: { level: (label) => ({ level: label }) },
    },
    logFormat === 'text' ? klogStream(destination) : destination,
  );
}

export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}

/**
 * klog's verbosity (`-v N`, as kube-apiserver takes it) as a level: 0-3 info (what
 * the components log at their default -v=2), 4-5 debug, 6 and above trace.
 */
export function levelForVerbosity(verbosity: number): LevelWithSilent {
  if (verbosity >= 6) return 'trace';
  if (verbosity >= 4) return 'debug';
  return 'info';
}

const KLOG_SEVERITY: Record<string, string> = { trace: 'I', debug: 'I', info: 'I', warn: 'W', error: 'E', fatal: 'F' };
/** Fields every line has; the text layout shows them in its header instead. */
const HEADER_FIELDS = new Set(['level', 'time', 'msg', 'service', 'pid', 'hostname']);

const two = (n: number) => String(n).padStart(2, '0');

/**
 * One pino JSON line in klog's text layout (structured form, as `klog.InfoS` writes):
 *   I1201 22:18:17.123000    4242 trousseau] "backend probe failed" backend="vault-a" code="BACKEND_UNAVAILABLE"
 * Severity letter, month and day, UTC time to the microsecond, process id, source,
 * the quoted message, then key="value" pairs. debug and trace lines get the letter I,
 * with level= after the message so they can still be told apart.
 */
export function klogLine(json: string, pid = process.pid): string {
  let entry: Record<string, unknown>;
  try {
    entry = JSON.parse(json) as Record<string, unknown>;
  } catch {
    return json.endsWith('\n') ? json : `${json}\n`;
  }
  const level = typeof entry.level === 'string' ? entry.level : 'info';
  const time = new Date(typeof entry.time === 'string' || typeof entry.time === 'number' ? entry.time : Date.now());
  const stamp = `${two(time.getUTCMonth() + 1)}${two(time.getUTCDate())} ${two(time.getUTCHours())}:${two(time.getUTCMinutes())}:${two(time.getUTCSeconds())}.${String(time.getUTCMilliseconds() * 1000).padStart(6, '0')}`;
  const pairs = Object.entries(entry)
    .filter(([key]) => !HEADER_FIELDS.has(key))
    .map(([key, value]) => `${key}=${typeof value === 'number' || typeof value === 'boolean' ? String(value) : JSON.stringify(value)}`);
  if (level === 'debug' || level === 'trace') pairs.unshift(`level="${level}"`);
  const message = JSON.stringify(typeof entry.msg === 'string' ? entry.msg : '');
  return `${KLOG_SEVERITY[level] ?? 'I'}${stamp} ${String(pid).padStart(7)} trousseau] ${[message, ...pairs].join(' ')}\n`;
}

function klogStream(destination: NodeJS.WritableStream): DestinationStream {
  return { write: (line: string) => void destination.write(klogLine(line)) };
}

/**
 * The shape of grpc-js's `setLogger` argument. Its lines (connection errors, traces
 * enabled by GRPC_TRACE) become lines of this logger, tagged `source: "grpc"`, instead
 * of plain text in the middle of the JSON stream.
 */
export function grpcLogSink(logger: Logger): Partial<Console> {
  const grpcLogger = logger.child({ source: 'grpc' });
  return {
    error: (...args: unknown[]) => grpcLogger.error(format(...args)),
    info: (...args: unknown[]) => grpcLogger.info(format(...args)),
    debug: (...args: unknown[]) => grpcLogger.debug(format(...args)),
  };
}
