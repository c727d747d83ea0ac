/**
 * Peers scenario (`npm run bench -- --scenario peers [--rounds 3] [--seconds 5] [--out FILE]`):
 * Trousseau beside two single-backend Go KMS plugins, on the same servers, with the
 * same client, in interleaved rounds of the same run.
 *
 *   aws-encryption-provider   kubernetes-sigs/aws-encryption-provider, one AWS key
 *   trousseau-aws             Trousseau with that key only
 *   trousseau-multi           Trousseau with aws (preferred) + vault + a local key, quorum 2
 *   vault-kubernetes-kms      FalcoSuessgott/vault-kubernetes-kms, one transit key
 *   trousseau-vault           Trousseau with that transit key only
 *
 * The peers' binaries come from test/servers/find-peer.sh (an environment variable,
 * then the shared prebuilt folder, then `go install`). The servers: a local-kms of this
 * bench's own (the outage round freezes it, so it must be no one else's; the binary
 * is the one `test/servers/up.sh local-kms` installs) and the OpenBao of
 * `test/servers/up.sh openbao` (never frozen). The client is bench/goload (grpc-go and
 * the k8s.io/kms types, as kube-apiserver), closed loop at concurrency 16.
 *
 * Phases:
 *   count    each plugin is started once more, pointed at a counting HTTP proxy in
 *            front of its servers, and driven for a second per operation: backend
 *            requests per Encrypt and per Decrypt (a cache would show as < 1; a
 *            Vault batch request counts once under its path and once per data key
 *            under "<path> keys"). The
 *            measured rounds run without the proxy (its own CPU would be measured).
 *   rounds   per round, per plugin (order rotated each round): Decrypt then Encrypt of
 *            `seconds` each; ops/s, p99, plugin CPU per 1,000 calls (/proc/PID/stat,
 *            warm-up calls included in the count), the servers', the client's and the
 *            whole machine's CPU per 1,000 calls and how busy the cores were
 *            (/proc/stat), RSS at the end, load average.
 *   outage   per plugin that uses AWS: Decrypt at concurrency 16 with per-second
 *            figures; local-kms is frozen (SIGSTOP) for OUTAGE_S seconds, then resumed
 *            (SIGCONT). Worst per-second p99 and errors while frozen and after.
 *
 * BENCH_PEERS=<id,id> limits the plugins (e.g. while profiling one of them), and can name
 * trousseau-local (a local key only: the plugin's own cost, no backend server),
 * trousseau-aws-local and trousseau-aws-vault (what each backend adds to aws-only);
 * BENCH_PEERS_BASELINE=DIR adds trousseau-aws-baseline, -multi-baseline and -vault-baseline,
 * run from the checkout DIR;
 * BENCH_PEERS_SKIP=count,outage skips those phases;
 * BENCH_PLUGIN_NODE_ARGS (e.g. --cpu-prof --cpu-prof-dir=DIR) applies to Trousseau.
 */
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, openSync, readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { generateKeyFile } from '../src/backends/local.ts';
import { OWN_KMS_CREDENTIALS, OWN_KMS_KEY_ARN, OWN_KMS_REGION, startOwnLocalKms } from '../test/helpers/own-local-kms.ts';
import { call, clientsFor } from '../src/cli/client.ts';
import { awsOperation, CountingProxy, vaultOperation } from './counting-proxy.ts';
import { goloadBinary } from './goload-binary.ts';
import { pluginNodeArgs } from './plugin-node-args.ts';
import { cpuSeconds, freePort, loadAverage, rssMiB, serverEnv } from './process-stats.ts';

const root = path.resolve(import.meta.dirname, '..');
const CONCURRENCY = 16;
const WARMUP = 64;
const OUTAGE_BEFORE_S = 3;
const OUTAGE_S = 5;
const OUTAGE_AFTER_S = 4;
/** Backend timeout of every Trousseau backend here (the overload scenario's too). */
const TIMEOUT_MS = 1000;
const REGION = OWN_KMS_REGION;
const KEY_ARN = OWN_KMS_KEY_ARN;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
const round = (x: number, digits = 0) => Math.round(x * 10 ** digits) / 10 ** digits;

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
  await exited;
  clearTimeout(timer);
}

interface Servers {
  kmsEndpoint: string;
  vault: Record<string, string>;
}

interface Plugin {
  id: string;
  /** Backend servers it calls. */
  uses: ('aws' | 'vault')[];
  start(dir: string, servers: Servers): Promise<{ child: ChildProcess; socket: string }>;
}

const awsEnv = OWN_KMS_CREDENTIALS;

/** The peer's own output, kept in its folder and shown if it does not start. */
function peerLog(dir: string): { stdio: ['ignore', number, number]; file: string } {
  const file = path.join(dir, 'output.log');
  const fd = openSync(file, 'a');
  return { stdio: ['ignore', fd, fd], file };
}

async function waitForSocket(child: ChildProcess, socket: string, what: string, log?: string): Promise<void> {
  const deadline = Date.now() + 30_000;
  const failed = (why: string) => new Error(`${what} ${why}${log && existsSync(log) ? `; its last output:\n${readFileSync(log, 'utf8').split('\n').slice(-5).join('\n')}` : ''}`);
  while (!existsSync(socket)) {
    if (Date.now() > deadline || child.exitCode !== null) throw failed('did not start');
    await sleep(50);
  }
  // Answering, not just listening.
  const clients = clientsFor(socket);
  try {
    for (;;) {
      const ok = await call(clients.v2, 'Status', {}, 2000).then(
        () => true,
        () => false,
      );
      if (ok) return;
      if (Date.now() > deadline || child.exitCode !== null) throw failed('does not answer Status');
      await sleep(200);
    }
  } finally {
    clients.close();
  }
}

function peer(name: 'aws-encryption-provider' | 'vault-kubernetes-kms'): string {
  return execFileSync('bash', [path.join(root, 'test/servers/find-peer.sh'), name], { encoding: 'utf8' }).trim();
}

const awsEncryptionProvider: Plugin = {
  id: 'aws-encryption-provider',
  uses: ['aws'],
  async start(dir, servers) {
    const socket = path.join(dir, 'kms.sock');
    const log = peerLog(dir);
    const child = spawn(
      peer('aws-encryption-provider'),
      ['--listen', socket, '--key', KEY_ARN, '--region', REGION, '--kms-endpoint', servers.kmsEndpoint, '--health-port', `127.0.0.1:${await freePort()}`, '--health-kms-version', 'v2'],
      { stdio: log.stdio, env: { ...process.env, ...awsEnv } },
    );
    await waitForSocket(child, socket, this.id, log.file);
    return { child, socket };
  },
};

const vaultKubernetesKms: Plugin = {
  id: 'vault-kubernetes-kms',
  uses: ['vault'],
  async start(dir, servers) {
    const socket = path.join(dir, 'kms.sock');
    const v = servers.vault;
    const log = peerLog(dir);
    const child = spawn(
      peer('vault-kubernetes-kms'),
      [
        '-socket', `unix://${socket}`, '-force-socket-overwrite', '-vault-address', v.VAULT_ADDR!,
        '-auth-method', 'approle',
        '-approle-role-id', readFileSync(v.VAULT_APPROLE_ROLE_ID_FILE!, 'utf8').trim(),
        '-approle-secret-id', readFileSync(v.VAULT_APPROLE_SECRET_ID_FILE!, 'utf8').trim(),
        '-transit-mount', v.VAULT_TRANSIT_MOUNT ?? 'transit', '-transit-key', v.VAULT_KEY_NAME!,
        // Listens on all interfaces (it takes a port only): loopback traffic only is sent to it.
        '-health-port', String(await freePort()),
      ],
      { stdio: log.stdio },
    );
    await waitForSocket(child, socket, this.id, log.file);
    return { child, socket };
  },
};

/** Trousseau with `backends`, run from the source tree at `from` (this checkout unless another is named). */
function trousseau(id: string, backends: ('aws' | 'vault' | 'local')[], from = root): Plugin {
  return {
    id,
    uses: backends.filter((b): b is 'aws' | 'vault' => b !== 'local'),
    async start(dir, servers) {
      const socket = path.join(dir, 'kms.sock');
      const v = servers.vault;
      const definitions = {
        aws: { name: 'aws', type: 'aws', priority: 10, timeoutMs: TIMEOUT_MS, keyId: KEY_ARN, region: REGION, endpoint: servers.kmsEndpoint },
        vault: {
          name: 'vault',
          type: 'vault',
          priority: 20,
          timeoutMs: TIMEOUT_MS,
          address: v.VAULT_ADDR,
          keyName: v.VAULT_KEY_NAME,
          auth: { method: 'approle', roleIdFile: v.VAULT_APPROLE_ROLE_ID_FILE, secretIdFile: v.VAULT_APPROLE_SECRET_ID_FILE },
        },
        local: { name: 'local', type: 'local', priority: 90, keyFile: 'local.key' },
      };
      if (backends.includes('local')) await generateKeyFile(path.join(dir, 'local.key'));
      const config = {
        socket: { path: socket },
        quorum: Math.min(2, backends.length),
        backends: backends.map((b) => definitions[b]),
        log: { level: 'error' },
      };
      await writeFile(path.join(dir, 'config.yaml'), JSON.stringify(config));
      const child = spawn(process.execPath, [...pluginNodeArgs(from), path.join(from, 'src/main.ts'), 'serve', '--config', path.join(dir, 'config.yaml')], {
        stdio: ['ignore', 'ignore', 'inherit'],
        env: { ...process.env, ...awsEnv },
      });
      await waitForSocket(child, socket, id);
      return { child, socket };
    },
  };
}

/**
 * BENCH_PEERS_BASELINE=DIR adds `trousseau-aws-baseline`, `trousseau-multi-baseline` and
 * `trousseau-vault-baseline`: those plugins run from another checkout (e.g. a worktree of
 * the commit before a change, with its own node_modules), so that before and after are
 * measured in the same run.
 */
const baseline = process.env.BENCH_PEERS_BASELINE;

const ALL_PLUGINS: Plugin[] = [
  awsEncryptionProvider,
  trousseau('trousseau-aws', ['aws']),
  ...(baseline
    ? [
        trousseau('trousseau-aws-baseline', ['aws'], path.resolve(baseline)),
        trousseau('trousseau-multi-baseline', ['aws', 'vault', 'local'], path.resolve(baseline)),
        trousseau('trousseau-vault-baseline', ['vault'], path.resolve(baseline)),
      ]
    : []),
  trousseau('trousseau-multi', ['aws', 'vault', 'local']),
  vaultKubernetesKms,
  trousseau('trousseau-vault', ['vault']),
];

/**
 * Run only when BENCH_PEERS names them. trousseau-local: one local key file, no
 * backend server: the plugin's own cost per call (gRPC, engine, envelope), the floor
 * under every backend's. trousseau-aws-local and trousseau-aws-vault (quorum 2, both
 * copies required): what each backend adds to aws-only, to take trousseau-multi apart.
 */
const OPTIONAL_PLUGINS: Plugin[] = [
  trousseau('trousseau-local', ['local']),
  trousseau('trousseau-aws-local', ['aws', 'local']),
  trousseau('trousseau-aws-vault', ['aws', 'vault']),
];

interface GoloadResult {
  ops: number;
  errors: number;
  opsPerSec: number;
  p50: number;
  p99: number;
  warmup: number;
  clientCpuSeconds?: number;
  errorExamples: string[];
  seconds?: { ok: number; errors: number; p99: number | null }[];
}

function goload(args: string[]): Promise<GoloadResult> {
  return new Promise((resolve, reject) => {
    execFile(goloadBinary(), args, { maxBuffer: 16 * 1024 * 1024 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`goload ${args.join(' ')} failed: ${stderr || error.message}`));
      else resolve(JSON.parse(stdout) as GoloadResult);
    });
  });
}

interface Cell {
  round: number;
  opsPerSec: number;
  p50: number;
  p99: number;
  errors: number;
  cpuMsPer1000: number;
  /**
   * Where the rest of the machine's CPU went in the same interval, per 1,000 calls: the
   * backend servers (local-kms, OpenBao), the client, and every process together; and
   * how busy the machine's cores were (100 % = all of them). On a machine whose cores
   * the plugin shares with its servers and client, a plugin that makes more backend
   * calls per operation also takes more of the servers' CPU.
   */
  serversCpuMsPer1000: Record<string, number>;
  clientCpuMsPer1000: number;
  machineCpuMsPer1000: number;
  machineBusyPercent: number;
  rssMiB: number;
  load: string;
}

/** Busy and total CPU ticks of the whole machine so far (/proc/stat, first line; idle and iowait count as not busy). */
function machineTicks(): { busy: number; total: number } {
  const fields = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  const total = fields.reduce((a, b) => a + b, 0);
  return { busy: total - fields[3]! - fields[4]!, total };
}

async function measure(pid: number, socket: string, op: 'encrypt' | 'decrypt', seconds: number, roundNumber: number, servers: Record<string, number>): Promise<Cell> {
  const load = loadAverage();
  const before = cpuSeconds(pid);
  const serversBefore = Object.fromEntries(Object.entries(servers).map(([name, p]) => [name, cpuSeconds(p)]));
  const machineBefore = machineTicks();
  const r = await goload(['-socket', socket, '-op', op, '-concurrency', String(CONCURRENCY), '-seconds', String(seconds), '-warmup', String(WARMUP)]);
  const cpu = cpuSeconds(pid) - before;
  const machineAfter = machineTicks();
  // Every call the plugin answered in that time: measured, failed, warm-up, goload's first Encrypt.
  const calls = r.ops + r.errors + r.warmup + 1;
  const per1000 = (cpuS: number) => round((cpuS * 1e6) / calls, 0);
  const machineBusy = machineAfter.busy - machineBefore.busy;
  if (r.errors > 0) console.error(`peers: ${op} errors: ${r.errorExamples.join(' | ')}`);
  return {
    round: roundNumber,
    opsPerSec: r.opsPerSec,
    p50: r.p50,
    p99: r.p99,
    errors: r.errors,
    cpuMsPer1000: per1000(cpu),
    serversCpuMsPer1000: Object.fromEntries(Object.entries(servers).map(([name, p]) => [name, per1000(cpuSeconds(p) - serversBefore[name]!)])),
    clientCpuMsPer1000: per1000(r.clientCpuSeconds ?? NaN),
    // /proc/stat counts in clock ticks of 10 ms.
    machineCpuMsPer1000: per1000(machineBusy / 100),
    machineBusyPercent: round((100 * machineBusy) / (machineAfter.total - machineBefore.total), 0),
    rssMiB: rssMiB(pid),
    load,
  };
}

/** Backend requests per Encrypt and per Decrypt, seen by counting proxies in front of the servers. */
async function countRequests(plugin: Plugin, servers: Servers, parent: string): Promise<Record<string, unknown>> {
  const kmsProxy = await CountingProxy.start(servers.kmsEndpoint, awsOperation);
  const vaultProxy = await CountingProxy.start(servers.vault.VAULT_ADDR!, vaultOperation);
  const dir = await mkdtemp(path.join(parent, `count-${plugin.id}-`));
  const { child, socket } = await plugin.start(dir, { kmsEndpoint: kmsProxy.url, vault: { ...servers.vault, VAULT_ADDR: vaultProxy.url } });
  try {
    await sleep(500);
    kmsProxy.take();
    vaultProxy.take();
    const result: Record<string, unknown> = {};
    for (const op of ['decrypt', 'encrypt'] as const) {
      const r = await goload(['-socket', socket, '-op', op, '-concurrency', '4', '-seconds', '1', '-warmup', '0']);
      // goload's first call is always one Encrypt (the envelope a Decrypt loop reads).
      const calls = r.ops + r.errors;
      const requests = { aws: kmsProxy.take(), vault: vaultProxy.take() };
      result[op] = { calls, firstEncrypt: 1, requests };
    }
    return result;
  } finally {
    await stop(child);
    await Promise.all([kmsProxy.close(), vaultProxy.close()]);
  }
}

/** Requests of the backend operation `op` for each of `calls`, from countRequests' numbers. */
function perCall(counted: Record<string, unknown>, op: 'encrypt' | 'decrypt'): Record<string, number> {
  const entry = counted[op] as { calls: number; requests: Record<string, Record<string, number>> };
  const out: Record<string, number> = {};
  // Decrypt loop: its one first Encrypt's requests are in there too; a transit "keys"
  // read or a DescribeKey is shown as it is.
  for (const [server, ops] of Object.entries(entry.requests)) {
    for (const [name, n] of Object.entries(ops)) {
      const wanted = op === 'decrypt' ? /decrypt/i.test(name) : /encrypt|keys/i.test(name);
      if (wanted) out[`${server} ${name}`] = round(n / entry.calls, 3);
    }
  }
  return out;
}

interface OutageResult {
  plugin: string;
  frozen: string;
  perSecond: { ok: number; errors: number; p99: number | null }[];
  worstSecondP99Ms: number | null;
  secondsWithNoAnswer: number;
  errors: number;
  load: string;
}

async function outage(plugin: Plugin, socket: string, kms: ChildProcess): Promise<OutageResult> {
  const total = OUTAGE_BEFORE_S + OUTAGE_S + OUTAGE_AFTER_S;
  const load = loadAverage();
  const running = goload(['-socket', socket, '-op', 'decrypt', '-concurrency', String(CONCURRENCY), '-seconds', String(total), '-warmup', String(WARMUP), '-per-second']);
  // goload's warm-up takes a moment: measure from when the run began is approximate;
  // the per-second figures show the freeze in any case.
  await sleep(OUTAGE_BEFORE_S * 1000);
  kms.kill('SIGSTOP');
  await sleep(OUTAGE_S * 1000);
  kms.kill('SIGCONT');
  const r = await running;
  const seconds = r.seconds ?? [];
  const worstP99 = Math.max(...seconds.map((s) => s.p99 ?? Infinity));
  const errors = seconds.reduce((n, s) => n + s.errors, 0);
  return {
    plugin: plugin.id,
    frozen: `local-kms, seconds ${OUTAGE_BEFORE_S}-${OUTAGE_BEFORE_S + OUTAGE_S} of ${total} (approximately: goload's warm-up shifts its clock)`,
    perSecond: seconds.map((s) => ({ ok: s.ok, errors: s.errors, p99: s.p99 === null ? null : round(s.p99, 1) })),
    worstSecondP99Ms: Number.isFinite(worstP99) ? round(worstP99, 1) : null,
    secondsWithNoAnswer: seconds.filter((s) => s.ok === 0).length,
    errors,
    load,
  };
}

export interface PeersOptions {
  rounds?: number;
  seconds?: number;
}

export async function runPeers(options: PeersOptions = {}): Promise<Record<string, unknown>> {
  const rounds = options.rounds ?? 3;
  const seconds = options.seconds ?? 5;
  const only = process.env.BENCH_PEERS?.split(',').filter(Boolean);
  const skip = new Set(process.env.BENCH_PEERS_SKIP?.split(',') ?? []);
  const plugins = only ? [...ALL_PLUGINS, ...OPTIONAL_PLUGINS].filter((p) => only.includes(p.id)) : ALL_PLUGINS;
  goloadBinary(); // built before anything is measured
  const dir = await mkdtemp(path.join(os.tmpdir(), 'trousseau-peers-'));
  const kms = await startOwnLocalKms(dir);
  const servers: Servers = { kmsEndpoint: kms.endpoint, vault: serverEnv('openbao') };
  const running: { plugin: Plugin; child: ChildProcess; socket: string }[] = [];
  const result: Record<string, unknown> = { load: loadAverage(), concurrency: CONCURRENCY, seconds, rounds, client: 'go (bench/goload: grpc-go, k8s.io/kms v2, one connection)' };
  try {
    const requests: Record<string, unknown> = {};
    for (const plugin of skip.has('count') ? [] : plugins) {
      const counted = await countRequests(plugin, servers, dir);
      requests[plugin.id] = { perDecrypt: perCall(counted, 'decrypt'), perEncrypt: perCall(counted, 'encrypt'), raw: counted };
      console.error(`peers: ${plugin.id} backend requests per Decrypt ${JSON.stringify(perCall(counted, 'decrypt'))}, per Encrypt ${JSON.stringify(perCall(counted, 'encrypt'))}`);
    }
    result.requests = requests;

    for (const plugin of plugins) {
      const own = await mkdtemp(path.join(dir, `${plugin.id}-`));
      running.push({ plugin, ...(await plugin.start(own, servers)) });
    }
    const serverPids: Record<string, number> = { 'local-kms': kms.child.pid!, openbao: Number(readFileSync(path.join(root, '.servers', 'openbao.pid'), 'utf8')) };
    const cells = new Map<string, { decrypt: Cell[]; encrypt: Cell[] }>(plugins.map((p) => [p.id, { decrypt: [], encrypt: [] }]));
    for (let r = 1; r <= rounds; r++) {
      // Rotated each round, so no plugin always runs right after the same neighbour.
      const order = running.map((_, i) => running[(i + r - 1) % running.length]!);
      for (const { plugin, child, socket } of order) {
        for (const op of ['decrypt', 'encrypt'] as const) {
          const cell = await measure(child.pid!, socket, op, seconds, r, serverPids);
          cells.get(plugin.id)![op].push(cell);
          console.error(
            `peers round ${r} ${plugin.id.padEnd(24)} ${op.padEnd(7)} ${String(cell.opsPerSec).padStart(6)}/s  p99 ${cell.p99.toFixed(2).padStart(7)} ms  CPU ${String(cell.cpuMsPer1000).padStart(4)} ms/1000 (servers ${Object.entries(cell.serversCpuMsPer1000).map(([n, v]) => `${n} ${v}`).join(', ')}; client ${cell.clientCpuMsPer1000}; machine ${cell.machineCpuMsPer1000}, ${cell.machineBusyPercent} % busy)  RSS ${cell.rssMiB} MiB  errors ${cell.errors}  (load ${cell.load})`,
          );
        }
      }
    }
    const summary: Record<string, Record<string, number>> = {};
    for (const [id, { decrypt, encrypt }] of cells) {
      const m = (cs: Cell[], key: 'opsPerSec' | 'p99' | 'cpuMsPer1000' | 'machineCpuMsPer1000' | 'machineBusyPercent') => round(median(cs.map((c) => c[key])), key === 'p99' ? 2 : 0);
      summary[id] = {
        decryptPerSec: m(decrypt, 'opsPerSec'),
        decryptP99Ms: m(decrypt, 'p99'),
        decryptCpuMsPer1000: m(decrypt, 'cpuMsPer1000'),
        encryptPerSec: m(encrypt, 'opsPerSec'),
        encryptP99Ms: m(encrypt, 'p99'),
        encryptCpuMsPer1000: m(encrypt, 'cpuMsPer1000'),
        decryptMachineCpuMsPer1000: m(decrypt, 'machineCpuMsPer1000'),
        encryptMachineCpuMsPer1000: m(encrypt, 'machineCpuMsPer1000'),
        decryptMachineBusyPercent: m(decrypt, 'machineBusyPercent'),
        encryptMachineBusyPercent: m(encrypt, 'machineBusyPercent'),
        rssMiB: Math.max(...[...decrypt, ...encrypt].map((c) => c.rssMiB)),
        errors: [...decrypt, ...encrypt].reduce((n, c) => n + c.errors, 0),
      };
    }
    result.cells = Object.fromEntries(cells);
    result.summary = summary;
    result.ratios = ratios(summary);
    printSummary(summary, result.ratios as Record<string, Record<string, number>>);

    const outages = [];
    for (const { plugin, socket } of running) {
      if (!plugin.uses.includes('aws') || skip.has('outage')) continue;
      // Let breakers close and probes pass after the previous freeze.
      await sleep(6000);
      const o = await outage(plugin, socket, kms.child);
      outages.push(o);
      console.error(
        `peers outage ${plugin.id.padEnd(24)} worst per-second p99 ${String(o.worstSecondP99Ms)} ms, errors ${o.errors}, seconds with no answer ${o.secondsWithNoAnswer}; per second ${JSON.stringify(o.perSecond.map((s) => `${s.ok}/${s.errors}/${s.p99}`))} (ok/errors/p99 ms; load ${o.load})`,
      );
    }
    result.outage = outages;
    return result;
  } finally {
    kms.child.kill('SIGCONT');
    await Promise.all(running.map((p) => stop(p.child)));
    await kms.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

/** Trousseau against the peer for the same backend, and multi-backend against aws only. */
function ratios(summary: Record<string, Record<string, number>>): Record<string, Record<string, number>> {
  const pairs: [string, string][] = [
    ['trousseau-aws', 'aws-encryption-provider'],
    ['trousseau-aws-baseline', 'aws-encryption-provider'],
    ['trousseau-aws', 'trousseau-aws-baseline'],
    ['trousseau-local', 'aws-encryption-provider'],
    ['trousseau-multi', 'aws-encryption-provider'],
    ['trousseau-vault', 'vault-kubernetes-kms'],
    ['trousseau-multi', 'trousseau-aws'],
    ['trousseau-multi-baseline', 'trousseau-aws-baseline'],
    ['trousseau-multi', 'trousseau-multi-baseline'],
    ['trousseau-vault', 'trousseau-vault-baseline'],
    ['trousseau-vault-baseline', 'vault-kubernetes-kms'],
  ];
  const out: Record<string, Record<string, number>> = {};
  for (const [a, b] of pairs) {
    const x = summary[a];
    const y = summary[b];
    if (!x || !y) continue;
    out[`${a} / ${b}`] = Object.fromEntries(Object.keys(x).filter((k) => k !== 'errors').map((k) => [k, round(x[k]! / y[k]!, 2)]));
  }
  return out;
}

function printSummary(summary: Record<string, Record<string, number>>, ratioTable: Record<string, Record<string, number>>): void {
  console.error('\npeers, medians of the rounds (concurrency 16):');
  console.error(`${'plugin'.padEnd(24)} ${'Dec/s'.padStart(6)} ${'p99'.padStart(7)} ${'CPU/1k'.padStart(6)} ${'Enc/s'.padStart(6)} ${'p99'.padStart(7)} ${'CPU/1k'.padStart(6)} ${'RSS'.padStart(6)}`);
  for (const [id, s] of Object.entries(summary)) {
    console.error(
      `${id.padEnd(24)} ${String(s.decryptPerSec).padStart(6)} ${s.decryptP99Ms!.toFixed(2).padStart(7)} ${String(s.decryptCpuMsPer1000).padStart(6)} ${String(s.encryptPerSec).padStart(6)} ${s.encryptP99Ms!.toFixed(2).padStart(7)} ${String(s.encryptCpuMsPer1000).padStart(6)} ${String(s.rssMiB).padStart(6)}`,
    );
  }
  for (const [pair, r] of Object.entries(ratioTable)) console.error(`${pair}: ${JSON.stringify(r)}`);
}
