/**
 * Soak with zero loss: `npm run chaos -- --profile ci|long|short`.
 *
 * Runs `trousseau serve` as a child process against the three real servers (OpenBao,
 * local-kms, and lowkey-vault for Azure Key Vault), each behind a FaultProxy. Several concurrent gRPC clients
 * Encrypt and Decrypt while a schedule cycles faults across the backends, and every
 * envelope returned is kept with its plaintext. At the end, each backend alone (the
 * other two blackholed) must decrypt every envelope it holds a copy of to its original
 * plaintext. An envelope that fails is lost.
 *
 * Prints progress to stderr and ONE summary line to stdout containing `lost=<n>`;
 * exits 1 when anything was lost or corrupted, a client saw an error code that no
 * outage explains (INTERNAL, UNKNOWN, ...), or the plugin process died.
 *
 * Only 127.0.0.1 is contacted; every loop is bounded in count and time.
 */
import { randomBytes, randomInt } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import type * as T from '../../src/kms/types.ts';
import {
  BACKENDS,
  Recorder,
  adminStatus,
  backendEnv,
  chaosConfig,
  chaosServers,
  closeProxies,
  copiesOf,
  decrypt,
  encrypt,
  isUp,
  percentile,
  pool,
  sleep,
  startChild,
  startProxies,
  tempDir,
  unreachableServers,
  type BackendName,
  type ChildPlugin,
  type Proxies,
} from './rig.ts';

interface Profile {
  /** Length of one phase of the schedule. */
  phaseMs: number;
  /** How many times the schedule runs. */
  cycles: number;
  clients: number;
  /** Hard cap on client operations (Encrypt + Decrypt), whatever the time. */
  maxOps: number;
  /** Pause of each client between rounds: bounds the envelopes the final check must read. */
  thinkMs: number;
}

const PROFILES: Record<string, Profile> = {
  // ~30 s: the ava test (test/chaos/soak.test.ts).
  short: { phaseMs: 1000, cycles: 1, clients: 3, maxOps: 20_000, thinkMs: 5 },
  // ~2 minutes.
  ci: { phaseMs: 4500, cycles: 1, clients: 6, maxOps: 120_000, thinkMs: 20 },
  // ~15 minutes: two cycles of 27 s phases.
  long: { phaseMs: 27_000, cycles: 2, clients: 8, maxOps: 1_500_000, thinkMs: 250 },
};

interface Phase {
  name: string;
  /** Backends this phase makes unusable: a copy from any other one is readable. */
  down: BackendName[];
  /** Faults to apply at the start of the phase (backends not named pass). */
  apply: (p: Proxies) => Promise<void>;
  /** Called every second during the phase (flapping). */
  tick?: (p: Proxies, second: number) => Promise<void>;
}

const SCHEDULE: Phase[] = [
  { name: 'baseline', down: [], apply: async () => undefined },
  { name: 'vault-blackhole', down: ['vault'], apply: (p) => p.vault.blackhole() },
  { name: 'aws-503', down: ['aws'], apply: (p) => p.aws.httpStatus(503) },
  { name: 'azure-refuse', down: ['azure'], apply: (p) => p.azure.refuse('close') },
  // 1 % of aws requests 2 s late (past the timeout), so aws counts as down.
  { name: 'vault-latency+aws-tail', down: ['aws'], apply: async (p) => (await p.vault.latency(80, 60), await p.aws.heavyTail(0.01, 2000)) },
  { name: 'aws-429', down: ['aws'], apply: (p) => p.aws.httpStatus(429, 1) },
  { name: 'azure-reset-response', down: ['azure'], apply: (p) => p.azure.resetMidResponse(20) },
  { name: 'vault-reset-request', down: ['vault'], apply: (p) => p.vault.resetMidRequest(20) },
  { name: 'aws-slow', down: ['aws'], apply: (p) => p.aws.latency(700, 100) },
  { name: 'azure-flap', down: ['azure'], apply: async () => undefined, tick: (p, s) => (s % 2 === 0 ? p.azure.blackhole() : p.azure.pass()) },
  { name: 'vault+azure-down', down: ['vault', 'azure'], apply: async (p) => (await p.vault.blackhole(), await p.azure.blackhole()) },
  { name: 'all-down', down: ['vault', 'aws', 'azure'], apply: async (p) => (await p.vault.refuse('reset'), await p.aws.blackhole(), await p.azure.refuse('close')) },
  { name: 'azure-tail+vault-503', down: ['vault', 'azure'], apply: async (p) => (await p.azure.heavyTail(0.05, 2000), await p.vault.httpStatus(503)) },
  { name: 'aws-reset-connect', down: ['aws'], apply: (p) => p.aws.refuse('reset') },
  { name: 'vault-refuse+aws-latency', down: ['vault'], apply: async (p) => (await p.vault.refuse('close'), await p.aws.latency(50, 50)) },
  { name: 'final-baseline', down: [], apply: async () => undefined },
];

/** gRPC codes an outage explains. Anything else reaching a client is a bug. */
const EXPECTED_FAILURES = new Set(['UNAVAILABLE', 'DEADLINE_EXCEEDED']);

interface Kept {
  plaintext: Buffer;
  encrypted: T.V2EncryptResponse;
  copies: string[];
}

function log(message: string): void {
  process.stderr.write(`[chaos ${new Date().toISOString().slice(11, 19)}] ${message}\n`);
}

function rssMb(pid: number | undefined): number | undefined {
  if (!pid) return undefined;
  try {
    const match = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return match ? Math.round(Number(match[1]) / 1024) : undefined;
  } catch {
    return undefined;
  }
}

async function main(): Promise<number> {
  const { values } = parseArgs({ options: { profile: { type: 'string', default: 'ci' } }, allowPositionals: false });
  const profileName = values.profile;
  const profile = PROFILES[profileName];
  if (!profile) throw new Error(`unknown profile ${profileName} (ci, long, short)`);
  const servers = chaosServers();
  if ('missing' in servers) throw new Error(`real servers missing (${servers.missing.join(', ')}): start them with test/servers/up.sh openbao local-kms lowkey-vault`);
  const gone = await unreachableServers(servers);
  if (gone.length > 0) throw new Error(`real server(s) not answering: ${gone.join(', ')}; start them with test/servers/up.sh openbao local-kms lowkey-vault`);

  const started = performance.now();
  const { dir, remove } = await tempDir();
  const proxies = await startProxies(servers);
  let plugin: ChildPlugin | undefined;
  try {
    plugin = await startChild(
      { ...chaosConfig(servers, proxies, path.join(dir, 'kms.sock')), log: { level: 'error' } },
      dir,
      backendEnv(servers),
    );
    const child = plugin;
    let crashed = false;
    let stopping = false;
    void child.exited.then(() => (crashed = !stopping));
    const rssStart = rssMb(child.child.pid);
    log(`profile ${profileName}: ${SCHEDULE.length} phases x ${profile.phaseMs} ms x ${profile.cycles} cycle(s), ${profile.clients} clients; azure = ${servers.azureServer}`);

    // ---------------------------------------------------------- load under faults
    const kept: Kept[] = [];
    const total = new Recorder();
    const phaseStats: { name: string; rec: Recorder; settleMs: number; rss: number }[] = [];
    let current = new Recorder();
    let currentDown: readonly BackendName[] = [];
    let inPhase = false;
    /**
     * Bumped whenever a phase starts or ends. A call is judged against a phase's
     * faults only if it started and ended inside that same phase: a Decrypt started
     * under "vault+azure down" that outlives the settle and ends in the next phase
     * ("aws down") did not have a readable copy when it ran.
     */
    let phaseGeneration = 0;
    const within = () => ({ inPhase, generation: phaseGeneration });
    const stillWithin = (at: { inPhase: boolean; generation: number }) => at.inPhase && at.generation === phaseGeneration;
    /** Decrypt failures while the envelope held a copy from a backend the phase left up. */
    let readableFailures = 0;
    /** Encrypt failures while at most one backend was down (quorum 2 of 3 reachable). */
    let quorumFailures = 0;
    let ops = 0;
    let corrupt = 0;
    let running = true;

    const clientLoop = async (id: number) => {
      while (running && ops < profile.maxOps && !crashed) {
        const plaintext = randomBytes(randomInt(1, 600));
        const encryptStarted = within();
        const e = await encrypt(child.clients, plaintext, `soak-${id}`);
        ops++;
        current.add('encrypt', e);
        total.add('encrypt', e);
        if (!e.ok && stillWithin(encryptStarted) && currentDown.length <= 1) {
          quorumFailures++;
          log(`Encrypt failed with at most one backend down (${e.code} after ${Math.round(e.ms)} ms): ${e.detail ?? ''}`);
        }
        if (e.ok) kept.push({ plaintext, encrypted: e.value!, copies: copiesOf(e.value!) });
        if (kept.length === 0) continue;
        const pick = kept[randomInt(0, kept.length)]!;
        const decryptStarted = within();
        const d = await decrypt(child.clients, pick.encrypted, `soak-${id}`);
        ops++;
        if (d.ok && !d.value!.equals(pick.plaintext)) {
          corrupt++;
          d.ok = false;
          d.code = 'WRONG_PLAINTEXT';
        }
        current.add('decrypt', d);
        total.add('decrypt', d);
        if (!d.ok && stillWithin(decryptStarted) && pick.copies.some((c) => !currentDown.includes(c as BackendName))) {
          readableFailures++;
          log(`Decrypt failed with a readable copy (${pick.copies.join('+')}; ${d.code} after ${Math.round(d.ms)} ms): ${d.detail ?? ''}`);
        }
        if (profile.thinkMs > 0) await sleep(profile.thinkMs);
      }
    };
    const clients = Array.from({ length: profile.clients }, (_, i) => clientLoop(i));

    for (let cycle = 0; cycle < profile.cycles && !crashed && ops < profile.maxOps; cycle++) {
      for (const phase of SCHEDULE) {
        if (crashed || ops >= profile.maxOps) break;
        // Settle between phases (every backend back and up), so each phase measures
        // its own fault and not the healing of the previous one; the time it takes
        // is the recovery time.
        inPhase = false;
        phaseGeneration++;
        current = new Recorder();
        await Promise.all(BACKENDS.map((b) => proxies[b].pass()));
        const settleStarted = performance.now();
        // Requests a heavy tail still delays (up to 2 s) end at the plugin as timeouts
        // after the switch to `pass`: waited for here, or the breaker they open is
        // blamed on the next phase, where that backend is meant to be up.
        await Promise.all(BACKENDS.map((b) => proxies[b].drained()));
        await waitFor(child, (view) => BACKENDS.every((b) => isUp(view, b)), 15_000);
        const settleMs = performance.now() - settleStarted;
        await phase.apply(proxies);
        current = new Recorder();
        currentDown = phase.down;
        inPhase = true;
        phaseGeneration++;
        phaseStats.push({ name: phase.name, rec: current, settleMs, rss: 0 });
        const phaseEnd = Date.now() + profile.phaseMs;
        for (let second = 0; Date.now() < phaseEnd && !crashed; second++) {
          await phase.tick?.(proxies, second);
          await sleep(Math.min(1000, Math.max(0, phaseEnd - Date.now())));
        }
        inPhase = false;
        phaseGeneration++;
        phaseStats.at(-1)!.rss = rssMb(child.child.pid) ?? 0;
        log(`${phase.name.padEnd(26)} ${describeRec(phaseStats.at(-1)!.rec)} (settled before in ${Math.round(settleMs)} ms; plugin rss ${phaseStats.at(-1)!.rss} MB)`);
      }
    }
    running = false;
    await Promise.all(clients);
    await Promise.all(BACKENDS.map((b) => proxies[b].pass()));

    // ---------------------------------------------------------- zero-loss check
    const lostIds = new Set<Kept>();
    const verified: Record<string, number> = {};
    const lostBy: Record<string, number> = {};
    const verifyRec = new Recorder();
    if (!crashed) {
      for (const only of BACKENDS) {
        const others = BACKENDS.filter((b) => b !== only);
        await Promise.all(others.map((b) => proxies[b].blackhole()));
        await waitFor(child, (view) => isUp(view, only) && others.every((b) => !isUp(view, b)), 15_000);
        const mine = kept.filter((k) => k.copies.includes(only));
        verified[only] = mine.length;
        lostBy[only] = 0;
        await pool(mine, 8, async (k) => {
          // Lost means the backend, reachable, cannot open it. A transient UNAVAILABLE
          // (an overloaded test server timing out, its breaker briefly open) is retried
          // for up to ~15 s, past the breaker's reset, before an envelope counts as lost.
          for (let attempt = 0; attempt < 8; attempt++) {
            const d = await decrypt(child.clients, k.encrypted, 'soak-verify');
            verifyRec.add('decrypt', d);
            if (d.ok && d.value!.equals(k.plaintext)) return;
            if (d.ok) break; // a wrong plaintext will not right itself
            await sleep(Math.min(4000, 250 * 2 ** attempt));
          }
          lostBy[only]!++;
          lostIds.add(k);
        });
        log(`verify ${only} alone: ${mine.length} envelopes, ${lostBy[only]} lost; ${describeRec(verifyRec)}`);
        await Promise.all(others.map((b) => proxies[b].pass()));
        await waitFor(child, (view) => BACKENDS.every((b) => isUp(view, b)), 15_000);
      }
    }
    const rssEnd = rssMb(child.child.pid);
    stopping = true;
    await child.stop();
    const exitCode = await child.exited;

    // ---------------------------------------------------------- one summary line
    const lost = lostIds.size + corrupt;
    const unexpected: Record<string, number> = {};
    for (const op of ['encrypt', 'decrypt'] as const) {
      for (const [code, n] of Object.entries(total.errors(op))) if (!EXPECTED_FAILURES.has(code) && code !== 'WRONG_PLAINTEXT') unexpected[code] = (unexpected[code] ?? 0) + n;
    }
    // "An envelope never carries a key_id that claims copies it lacks": a full key_id
    // claims every backend. (A partial one names a set this driver cannot decode.)
    const overclaimed = kept.filter((k) => !k.encrypted.key_id.endsWith('-partial') && k.copies.length < BACKENDS.length).length;
    const copyHistogram = [1, 2, 3].map((n) => `${n}:${kept.filter((k) => k.copies.length === n).length}`).join(',');
    const parts = [
      `chaos-soak profile=${profileName}`,
      `lost=${lost}`,
      `corrupt=${corrupt}`,
      `crashed=${crashed ? 1 : 0}`,
      `plugin_exit=${exitCode}`,
      `duration=${Math.round((performance.now() - started) / 1000)}s`,
      `ops=${total.count('encrypt') + total.count('decrypt')}`,
      `encrypt=${codes(total, 'encrypt')}`,
      `decrypt=${codes(total, 'decrypt')}`,
      `unexpected=${JSON.stringify(unexpected)}`,
      `overclaimed=${overclaimed}`,
      `readable_decrypt_errors=${readableFailures}`,
      `quorum_encrypt_errors=${quorumFailures}`,
      `envelopes=${kept.length} copies=${copyHistogram}`,
      `verified=${BACKENDS.map((b) => `${b}:${verified[b] ?? 0}/lost:${lostBy[b] ?? 0}`).join(',')}`,
      `rss_mb=${rssStart ?? '?'}->${rssEnd ?? '?'}`,
      `azure=${servers.azureServer.replace(/\s+/g, '_')}`,
      `settle_p50/max=${Math.round(percentile(phaseStats.map((p) => p.settleMs), 50) ?? 0)}/${Math.round(Math.max(0, ...phaseStats.map((p) => p.settleMs)))}ms`,
      `phases=[${phaseStats.map(({ name, rec }) => `${name} ${describeRec(rec)}`).join('; ')}]`,
    ];
    process.stdout.write(`${parts.join(' ')}\n`);
    return lost > 0 || overclaimed > 0 || crashed || Object.keys(unexpected).length > 0 || exitCode !== 0 ? 1 : 0;
  } finally {
    await plugin?.stop().catch(() => undefined);
    await closeProxies(proxies);
    await remove();
  }
}

function codes(rec: Recorder, op: 'encrypt' | 'decrypt'): string {
  const ok = rec.count(op, 'OK');
  const errors = Object.entries(rec.errors(op)).map(([c, n]) => `${c}:${n}`);
  return [`OK:${ok}`, ...errors].join('/');
}

function describeRec(rec: Recorder): string {
  const fmt = (v: number | undefined) => (v === undefined ? '-' : String(Math.round(v)));
  return (['encrypt', 'decrypt'] as const)
    .map((op) => {
      const errors = Object.entries(rec.errors(op)).map(([c, n]) => `${c}:${n}`).join('/');
      return `${op[0]}=${rec.count(op)}${errors ? `(${errors})` : ''} p50/p99=${fmt(rec.p(op, 50))}/${fmt(rec.p(op, 99))}ms`;
    })
    .join(' ');
}

async function waitFor(child: ChildPlugin, check: (view: Awaited<ReturnType<typeof adminStatus>>) => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    // Calls keep the breakers learning; the probes alone would get there too, only slower.
    const view = await adminStatus(child.clients).catch(() => undefined);
    if (view && check(view)) return;
    if (Date.now() > deadline) throw new Error(`backends did not reach the expected state within ${timeoutMs} ms: ${JSON.stringify(view?.backends)}`);
    await sleep(100);
  }
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    process.stderr.write(`chaos soak failed: ${error instanceof Error ? error.message : String(error)}\n`);
    process.stdout.write('chaos-soak lost=unknown error=1\n');
    process.exit(2);
  },
);
