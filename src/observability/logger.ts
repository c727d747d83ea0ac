/**
 * JSON logs (pino) to stderr. Nothing secret is ever passed to the logger; the
 * redaction list is a second line of defence for field names that would be secret
 * if someone logged them by mistake.
 */
import { pino, type Logger, type LevelWithSilent } from 'pino';

export type { Logger };

export function createLogger(level: LevelWithSilent = 'info', destination: NodeJS.WritableStream = process.stderr): Logger {
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
    destination,
  );
}

export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
