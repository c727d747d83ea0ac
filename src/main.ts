/**
 * The `trousseau` command line. Each subcommand is a thin layer over the modules it
 * names; `serve` is the only one that starts the plugin.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { addCheckValues, addKeyToFile, generateKeyFile } from './backends/local.ts';
import { registerPkcs11KeygenCommand } from './backends/pkcs11-keygen.ts';
import { parseEnvelope } from './envelope/format.ts';
import { isTrousseauError } from './errors.ts';
import { call, clientsFor } from './cli/client.ts';
import { formatEnvelopeDocument, parseEnvelopeDocument } from './cli/envelope-document.ts';
import { registerRewrapCommand } from './cli/rewrap.ts';
import { renderStatus, type StatusDocument } from './cli/status-view.ts';
import { registerVerifyCommand } from './cli/verify.ts';
import type * as T from './kms/types.ts';
import { buildInfo, formatVersion } from './build-info.ts';
import { createLogger, levelForVerbosity, LOG_FORMATS, type LogFormat } from './observability/logger.ts';

const DEFAULT_SOCKET = '/var/run/trousseau/kms.sock';

// Modules that load every backend SDK are imported only by the commands that need
// them, so `status`, `encrypt`, `inspect` and `keygen` start fast.
const loadConfigModule = () => import('./config/load.ts');

async function readStdin(): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

const program = new Command()
  .name('trousseau')
  .description('Kubernetes KMS plugin that wraps every data key with several key-management backends')
  // Read only when asked (a checkout's commit costs a `git rev-parse`).
  .addOption(new Option('-V, --version', 'print the version, commit and build date'))
  .on('option:version', () => {
    console.log(formatVersion(buildInfo()));
    process.exit(0);
  })
  .showHelpAfterError();

/** `-v N`: klog's verbosity, as the other control-plane components take it. */
function verbosity(value: string): number {
  const n = Number(value);
  if (!/^\d{1,2}$/.test(value) || !Number.isInteger(n)) throw new InvalidArgumentError('must be a whole number from 0 to 99 (klog verbosity: 4 debug, 6 trace)');
  return n;
}

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

program
  .command('serve')
  .description('serve KMS v2 and v1beta1 on a unix socket')
  .option('-c, --config <file>', 'configuration file (YAML)')
  .option('--dev', 'embedded default: three local key backends in --data-dir, quorum 2 (development only)')
  .option('--socket <path>', 'unix socket path (overrides the configuration; with --dev: default DATA_DIR/kms.sock)')
  .option('--data-dir <dir>', 'with --dev: folder of the key files', './trousseau-data')
  .option('--http-listen <host:port>', 'address for /metrics, /healthz, /readyz (overrides the configuration)')
  .addOption(new Option('--log-level <level>', 'log level (overrides the configuration)').choices(LOG_LEVELS))
  .addOption(new Option('-v, --verbosity <n>', 'klog-style verbosity instead of --log-level: 0-3 info, 4-5 debug, 6+ trace').argParser(verbosity).conflicts('logLevel'))
  .addOption(new Option('--log-format <format>', 'json lines, or text in klog\'s layout').choices(LOG_FORMATS).default('json'))
  .addHelpText(
    'after',
    '\nA flag given twice takes its last value, so `npm run dev -- --socket PATH --data-dir DIR --http-listen HOST:PORT` overrides the dev defaults.',
  )
  .action(
    async (options: { config?: string; dev?: boolean; socket?: string; dataDir: string; httpListen?: string; logLevel?: string; verbosity?: number; logFormat: LogFormat }) => {
      if (!options.dev && !options.config) {
        throw new Error('serve needs a configuration: --config FILE (docs/configuration.md; check it first with `trousseau doctor -c FILE`), or --dev for three local development keys in --data-dir');
      }
      if (options.dev && options.config) throw new Error('give either --config FILE or --dev, not both');
      const logLevel = options.logLevel ?? (options.verbosity === undefined ? undefined : levelForVerbosity(options.verbosity));
      const [{ loadConfigFile }, { devConfig, prepareDevKeys }, { serveUntilSignalled }] = await Promise.all([
        loadConfigModule(),
        import('./cli/dev-config.ts'),
        import('./cli/serve.ts'),
      ]);
      let config;
      let baseDir: string;
      if (options.dev) {
        const dataDir = path.resolve(options.dataDir);
        config = devConfig(dataDir, path.resolve(options.socket ?? path.join(dataDir, 'kms.sock')), { httpListen: options.httpListen, logLevel });
        baseDir = dataDir;
        await prepareDevKeys(dataDir, createLogger(config.log.level, process.stderr, options.logFormat));
      } else {
        const loaded = await loadConfigFile(options.config!);
        config = loaded.config;
        baseDir = loaded.baseDir;
        if (options.socket) config.socket.path = path.resolve(options.socket);
        if (options.httpListen) config.http.listen = options.httpListen;
        if (logLevel) config.log.level = logLevel as typeof config.log.level;
      }
      const logger = createLogger(config.log.level, process.stderr, options.logFormat);
      // Exit explicitly: after a failed start or a shutdown a backend SDK may still hold a
      // handle open, and a plugin that stopped serving must not linger as a process.
      process.exit(await serveUntilSignalled(config, baseDir, logger, options.dev ? '--dev' : options.config));
    },
  );

const plural = (n: number, word: string) => `${n} ${word}${n === 1 ? '' : 's'}`;

program
  .command('validate')
  .description('check a configuration file and the files it names (exist, readable, safe modes, parse), and exit; `doctor` checks the node too')
  .requiredOption('-c, --config <file>', 'configuration file (YAML)')
  .option('--no-files', 'check the shape only (a configuration written for another machine)')
  .action(async (options: { config: string; files: boolean }) => {
    const { config, baseDir } = await (await loadConfigModule()).loadConfigFile(options.config);
    const shape = `${plural(config.backends.length, 'backend')}: ${config.backends.map((b) => `${b.name}/${b.type}`).join(', ')}; quorum ${config.quorum}`;
    if (!options.files) {
      console.log(`${options.config}: valid (${shape}; files not checked)`);
      return;
    }
    const { checkReferencedFiles } = await import('./cli/doctor.ts');
    const checks = await checkReferencedFiles(config, baseDir);
    const failed = checks.filter((c) => c.status === 'fail');
    const line = (c: (typeof checks)[number]) => `  ${c.status.toUpperCase()} ${c.check}: ${c.detail}${c.fix ? ` (fix: ${c.fix})` : ''}`;
    if (failed.length > 0) {
      throw new Error(`${options.config} is well-formed, but ${plural(failed.length, 'referenced file')} fail${failed.length === 1 ? 's' : ''} a check:\n${failed.map(line).join('\n')}`);
    }
    for (const warning of checks.filter((c) => c.status === 'warn')) console.error(line(warning));
    console.log(`${options.config}: valid (${shape}; ${plural(checks.length, 'referenced file')} present and readable)`);
  });

program
  .command('doctor')
  .description('check this node and a configuration before serving: files and their modes, socket folder, HTTP port, DNS, TLS, clock, credentials; exits 1 on any failure')
  .requiredOption('-c, --config <file>', 'configuration file (YAML)')
  .option('--live', 'also wrap and unwrap one random key with every backend')
  .option('--json', 'print the report as JSON')
  .action(async (options: { config: string; live?: boolean; json?: boolean }) => {
    const { runDoctor, renderDoctorReport } = await import('./cli/doctor.ts');
    const report = await runDoctor(options);
    console.log(options.json ? JSON.stringify(report, null, 2) : renderDoctorReport(report));
    if (!report.ok) process.exitCode = 1;
  });

program
  .command('keygen')
  .description('create a local AES-256 key file (mode 0600); --rotate adds a new current key to an existing file')
  .argument('<file>', 'key file to create')
  .option('--rotate', 'add a new current key to FILE, keeping the older keys for unwrapping')
  .option('--add-checks', 'write the check value on every line of an older FILE; the keys stay the same')
  .action(async (file: string, options: { rotate?: boolean; addChecks?: boolean }) => {
    if (options.rotate && options.addChecks) throw new Error('give at most one of --rotate and --add-checks');
    let version: string;
    try {
      version = options.rotate ? await addKeyToFile(file) : options.addChecks ? await addCheckValues(file) : await generateKeyFile(file);
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      const folder = path.dirname(path.resolve(file));
      if (code === 'EEXIST') {
        throw new Error(`${file} already exists; keygen never overwrites a key (use --rotate to add a new current key to it)`, { cause: error });
      }
      // The error names the temporary file keygen writes first: say it about the folder instead.
      if (code === 'ENOENT' && !options.rotate && !options.addChecks) {
        throw new Error(`folder ${folder} does not exist; create it first (mkdir -m 700 ${folder})`, { cause: error });
      }
      if (code === 'ENOTDIR') throw new Error(`${folder} is not a folder (a part of the path is a file)`, { cause: error });
      if (code === 'EACCES' || code === 'EPERM') throw new Error(`cannot write in ${folder} (${code}): run as a user that may, or choose another folder`, { cause: error });
      throw error;
    }
    const done = options.rotate ? 'rotated to' : options.addChecks ? 'check values written; current' : 'created';
    console.log(`${file}: ${done} key version ${version}`);
  });

registerPkcs11KeygenCommand(program);

program
  .command('schema')
  .description('print the configuration JSON Schema')
  .action(async () => {
    console.log(JSON.stringify((await loadConfigModule()).configJsonSchema(), null, 2));
  });

/** `--watch N`: a bounded refresh interval, so a typo cannot turn into a tight polling loop against the plugin. */
function watchInterval(value: string): number {
  const seconds = Number(value);
  if (value.trim() === '' || !Number.isFinite(seconds) || seconds < 0.5 || seconds > 3600) {
    throw new InvalidArgumentError('must be a number of seconds from 0.5 to 3600');
  }
  return seconds;
}

const socketOption = () => new Option('-s, --socket <path>', 'plugin socket').default(DEFAULT_SOCKET);

program
  .command('status')
  .description('ask a running plugin for its key_id and each backend\'s health; exits 2 when it is not ready (below quorum, no backend)')
  .addOption(socketOption())
  .option('--json', 'print JSON')
  .addOption(new Option('--watch [seconds]', 'refresh every N seconds (default 2, at least 0.5)').argParser(watchInterval))
  .action(async (options: { socket: string; json?: boolean; watch?: number | boolean }) => {
    const clients = clientsFor(options.socket);
    try {
      const fetchStatus = async () => JSON.parse((await call<object, T.AdminStatusResponse>(clients.admin, 'Status', {})).status_json) as StatusDocument;
      const format = (status: StatusDocument) => (options.json ? JSON.stringify(status, null, 2) : renderStatus(status));
      const show = async () => format(await fetchStatus());
      if (!options.watch) {
        const status = await fetchStatus();
        console.log(format(status));
        // Scripts and operators check this before touching an apiserver (docs/kubernetes.md).
        if (!status.healthy) process.exitCode = 2;
        return;
      }
      const seconds = typeof options.watch === 'number' ? options.watch : 2;
      for (;;) {
        const text = await show().catch((error: unknown) => `status unavailable: ${(error as Error).message}`);
        process.stdout.write(`\x1b[2J\x1b[H${new Date().toISOString()}\n${text}\n`);
        await new Promise((r) => setTimeout(r, seconds * 1000));
      }
    } finally {
      clients.close();
    }
  });

program
  .command('encrypt')
  .description('encrypt stdin through a running plugin (KMS v2) and print the envelope as JSON')
  .addOption(socketOption())
  .action(async (options: { socket: string }) => {
    const clients = clientsFor(options.socket);
    try {
      const response = await call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext: await readStdin(), uid: 'cli' });
      console.log(formatEnvelopeDocument(response.ciphertext, response.key_id, response.annotations));
    } finally {
      clients.close();
    }
  });

program
  .command('decrypt')
  .description('decrypt an envelope JSON document (from `encrypt`) read on stdin; writes the plaintext to stdout')
  .addOption(socketOption())
  .action(async (options: { socket: string }) => {
    const doc = parseEnvelopeDocument((await readStdin()).toString('utf8'));
    const clients = clientsFor(options.socket);
    try {
      const response = await call<T.V2DecryptRequest, T.V2DecryptResponse>(clients.v2, 'Decrypt', {
        ciphertext: doc.ciphertext,
        uid: 'cli',
        key_id: doc.keyId,
        annotations: doc.annotations,
      });
      process.stdout.write(response.plaintext);
    } finally {
      clients.close();
    }
  });

program
  .command('inspect')
  .description('describe an envelope read on stdin (format version, which backends wrapped it); shows no secret')
  .argument('[file]', 'file holding the envelope JSON or base64 (default: stdin)')
  .action(async (file?: string) => {
    const text = file ? await readFile(file, 'utf8') : (await readStdin()).toString('utf8');
    const doc = parseEnvelopeDocument(text);
    const envelope = parseEnvelope(doc.ciphertext, new Map(Object.entries(doc.annotations)));
    console.log(
      JSON.stringify(
        {
          formatVersion: envelope.formatVersion,
          keyId: doc.keyId || undefined,
          envelopeId: Buffer.from(envelope.envelopeId).toString('hex'),
          quorum: envelope.quorum,
          backendsAtWrite: envelope.configuredBackends,
          ciphertextBytes: doc.ciphertext.length,
          copies: envelope.copies.map((c) => ({
            backend: c.backendName,
            keyVersion: c.keyVersion,
            location: c.location,
            wrappedBytes: c.wrappedLength,
            present: c.wrapped !== undefined,
          })),
        },
        null,
        2,
      ),
    );
  });

registerVerifyCommand(program);
registerRewrapCommand(program);

try {
  await program.parseAsync(process.argv);
} catch (error) {
  // Errors we raise are written to be shown; anything else gets no stack on a terminal unless asked.
  const message = isTrousseauError(error) || error instanceof Error ? error.message : String(error);
  console.error(`trousseau: ${message}`);
  if (process.env.TROUSSEAU_DEBUG && error instanceof Error) console.error(error.stack);
  process.exitCode = 1;
}
