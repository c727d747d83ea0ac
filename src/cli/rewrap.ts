/**
 * `trousseau rewrap`: bring envelopes up to the current backend set and key versions.
 *
 * Each envelope is decrypted and sealed again inside this process, by a plugin built
 * from --config (nothing is served): the plaintext never leaves the process and is
 * wiped after use. The new envelope gets a copy from EVERY configured backend (not
 * just a quorum); if one cannot wrap, the envelope is left as it was and reported,
 * unless --allow-partial accepts at least the quorum.
 *
 * Input: envelope documents as `encrypt` prints them (cli/envelope-document.ts), one
 * per line on stdin (written to stdout in the same order, so the output can replace
 * the input), or one per file argument (rewritten in place, atomically). A report
 * line per envelope goes to stderr. Exit status 1 when any envelope failed.
 */
import { readFile, rename, stat, open } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import type { Command } from 'commander';
import { loadConfigFile } from '../config/load.ts';
import type { Config } from '../config/schema.ts';
import { errorCodeOf, TrousseauError } from '../errors.ts';
import { parseEnvelope } from '../envelope/format.ts';
import { createLogger } from '../observability/logger.ts';
import { Metrics } from '../observability/metrics.ts';
import { Plugin } from '../plugin.ts';
import { formatEnvelopeDocument, parseEnvelopeDocument } from './envelope-document.ts';

export interface CopyRef {
  backend: string;
  keyVersion: string;
}

export interface RewrapOutcome {
  source: string;
  action: 'rewrapped' | 'current' | 'failed';
  before: CopyRef[];
  after: CopyRef[];
  added: string[];
  removed: string[];
  rotated: { backend: string; from: string; to: string }[];
  /** Configured backends the new envelope still lacks (only with --allow-partial). */
  missing: string[];
  error?: string;
  /** The document to write: the new one, or the input unchanged. */
  output: string;
}

export interface RewrapOptions {
  force?: boolean;
  allowPartial?: boolean;
}

function copiesOf(ciphertext: Uint8Array, annotations: ReadonlyMap<string, Uint8Array>): CopyRef[] {
  return parseEnvelope(ciphertext, annotations)
    .copies.filter((c) => c.wrapped !== undefined)
    .map((c) => ({ backend: c.backendName, keyVersion: c.keyVersion }));
}

function diff(before: CopyRef[], after: CopyRef[]): Pick<RewrapOutcome, 'added' | 'removed' | 'rotated'> {
  const old = new Map(before.map((c) => [c.backend, c.keyVersion]));
  const now = new Map(after.map((c) => [c.backend, c.keyVersion]));
  return {
    added: after.filter((c) => !old.has(c.backend)).map((c) => c.backend),
    removed: before.filter((c) => !now.has(c.backend)).map((c) => c.backend),
    rotated: after
      .filter((c) => old.has(c.backend) && old.get(c.backend) !== c.keyVersion)
      .map((c) => ({ backend: c.backend, from: old.get(c.backend)!, to: c.keyVersion })),
  };
}

/**
 * Re-wraps envelopes with one in-process plugin. `prepare()` learns every backend's
 * current key version once, so that envelopes already current can be left alone.
 */
export class Rewrapper {
  readonly plugin: Plugin;
  private readonly config: Config;
  private readonly options: RewrapOptions;
  private current = new Map<string, string>();

  constructor(plugin: Plugin, config: Config, options: RewrapOptions = {}) {
    this.plugin = plugin;
    this.config = config;
    this.options = options;
  }

  async prepare(): Promise<void> {
    const signal = AbortSignal.timeout(10_000);
    const versions = await Promise.allSettled(this.plugin.backends.map((b) => b.currentKeyVersion(signal)));
    this.current = new Map();
    versions.forEach((v, i) => {
      if (v.status === 'fulfilled') this.current.set(this.plugin.backends[i]!.name, v.value);
    });
  }

  private isCurrent(copies: CopyRef[]): boolean {
    const names = this.plugin.backends.map((b) => b.name);
    return (
      copies.length === names.length &&
      names.every((name) => copies.some((c) => c.backend === name && this.current.get(name) === c.keyVersion))
    );
  }

  async rewrap(source: string, text: string): Promise<RewrapOutcome> {
    const base = { source, before: [] as CopyRef[], after: [] as CopyRef[], added: [], removed: [], rotated: [], missing: [], output: text };
    let plaintext: Buffer | undefined;
    try {
      // A bare base64 ciphertext is a KMS v1 envelope: it has no annotations, so every copy must stay inline.
      const transport = text.trim().startsWith('{') ? 'v2' : 'v1';
      const doc = parseEnvelopeDocument(text);
      const annotations = new Map<string, Uint8Array>(Object.entries(doc.annotations));
      base.before = copiesOf(doc.ciphertext, annotations);
      if (!this.options.force && this.isCurrent(base.before)) return { ...base, action: 'current', after: base.before };

      const { config } = this;
      const signal = AbortSignal.timeout(config.decrypt.deadlineMs + config.encrypt.deadlineMs);
      plaintext = (await this.plugin.engine.decrypt(doc.ciphertext, annotations, signal)).plaintext;
      const { encrypted, failures } = await this.plugin.engine.encryptWithEvery(plaintext, transport, signal, config.quorum);
      const lacking = [...failures].map(([backend, code]) => `${backend}: ${code}`).join(', ');
      if (!encrypted) throw new TrousseauError('QUORUM_NOT_MET', `fewer than ${config.quorum} backends wrapped the key (${lacking})`);
      if (encrypted.missing.length > 0 && !this.options.allowPartial) {
        throw new TrousseauError('BACKEND_UNAVAILABLE', `not every backend wrapped the key (${lacking}); left unchanged (--allow-partial accepts a quorum)`);
      }
      const after = copiesOf(encrypted.ciphertext, encrypted.annotations);
      const output =
        transport === 'v1'
          ? encrypted.ciphertext.toString('base64')
          : formatEnvelopeDocument(encrypted.ciphertext, this.plugin.status().keyId, Object.fromEntries([...encrypted.annotations].map(([k, v]) => [k, Buffer.from(v)])));
      return { ...base, action: 'rewrapped', after, ...diff(base.before, after), missing: encrypted.missing, output };
    } catch (error) {
      // Our messages name backends and error classes only; anything else is reported by class.
      const message = error instanceof TrousseauError ? error.message : 'unexpected error';
      return { ...base, action: 'failed', error: `${errorCodeOf(error)}: ${message}` };
    } finally {
      plaintext?.fill(0);
    }
  }
}

export function describeOutcome(o: RewrapOutcome, dryRun = false): string {
  const list = (copies: CopyRef[]) => copies.map((c) => `${c.backend}@${c.keyVersion}`).join(' ') || '(none readable)';
  if (o.action === 'failed') return `${o.source}: FAILED ${o.error ?? ''} [${list(o.before)}]`;
  if (o.action === 'current') return `${o.source}: already current [${list(o.before)}]`;
  const changes = [
    ...o.added.map((b) => `+${b}`),
    ...o.removed.map((b) => `-${b}`),
    ...o.rotated.map((r) => `${r.backend} ${r.from}->${r.to}`),
    ...o.missing.map((b) => `still lacks ${b}`),
  ];
  return `${o.source}: ${dryRun ? 'would rewrap' : 'rewrapped'} [${list(o.before)}] -> [${list(o.after)}]${changes.length ? ` (${changes.join('; ')})` : ''}`;
}

/** "120/5000 (2.4 %), 85/s, ETA 57 s": the progress line `rewrap` keeps on a terminal. */
export function formatProgress(done: number, total: number, elapsedMs: number): string {
  const rate = elapsedMs > 0 ? (done * 1000) / elapsedMs : 0;
  const percent = total > 0 ? ((done * 100) / total).toFixed(1) : '100.0';
  const left = total - done;
  const eta = rate > 0 && left > 0 ? ` ETA ${duration(left / rate)}` : '';
  return `rewrap: ${done}/${total} (${percent} %), ${rate.toFixed(rate < 10 ? 1 : 0)}/s${eta}`;
}

function duration(seconds: number): string {
  if (seconds < 90) return `${Math.ceil(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

async function writeAtomically(file: string, text: string): Promise<void> {
  const mode = (await stat(file)).mode & 0o777;
  const temporary = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  const handle = await open(temporary, 'wx', mode);
  try {
    await handle.writeFile(text);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await rename(temporary, file);
}

async function readStdinText(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

export function registerRewrapCommand(program: Command): void {
  program
    .command('rewrap')
    .description('re-wrap envelopes with every current backend and key version, in-process (the plaintext never leaves it)')
    .requiredOption('-c, --config <file>', 'configuration of the backends to wrap with (YAML)')
    .argument('[files...]', 'envelope JSON files, rewritten in place (default: one envelope per line on stdin, written to stdout)')
    .option('--dry-run', 'report what would change; write nothing')
    .option('--force', 're-wrap envelopes that are already current too')
    .option('--allow-partial', 'accept new envelopes that lack some backend but reach the quorum (while a backend is down)')
    .option('--json', 'report one JSON object per envelope on stderr')
    .action(async (files: string[], options: { config: string; dryRun?: boolean; force?: boolean; allowPartial?: boolean; json?: boolean }) => {
      const { config, baseDir } = await loadConfigFile(options.config);
      const plugin = await Plugin.create({ config, baseDir, logger: createLogger('error'), metrics: new Metrics() });
      const counts = { rewrapped: 0, current: 0, failed: 0 };
      // On a terminal a progress line is kept at the bottom (rewritten in place); in a
      // pipe or a log, only the report lines and the summary.
      const tty = process.stderr.isTTY === true && !options.json;
      const started = Date.now();
      let total = 0;
      let done = 0;
      let lastProgress = 0;
      const clearProgress = () => tty && process.stderr.write('\r\x1b[K');
      const report = (o: RewrapOutcome) => {
        counts[o.action]++;
        done++;
        clearProgress();
        console.error(options.json ? JSON.stringify({ ...o, output: undefined }) : describeOutcome(o, options.dryRun));
        if (tty && (Date.now() - lastProgress > 200 || done === total)) {
          lastProgress = Date.now();
          process.stderr.write(formatProgress(done, total, Date.now() - started));
        }
      };
      try {
        const rewrapper = new Rewrapper(plugin, config, { force: options.force, allowPartial: options.allowPartial });
        await rewrapper.prepare();
        if (files.length > 0) {
          total = files.length;
          for (const file of files) {
            const outcome = await rewrapper.rewrap(file, await readFile(file, 'utf8'));
            if (outcome.action === 'rewrapped' && !options.dryRun) await writeAtomically(file, `${outcome.output}\n`);
            report(outcome);
          }
        } else {
          const lines = (await readStdinText()).split('\n');
          total = lines.filter((line) => line.trim() !== '').length;
          let n = 0;
          for (const line of lines) {
            if (line.trim() === '') continue;
            n++;
            const outcome = await rewrapper.rewrap(`stdin:${n}`, line);
            // Every input line gets an output line (the old one when it failed), so nothing is ever dropped.
            if (!options.dryRun) process.stdout.write(`${outcome.output.trim()}\n`);
            report(outcome);
          }
        }
      } finally {
        await plugin.close();
        clearProgress();
      }
      const seconds = (Date.now() - started) / 1000;
      const rate = seconds > 0 ? ` in ${seconds.toFixed(1)} s (${(done / seconds).toFixed(1)}/s)` : '';
      const summary = options.dryRun
        ? `${counts.rewrapped} would be rewrapped, ${counts.current} already current, ${counts.failed} failed${rate} (dry run: nothing written)`
        : `${counts.rewrapped} rewrapped, ${counts.current} already current, ${counts.failed} failed${rate}`;
      console.error(`rewrap: ${summary}`);
      if (counts.failed > 0) process.exitCode = 1;
    });
}
