/**
 * The container image as a control-plane node runs it: `npm run image` built it (the
 * `image` step of test/run-all.sh runs deploy/image/build.sh first); deploy/image/run.sh
 * runs it under podman with the static pod's settings (deploy/image/settings.json:
 * uid 10001, read-only root, no capabilities, no-new-privileges, memory limit, the
 * socket folder from the host, the node's network). From the host, as kube-apiserver
 * would: `trousseau status`, an Encrypt/Decrypt round trip over the mounted socket,
 * /healthz; then SIGTERM exits 0 within the drain deadline and removes the socket.
 * Once in dev mode, once against the real test servers (every backend type).
 *
 * No podman, no image: a failure under CI (CI=true), a loud skip elsewhere.
 */
import { execFile } from 'node:child_process';
import { chmodSync, chownSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import test, { type ExecutionContext } from 'ava';
import { parse as parseYaml, stringify as stringifyYaml } from 'yaml';
import { imageReference, loadImageSettings } from '../../deploy/image/podman-args.ts';
import { requireServer } from '../helpers/servers.ts';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const runSh = path.join(root, 'deploy/image/run.sh');
const cli = path.join(root, 'src/main.ts');
const settings = loadImageSettings();
const image = imageReference(settings);
const uid = settings.podSecurityContext.runAsUser;
const gid = settings.podSecurityContext.runAsGroup;
const containerSocket = path.posix.join(settings.socketDir, 'kms.sock');
const WAIT_MS = 90_000;

/** Why the image cannot be tested here, or undefined. */
async function unavailable(): Promise<string | undefined> {
  try {
    await run('podman', ['--version']);
  } catch {
    return 'podman is not installed: bash test/servers/install-image-tools.sh';
  }
  try {
    await run('podman', ['image', 'exists', image]);
  } catch {
    return `no image ${image} in podman's storage: npm run image`;
  }
  return undefined;
}
const missing = await unavailable();
if (missing && process.env.CI) throw new Error(`the image test cannot run: ${missing}`);
if (missing) console.error(`\n!!! the image test cannot run: ${missing} (SKIPPED)\n`);
const imageTest = missing ? test.serial.skip : test.serial;

const podman = async (...args: string[]) => (await run('podman', args, { timeout: 120_000, maxBuffer: 16 << 20 })).stdout;
const trousseau = (...args: string[]) => run(process.execPath, [cli, ...args], { timeout: 60_000 });

async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, diagnose: () => Promise<string>): Promise<T> {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const value = await probe().catch(() => undefined);
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`${what} within ${WAIT_MS / 1000} s; container log:\n${await diagnose()}`);
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

interface Started {
  name: string;
  socket: string;
  http: string;
  startedMs: number;
  logs: () => Promise<string>;
}

/**
 * run.sh the image with `args`; resolves once the socket answers and /healthz is up.
 * `cacheDir`: the host folder of the compile cache, to share one between starts (a new
 * one in the start's own folder otherwise).
 */
async function start(t: ExecutionContext, label: string, configDir: string, args: string[], extra: string[] = [], cacheDir?: string): Promise<Started> {
  const dir = mkdtempSync(path.join(tmpdir(), `trousseau-image-${label}-`));
  const socketDir = path.join(dir, 'socket');
  const name = `trousseau-test-${process.pid}-${label}`;
  await podman('rm', '-f', name).catch(() => undefined);
  t.teardown(async () => {
    await podman('rm', '-f', name).catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
  });
  const began = Date.now();
  const { stdout } = await run('bash', [runSh, '--name', name, '--socket-dir', socketDir, '--cache-dir', cacheDir ?? path.join(dir, 'compile-cache'), '--config-dir', configDir, ...extra, '--', ...args], { timeout: 180_000 });
  t.regex(stdout, /^[0-9a-f]{64}\n$/, 'run.sh prints the container id and nothing else');
  const logs = async () => {
    const out = await run('podman', ['logs', name]).catch((error: { stdout?: string; stderr?: string }) => error);
    return `${out.stdout ?? ''}${out.stderr ?? ''}`;
  };
  const socket = path.join(socketDir, 'kms.sock');
  // http.listen 127.0.0.1:0: the port the plugin got is in its log.
  const http = await waitFor(
    'no HTTP listener logged',
    async () => /"address":"(127\.0\.0\.1:\d+)"[^\n]*serving \/metrics/.exec(await logs())?.[1],
    logs,
  );
  await waitFor('the socket did not answer `trousseau status`', async () => ((await trousseau('status', '--json', '-s', socket)).stdout ? true : undefined), logs);
  const startedMs = Date.now() - began;
  t.log(`${label}: serving ${startedMs} ms after run.sh (init container included)`);
  return { name, socket, http, startedMs, logs };
}

async function roundTrip(t: ExecutionContext, started: Started, expectedBackends: string[]) {
  const status = JSON.parse((await trousseau('status', '--json', '-s', started.socket)).stdout) as {
    healthy: boolean;
    keyId?: string;
    backends: { name: string; healthy?: boolean; state?: string }[];
  };
  t.true(status.healthy, JSON.stringify(status));
  t.deepEqual(status.backends.map((b) => b.name).sort(), [...expectedBackends].sort());
  t.regex(status.keyId ?? '', /^trousseau-/);

  const plaintext = `image round trip ${started.name} ${Date.now()}`;
  const encrypt = execFile(process.execPath, [cli, 'encrypt', '-s', started.socket], { timeout: 60_000 });
  const envelope = await new Promise<string>((resolve, reject) => {
    let out = '';
    encrypt.stdout!.on('data', (chunk: Buffer) => (out += chunk.toString()));
    encrypt.once('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`encrypt exited ${code}`))));
    encrypt.stdin!.end(plaintext);
  });
  t.false(envelope.includes(plaintext), 'the envelope does not hold the plaintext');
  const decrypt = execFile(process.execPath, [cli, 'decrypt', '-s', started.socket], { timeout: 60_000 });
  const decrypted = await new Promise<string>((resolve, reject) => {
    let out = '';
    decrypt.stdout!.on('data', (chunk: Buffer) => (out += chunk.toString()));
    decrypt.once('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`decrypt exited ${code}`))));
    decrypt.stdin!.end(envelope);
  });
  t.is(decrypted, plaintext);

  const healthz = await fetch(`http://${started.http}/healthz`);
  t.is(healthz.status, 200);
  const metrics = await (await fetch(`http://${started.http}/metrics`)).text();
  const labels = JSON.parse(await podman('image', 'inspect', '--format', '{{json .Labels}}', image)) as Record<string, string>;
  t.true(metrics.includes(`trousseau_build_info{version="${labels['org.opencontainers.image.version']}",commit="${labels['org.opencontainers.image.revision']}"} 1`));
  t.regex(await started.logs(), /"msg":"starting trousseau"/);
}

/** The container's resident memory, from its PID 1 on the host. */
async function rssMiB(name: string): Promise<number> {
  const pid = (await podman('inspect', '--format', '{{.State.Pid}}', name)).trim();
  const rss = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
  return Number(rss) / 1024;
}

async function stopAndCheck(t: ExecutionContext, started: Started) {
  const drainMs = 5000;
  const dir = mkdtempSync(path.join(tmpdir(), 'trousseau-image-logs-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const logFile = path.join(dir, 'log');
  // run.sh --stop waits up to the drain deadline plus the plugin's close grace, not the
  // pod's 30 s grace: exiting within the deadline is what is checked.
  const stopped = await run('bash', [runSh, '--stop', started.name, '--timeout', String(Math.ceil(drainMs / 1000) + 2), '--logs', logFile], { timeout: 120_000 }).catch(
    (error: { stdout?: string; code?: number }) => error,
  );
  const log = readFileSync(logFile, 'utf8');
  t.is(stopped.stdout?.trim(), '0', `exit code of the container after SIGTERM; log:\n${log}`);
  t.false(existsSync(started.socket), 'the socket is removed');
  t.regex(log, /"msg":"stopped"/);
}

imageTest('the image: labels, non-root user, no shell, --version from its build-info.json', async (t) => {
  const config = JSON.parse(await podman('image', 'inspect', '--format', '{{json .Config}}', image)) as { User: string; Labels: Record<string, string>; Entrypoint: string[] };
  t.is(config.User, `${uid}:${gid}`);
  const labels = config.Labels;
  const pkg = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8')) as { version: string };
  t.is(labels['org.opencontainers.image.version'], pkg.version);
  t.regex(labels['org.opencontainers.image.revision'] ?? '', /^[0-9a-f]{40}(-dirty)?$/);
  t.regex(labels['org.opencontainers.image.created'] ?? '', /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
  t.truthy(labels['org.opencontainers.image.source']);
  const common = ['run', '--rm', '--runtime', 'runc', '--network=none', '--ulimit=nofile=1024:1024', '--ulimit=nproc=1024:1024'];
  const version = await podman(...common, image, '--version');
  t.is(version.trim(), `trousseau ${pkg.version} (commit ${labels['org.opencontainers.image.revision']}, built ${labels['org.opencontainers.image.created']})`);
  // Distroless: no shell, no package manager.
  for (const program of ['/bin/sh', '/usr/bin/npm', '/usr/bin/apt-get']) {
    await t.throwsAsync(podman(...common, '--entrypoint', program, image), undefined, `${program} is not in the image`);
  }
});

imageTest('dev mode under the static pod settings: status, round trip, /healthz, SIGTERM', async (t) => {
  const configDir = mkdtempSync(path.join(tmpdir(), 'trousseau-image-config-'));
  chmodSync(configDir, 0o755);
  t.teardown(() => rmSync(configDir, { recursive: true, force: true }));
  const started = await start(t, 'dev', configDir, [
    'serve', '--dev', '--data-dir', path.posix.join(settings.socketDir, 'dev-keys'), '--socket', containerSocket, '--http-listen', '127.0.0.1:0',
  ]);
  await roundTrip(t, started, ['local-a', 'local-b', 'local-c']);
  t.log(`dev: RSS ${(await rssMiB(started.name)).toFixed(0)} MiB after one round trip`);
  await stopAndCheck(t, started);
});

imageTest('the compile cache: the init container hands its folder to the plugin, a restart starts from it', async (t) => {
  const configDir = mkdtempSync(path.join(tmpdir(), 'trousseau-image-config-'));
  chmodSync(configDir, 0o755);
  const cacheBase = mkdtempSync(path.join(tmpdir(), 'trousseau-image-cache-'));
  chmodSync(cacheBase, 0o755);
  t.teardown(() => {
    rmSync(configDir, { recursive: true, force: true });
    rmSync(cacheBase, { recursive: true, force: true });
  });
  const cacheDir = path.join(cacheBase, 'compile-cache');
  const args = ['serve', '--dev', '--data-dir', path.posix.join(settings.socketDir, 'dev-keys'), '--socket', containerSocket, '--http-listen', '127.0.0.1:0'];
  const figures: string[] = [];
  for (const which of ['first', 'second']) {
    const started = await start(t, `cache-${which}`, configDir, args, [], cacheDir);
    const logs = await started.logs();
    t.regex(logs, /"msg":"compile cache in use"/, `${which} start: the cache is used`);
    t.notRegex(logs, /compile cache not used/, `${which} start`);
    figures.push(`${which} start: serving after ${started.startedMs} ms, RSS ${(await rssMiB(started.name)).toFixed(0)} MiB`);
    await roundTrip(t, started, ['local-a', 'local-b', 'local-c']);
    await stopAndCheck(t, started);
    const info = statSync(cacheDir);
    t.is(info.uid, uid, 'the cache folder is the plugin\'s');
    t.is(info.mode & 0o777, 0o700, 'and no one else may read or write it');
    t.true(readdirSync(cacheDir).length > 0, `${which} start: the plugin filled the cache`);
  }
  t.log(figures.join('; '));
});

imageTest('a real-servers configuration (OpenBao, local-kms, lowkey-vault, a local key), credentials mounted read-only', async (t) => {
  for (const server of ['openbao', 'local-kms', 'lowkey-vault']) {
    const found = requireServer(server);
    if ('missing' in found) {
      t.pass(`SKIPPED: ${found.missing}`);
      return;
    }
  }
  const servers = path.join(root, '.servers');
  const source = parseYaml(readFileSync(path.join(servers, 'trousseau.yaml'), 'utf8')) as {
    socket: { path: string };
    http?: { listen?: string };
    backends: Record<string, unknown>[];
  };
  // The static pod's layout: /etc/trousseau/config.yaml, credentials/ owned by the
  // plugin's uid, 0600. Every "...File" field of a backend names a file to carry over.
  const configDir = mkdtempSync(path.join(tmpdir(), 'trousseau-image-config-'));
  t.teardown(() => rmSync(configDir, { recursive: true, force: true }));
  chmodSync(configDir, 0o755);
  const credentials = path.join(configDir, 'credentials');
  mkdirSync(credentials, { mode: 0o700 });
  const carry = (backend: string, value: Record<string, unknown>) => {
    for (const [key, field] of Object.entries(value)) {
      if (typeof field === 'string' && key.endsWith('File')) {
        const name = `${backend}-${path.basename(field)}`;
        copyFileSync(path.resolve(servers, field), path.join(credentials, name));
        chmodSync(path.join(credentials, name), 0o600);
        chownSync(path.join(credentials, name), uid, gid);
        value[key] = path.posix.join(settings.configDir, 'credentials', name);
      } else if (field && typeof field === 'object' && !Array.isArray(field)) {
        carry(backend, field as Record<string, unknown>);
      }
    }
  };
  for (const backend of source.backends) carry(String(backend.name), backend);
  chownSync(credentials, uid, gid);
  source.socket.path = containerSocket;
  source.http = { ...source.http, listen: '127.0.0.1:0' };
  writeFileSync(path.join(configDir, 'config.yaml'), stringifyYaml(source), { mode: 0o644 });

  const started = await start(t, 'servers', configDir, ['serve', '--config', path.posix.join(settings.configDir, 'config.yaml')], [
    '--env-file', path.join(servers, 'trousseau.env'),
  ]);
  await roundTrip(t, started, source.backends.map((b) => String(b.name)));
  t.log(`real servers: RSS ${(await rssMiB(started.name)).toFixed(0)} MiB after one round trip`);
  await stopAndCheck(t, started);
});
