/**
 * Chaos scenarios against the real backend servers: OpenBao (vault), local-kms (aws)
 * and lowkey-vault (azure; the open-source Azure Key Vault emulator, over HTTPS).
 * Each backend sits behind a FaultProxy; the plugin is
 * configured with quorum 2 and short timeouts, and driven through its gRPC socket.
 *
 * Every scenario asserts what a client (the apiserver) sees, a latency bound (Decrypt
 * p99 < 3000 ms wherever one copy is readable, the apiserver's own deadline), and logs
 * a table of operations, errors by gRPC code, p50 and p99.
 *
 * HTTP answers (5xx, 429) are injected for vault and aws only: azure speaks TLS, and a
 * TCP proxy cannot forge an HTTP status inside a TLS stream, so azure gets TCP-level
 * faults (blackhole, refuse, slow, resets).
 */
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import type * as T from '../../src/kms/types.ts';
import type { FaultProxy } from './fault-proxy.ts';
import {
  BACKENDS,
  DEFAULT_TIMING,
  Recorder,
  adminStatus,
  applyBackendEnv,
  backendEnv,
  backendOf,
  chaosConfig,
  chaosServers,
  closeProxies,
  copiesOf,
  decrypt,
  encrypt,
  eventually,
  gcFunction,
  isUp,
  pool,
  sleep,
  startChild,
  startInProcess,
  startProxies,
  status,
  tempDir,
  timeoutOf,
  type BackendName,
  type ChaosServers,
  type Proxies,
  type Running,
  type Timing,
  unreachableServers,
} from './rig.ts';

const DECRYPT_P99_BOUND_MS = 3000;

interface Envelope {
  plaintext: Buffer;
  encrypted: T.V2EncryptResponse;
}

interface Rig {
  proxies: Proxies;
  run: Running;
  dir: string;
  timing: Timing;
  /** Envelopes written while every backend was healthy (three copies each). */
  baseline: Envelope[];
}

const found = chaosServers();

if ('missing' in found) {
  const reason = `real servers missing (${found.missing.join(', ')}): start them with test/servers/up.sh openbao local-kms lowkey-vault`;
  if (process.env.CI) throw new Error(reason);
  console.error(`\n!!! ${reason} (chaos scenarios are SKIPPED)\n`);
  test.skip('chaos scenarios against the real servers', () => {});
} else {
  const servers: ChaosServers = found;
  applyBackendEnv(servers);
  const azureLabel = servers.azureServer;

  async function serversAnswer(t: ExecutionContext): Promise<void> {
    const gone = await unreachableServers(servers);
    if (gone.length > 0) {
      throw new Error(`real server(s) not answering: ${gone.join(', ')} (stopped by another run?); restart with test/servers/up.sh openbao local-kms lowkey-vault`);
    }
    t.pass();
  }

  async function setup(t: ExecutionContext, timing: Partial<Timing> = {}, baselineCount = 12): Promise<Rig> {
    await serversAnswer(t);
    const { dir, remove } = await tempDir();
    t.teardown(remove);
    const proxies = await startProxies(servers);
    t.teardown(() => closeProxies(proxies));
    const full = { ...DEFAULT_TIMING, ...timing };
    const run = await startInProcess(chaosConfig(servers, proxies, path.join(dir, 'kms.sock'), full), dir);
    t.teardown(() => run.stop());
    const baseline = await writeEnvelopes(t, run, baselineCount);
    return { proxies, run, dir, timing: full, baseline };
  }

  /**
   * Envelopes with all three copies. On a loaded machine a healthy backend can still
   * miss the straggler grace (its copy is then rightly left out), so retry a few times.
   */
  async function writeEnvelopes(t: ExecutionContext, run: Running, count: number): Promise<Envelope[]> {
    const out: Envelope[] = [];
    for (let i = 0; out.length < count && i < count * 4; i++) {
      const plaintext = randomBytes(16 + (i % 200));
      const result = await encrypt(run.clients, plaintext);
      if (result.ok && copiesOf(result.value!).length === 3) out.push({ plaintext, encrypted: result.value! });
    }
    t.is(out.length, count, 'healthy Encrypts carry every copy');
    return out;
  }

  interface LoadResult {
    rec: Recorder;
    written: Envelope[];
    mismatches: number;
  }

  /**
   * Mixed load: each worker encrypts a fresh plaintext, then decrypts one envelope
   * from `readable` (or its own when `readable` is empty) and checks the plaintext.
   */
  async function load(run: Running, options: { ops: number; concurrency?: number; readable: Envelope[]; maxMs?: number; rec?: Recorder }): Promise<LoadResult> {
    const rec = options.rec ?? new Recorder();
    const written: Envelope[] = [];
    let mismatches = 0;
    const deadline = Date.now() + (options.maxMs ?? 30_000);
    await pool(
      Array.from({ length: options.ops }, (_, i) => i),
      options.concurrency ?? 4,
      async (i) => {
        if (Date.now() > deadline) return;
        const plaintext = randomBytes(8 + (i % 300));
        const e = await encrypt(run.clients, plaintext);
        rec.add('encrypt', e);
        if (e.ok) written.push({ plaintext, encrypted: e.value! });
        const pick = options.readable.length > 0 ? options.readable[i % options.readable.length]! : e.ok ? { plaintext, encrypted: e.value! } : undefined;
        if (!pick) return;
        const d = await decrypt(run.clients, pick.encrypted);
        if (d.ok && !d.value!.equals(pick.plaintext)) {
          mismatches++;
          d.ok = false;
          d.code = 'WRONG_PLAINTEXT';
        }
        rec.add('decrypt', d);
      },
    );
    return { rec, written, mismatches };
  }

  async function decryptAll(run: Running, envelopes: readonly Envelope[], rec: Recorder, concurrency = 4): Promise<void> {
    await pool(envelopes, concurrency, async (e) => {
      const d = await decrypt(run.clients, e.encrypted);
      if (d.ok && !d.value!.equals(e.plaintext)) {
        d.ok = false;
        d.code = 'WRONG_PLAINTEXT';
      }
      rec.add('decrypt', d);
    });
  }

  type Fault = { name: string; apply: (p: FaultProxy, timeoutMs: number) => Promise<void>; http?: true };
  const FAULTS: Fault[] = [
    { name: 'blackholed', apply: (p) => p.blackhole() },
    { name: 'refused', apply: (p) => p.refuse('close') },
    { name: 'reset on connect', apply: (p) => p.refuse('reset') },
    { name: `slowed past its timeout`, apply: (p, timeoutMs) => p.latency(timeoutMs + 300, 100) },
    { name: 'reset mid-request', apply: (p) => p.resetMidRequest(20) },
    { name: 'reset mid-response', apply: (p) => p.resetMidResponse(20) },
    { name: 'answering 503', apply: (p) => p.httpStatus(503), http: true },
    { name: 'answering 429', apply: (p) => p.httpStatus(429, 1), http: true },
  ];

  const label = (b: BackendName) => (b === 'azure' ? `azure (${azureLabel})` : b === 'aws' ? 'aws (local-kms)' : 'vault (OpenBao)');

  // ------------------------------------------------------------ one backend down

  for (const backend of BACKENDS) {
    for (const fault of FAULTS) {
      if (fault.http && backend === 'azure') continue; // TLS: no HTTP status from a TCP proxy (see top)
      test.serial(`one backend down: ${label(backend)} ${fault.name} -> Encrypt and Decrypt succeed with the other two`, async (t) => {
        const rig = await setup(t);
        await fault.apply(rig.proxies[backend], timeoutOf(backend, rig.timing));
        const { rec, written, mismatches } = await load(rig.run, { ops: 40, readable: rig.baseline });
        await decryptAll(rig.run, written, rec);
        t.log(rec.table(`${label(backend)} ${rig.proxies[backend].describe()} (proxy stats ${JSON.stringify(rig.proxies[backend].stats)})`));
        t.is(mismatches, 0);
        t.deepEqual(rec.errors('encrypt'), {}, 'every Encrypt reaches quorum 2 with the other two');
        t.deepEqual(rec.errors('decrypt'), {}, 'every Decrypt succeeds');
        t.is(written.length, 40);
        for (const e of written) {
          const copies = copiesOf(e.encrypted);
          t.true(copies.length >= 2);
          // A full key_id claims every copy: an envelope lacking one must carry a partial key_id.
          if (copies.length < 3) t.true(e.encrypted.key_id.endsWith('-partial'), `key_id ${e.encrypted.key_id} on an envelope with only ${copies.join('+')}`);
        }
        t.true(rec.p('decrypt', 99)! < DECRYPT_P99_BOUND_MS, `decrypt p99 ${rec.p('decrypt', 99)} ms`);
        t.true(rec.p('encrypt', 99)! < DECRYPT_P99_BOUND_MS, `encrypt p99 ${rec.p('encrypt', 99)} ms`);
      });
    }
  }

  // ------------------------------------------------------------ two of three down

  for (const [down, how] of [
    [['vault', 'aws'], 'blackholed'],
    [['aws', 'azure'], 'refused'],
    [['vault', 'azure'], 'answering 503 / reset'],
  ] as const) {
    const survivor = BACKENDS.find((b) => !(down as readonly string[]).includes(b))!;
    test.serial(`two of three down (${down.join(' + ')} ${how}): Encrypt fails fast with UNAVAILABLE, Decrypt succeeds through ${survivor}`, async (t) => {
      const rig = await setup(t);
      for (const b of down) {
        const proxy = rig.proxies[b];
        if (how === 'blackholed') await proxy.blackhole();
        else if (how === 'refused') await proxy.refuse();
        else if (proxy.tls) await proxy.resetMidResponse();
        else await proxy.httpStatus(503);
      }
      const rec = new Recorder();
      for (let i = 0; i < 40; i++) {
        rec.add('encrypt', await encrypt(rig.run.clients, randomBytes(32)));
      }
      await decryptAll(rig.run, rig.baseline, rec);
      t.log(rec.table(`${down.join(' + ')} ${how}; survivor ${label(survivor)}`));
      t.deepEqual(Object.keys(rec.errors('encrypt')), ['UNAVAILABLE'], 'Encrypt below quorum is UNAVAILABLE, never a timeout or an internal error');
      t.is(rec.count('encrypt', 'UNAVAILABLE'), 40);
      // Fast: at most one per-call timeout while the breakers learn, then at once.
      t.true(rec.p('encrypt', 50)! < 250, `encrypt p50 ${rec.p('encrypt', 50)} ms`);
      t.true(rec.p('encrypt', 99)! < Math.max(...down.map((b) => timeoutOf(b, rig.timing))) + 700, `encrypt p99 ${rec.p('encrypt', 99)} ms`);
      t.deepEqual(rec.errors('decrypt'), {});
      t.true(rec.p('decrypt', 99)! < DECRYPT_P99_BOUND_MS);
      const view = await adminStatus(rig.run.clients);
      t.true(isUp(view, survivor), JSON.stringify(view.backends));
      const s = await status(rig.run.clients);
      // Below quorum: Status still answers (the frozen key_id, reads work) but says so.
      t.true(s.ok && s.value!.healthz.startsWith('below quorum: 1 of 2 required backends usable'), `Status below quorum: ${JSON.stringify(s)}`);
    });
  }

  // ------------------------------------------------------------ flapping

  test.serial('flapping backend (aws up 2 s / down 2 s for 10 s): no Decrypt error, the key_id changes at most once', async (t) => {
    // recoverAfterMs must exceed the up period: that is the hysteresis that stops a
    // rotation storm (with 1000 ms the key_id would legitimately return to full in
    // every 2 s up phase; docs/chaos.md).
    const rig = await setup(t, { recoverAfterMs: 3000 });
    const before = await status(rig.run.clients);
    t.true(before.ok);
    const keyIds: string[] = [before.value!.key_id];
    let flapping = true;
    const flapper = (async () => {
      const started = Date.now();
      let down = false;
      while (Date.now() - started < 10_000) {
        down = !down;
        if (down) await rig.proxies.aws.blackhole();
        else await rig.proxies.aws.pass();
        await sleep(2000);
      }
      await rig.proxies.aws.pass();
      flapping = false;
    })();
    const poller = (async () => {
      while (flapping) {
        const s = await status(rig.run.clients);
        if (s.ok && s.value!.key_id !== keyIds.at(-1)) keyIds.push(s.value!.key_id);
        await sleep(100);
      }
    })();
    const rec = new Recorder();
    const written: Envelope[] = [];
    let mismatches = 0;
    while (flapping) {
      const r = await load(rig.run, { ops: 8, readable: [...rig.baseline, ...written.slice(-50)], rec });
      written.push(...r.written);
      mismatches += r.mismatches;
    }
    await Promise.all([flapper, poller]);
    t.log(rec.table(`aws flapping 2 s/2 s (blackhole) for 10 s; key_ids seen: ${keyIds.length} (${keyIds.map((k) => (k.endsWith('-partial') ? 'partial' : 'full')).join(' -> ')})`));
    t.is(mismatches, 0);
    t.deepEqual(rec.errors('decrypt'), {}, 'no Decrypt error reaches the client while another copy is readable');
    t.deepEqual(rec.errors('encrypt'), {}, 'Encrypt keeps quorum with vault and azure');
    t.true(keyIds.length <= 2, `key_id changed ${keyIds.length - 1} times`);
    t.true(rec.p('decrypt', 99)! < DECRYPT_P99_BOUND_MS);
    t.true(rec.count('decrypt') > 50, 'the load really ran');
  });

  // ------------------------------------------------------------ recovery

  for (const backend of BACKENDS) {
    test.serial(`recovery: ${label(backend)} back to health is used again within resetTimeout + probe interval, admin Status shows it closed and up`, async (t) => {
      const rig = await setup(t);
      await rig.proxies[backend].blackhole();
      // Drive calls until the plugin knows it is down and Encrypts lack its copy.
      await eventually(async () => {
        const e = await encrypt(rig.run.clients, randomBytes(32));
        const view = await adminStatus(rig.run.clients);
        return e.ok && !copiesOf(e.value!).includes(backend) && !isUp(view, backend) ? true : undefined;
      }, 5000, 50);
      const down = backendOf(await adminStatus(rig.run.clients), backend);
      t.log(`${label(backend)} down: breaker=${down.breaker} probeOk=${down.probeOk} lastError=${down.lastError}`);
      // Stay down long enough for the breaker to cycle through failed trials.
      await sleep(rig.timing.resetTimeoutMs + 300);
      await rig.proxies[backend].pass();
      const restored = performance.now();
      const rec = new Recorder();
      const usedAfter = await eventually(async () => {
        const e = await encrypt(rig.run.clients, randomBytes(32));
        rec.add('encrypt', e);
        return e.ok && copiesOf(e.value!).includes(backend) ? performance.now() - restored : undefined;
      }, 5000, 20);
      const upAfter = await eventually(async () => (isUp(await adminStatus(rig.run.clients), backend) ? performance.now() - restored : undefined), 5000, 20);
      const bound = rig.timing.resetTimeoutMs + rig.timing.probeIntervalMs + 700;
      t.log(rec.table(`${label(backend)} recovered: used again after ${Math.round(usedAfter)} ms, admin up after ${Math.round(upAfter)} ms (bound ${bound} ms)`));
      t.true(usedAfter < bound, `used again after ${Math.round(usedAfter)} ms`);
      t.true(upAfter < bound, `admin status up after ${Math.round(upAfter)} ms`);
      const view = await adminStatus(rig.run.clients);
      t.is(backendOf(view, backend).breaker, 'closed');
      t.true(backendOf(view, backend).probeOk);
      t.deepEqual(rec.errors('encrypt'), {});
    });
  }

  // ------------------------------------------------------------ all down

  test.serial('all three down: clean UNAVAILABLE, Status errors, no crash, bounded heap, automatic recovery when one returns', async (t) => {
    const rig = await setup(t);
    await Promise.all([rig.proxies.vault.blackhole(), rig.proxies.aws.refuse(), rig.proxies.azure.blackhole()]);
    const rec = new Recorder();
    const cycle = async (n: number) => {
      await pool(
        Array.from({ length: n }, (_, i) => i),
        8,
        async (i) => {
          rec.add('encrypt', await encrypt(rig.run.clients, randomBytes(64)));
          rec.add('decrypt', await decrypt(rig.run.clients, rig.baseline[i % rig.baseline.length]!.encrypted));
        },
      );
    };
    await cycle(100); // warm-up: breakers open, pools settle
    const statusError = await eventually(async () => {
      const s = await status(rig.run.clients);
      return s.ok ? undefined : s.code;
    }, 5000);
    t.is(statusError, 'UNAVAILABLE', 'Status is a gRPC UNAVAILABLE when no backend is usable');

    const gc = gcFunction();
    gc?.();
    const heapBefore = process.memoryUsage().heapUsed;
    await cycle(1500);
    gc?.();
    const heapAfter = process.memoryUsage().heapUsed;
    const growthMb = (heapAfter - heapBefore) / 1024 / 1024;
    t.log(rec.table(`all down (vault blackhole, aws refuse, azure blackhole); heap growth over 1500 rounds ${growthMb.toFixed(1)} MB (gc ${gc ? 'forced' : 'unavailable'})`));
    t.deepEqual(Object.keys(rec.errors('encrypt')), ['UNAVAILABLE']);
    t.deepEqual(Object.keys(rec.errors('decrypt')), ['UNAVAILABLE']);
    t.is(rec.count('encrypt', 'OK') + rec.count('decrypt', 'OK'), 0);
    t.true(growthMb < (gc ? 8 : 64), `heap grew ${growthMb.toFixed(1)} MB`);
    t.true(rec.p('decrypt', 99)! < DECRYPT_P99_BOUND_MS, 'failing Decrypts also end within the deadline');

    // One returns: Status and Decrypt recover by themselves; Encrypt still needs two.
    await rig.proxies.azure.pass();
    const restored = performance.now();
    await eventually(async () => ((await status(rig.run.clients)).ok ? true : undefined), 5000, 20);
    const statusBack = performance.now() - restored;
    const after = new Recorder();
    await decryptAll(rig.run, rig.baseline, after);
    after.add('encrypt', await encrypt(rig.run.clients, randomBytes(32)));
    await rig.proxies.vault.pass();
    await eventually(async () => (isUp(await adminStatus(rig.run.clients), 'vault') ? true : undefined), 5000, 20);
    const e = await encrypt(rig.run.clients, randomBytes(32));
    after.add('encrypt', e);
    t.log(after.table(`azure back: Status ok after ${Math.round(statusBack)} ms; then vault back`));
    t.true(statusBack < rig.timing.resetTimeoutMs + rig.timing.probeIntervalMs + 700);
    t.deepEqual(after.errors('decrypt'), {});
    t.is(after.count('encrypt', 'UNAVAILABLE'), 1, 'with one backend Encrypt is still below quorum');
    t.true(e.ok, 'with two backends back Encrypt succeeds');
  });

  // ------------------------------------------------------------ restart mid-outage

  test.serial('plugin process restarted in the middle of an outage: starts, serves, reports the down backend, decrypts through the others', async (t) => {
    t.timeout(60_000);
    await serversAnswer(t);
    const { dir, remove } = await tempDir();
    t.teardown(remove);
    const proxies = await startProxies(servers);
    t.teardown(() => closeProxies(proxies));
    const config = chaosConfig(servers, proxies, path.join(dir, 'kms.sock'));
    const first = await startChild(config, dir, backendEnv(servers), 'first');
    t.teardown(() => first.stop());
    const envelopes = await writeEnvelopes(t, first, 20);

    await proxies.vault.blackhole();
    await first.stop();
    t.is(await first.exited, 0, 'SIGTERM ends the first process cleanly');

    const started = performance.now();
    const second = await startChild(config, dir, backendEnv(servers), 'second');
    t.teardown(() => second.stop());
    const startMs = performance.now() - started;
    const view = await adminStatus(second.clients);
    const vault = backendOf(view, 'vault');
    t.false(isUp(view, 'vault'), `admin status reports vault down: ${JSON.stringify(vault)}`);
    t.is(vault.probeOk, false);
    t.true(isUp(view, 'aws') && isUp(view, 'azure'));
    const s = await status(second.clients);
    t.true(s.ok && s.value!.healthz === 'ok');
    t.true(s.value!.key_id.endsWith('-partial'), 'the key_id names the missing backend from the very first Status');

    const rec = new Recorder();
    await decryptAll(second, envelopes, rec);
    const fresh = await load(second, { ops: 20, readable: envelopes });
    for (const e of fresh.written) t.deepEqual(copiesOf(e.encrypted).sort(), ['aws', 'azure']);
    t.log(rec.table(`restarted during a vault blackhole: serving after ${Math.round(startMs)} ms`));
    t.log(fresh.rec.table('load after restart'));
    t.deepEqual(rec.errors('decrypt'), {});
    t.deepEqual(fresh.rec.errors('decrypt'), {});
    t.deepEqual(fresh.rec.errors('encrypt'), {});
    t.true(rec.p('decrypt', 99)! < DECRYPT_P99_BOUND_MS);

    await proxies.vault.pass();
    await eventually(async () => (isUp(await adminStatus(second.clients), 'vault') ? true : undefined), 5000, 20);
    await second.stop();
    t.is(await second.exited, 0);
  });
}
