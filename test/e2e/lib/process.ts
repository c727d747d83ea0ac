/**
 * Child processes of the end-to-end suite (etcd, kube-apiserver, the plugin), each
 * logging to its own file, so that a failure can quote the last lines of the process
 * that caused it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, readFileSync } from 'node:fs';

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export class Child {
  readonly name: string;
  readonly logFile: string;
  /** Settles when the process has exited (never rejects). */
  readonly exited: Promise<ExitStatus>;
  private readonly process: ChildProcess;
  private status: ExitStatus | undefined;

  constructor(name: string, command: string, args: readonly string[], options: { logFile: string; env?: NodeJS.ProcessEnv; cwd?: string }) {
    this.name = name;
    this.logFile = options.logFile;
    // Appended to, so a restarted process keeps its previous run's lines above.
    const log = openSync(options.logFile, 'a');
    try {
      this.process = spawn(command, args, { cwd: options.cwd, env: options.env ?? process.env, stdio: ['ignore', log, log] });
    } finally {
      closeSync(log);
    }
    this.exited = new Promise((resolve) => {
      const done = (status: ExitStatus) => {
        this.status ??= status;
        resolve(this.status);
      };
      this.process.once('exit', (code, signal) => done({ code, signal }));
      this.process.once('error', () => done({ code: null, signal: null }));
    });
  }

  get pid(): number | undefined {
    return this.process.pid;
  }

  /** Undefined while running. */
  get exitStatus(): ExitStatus | undefined {
    return this.status;
  }

  signal(signal: NodeJS.Signals): void {
    if (this.status === undefined) this.process.kill(signal);
  }

  /** SIGTERM, then SIGKILL after `graceMs`; resolves with how it ended. */
  async stop(graceMs = 15_000): Promise<ExitStatus> {
    if (this.status) return this.status;
    this.signal('SIGTERM');
    const timer = setTimeout(() => this.signal('SIGKILL'), graceMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }

  /** The last lines of its log, for failure messages. */
  tail(lines = 25): string {
    try {
      const text = readFileSync(this.logFile, 'utf8').trimEnd().split('\n');
      return text.slice(-lines).join('\n');
    } catch {
      return '(no log)';
    }
  }

  log(): string {
    try {
      return readFileSync(this.logFile, 'utf8');
    } catch {
      return '';
    }
  }
}
