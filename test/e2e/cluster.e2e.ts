/**
 * One cluster's story, in order: a real kube-apiserver and etcd with
 * deploy/encryption-config/kms-v2.yaml (ConfigMaps added to its resources, so both
 * kinds are encrypted), the plugin against the real test servers, each network backend
 * behind a fault proxy of this run. Every test asserts counts; none asserts a time.
 * Waits are for what the apiserver is documented to do, with wide bounds: it polls a
 * healthy plugin's Status once a minute, caches a healthy KMS check for 20 s.
 */
import os from 'node:os';
import test, { type ExecutionContext } from 'ava';
import type { FaultProxy } from '../chaos/fault-proxy.ts';
import type { KubeApiserver } from './lib/apiserver.ts';
import { E2eRun } from './lib/e2e-run.ts';
import { findEncryptionConfigs, pointedAt } from './lib/encryption-configs.ts';
import { containsPlaintext, kmsPrefix, kmsV2KeyId } from './lib/etcd-value.ts';
import { create, ensureNamespace, etcdKey, newConfigMap, newSecret, readBack, sameContent, type Kind, type Written } from './lib/objects.ts';
import { pluginReadyz, rotateLocalKey, trousseauStatus, type RunningPlugin, type StatusReport } from './lib/plugin.ts';
import { inParallel, sleep, waitFor } from './lib/wait.ts';

const PROVIDER = 'trousseau';
const NS = 'e2e';
/** What a cluster that passed every step so far must still read, byte for byte. */
const written: Written[] = [];
let run: E2eRun;
let apiserver: KubeApiserver;
let plugin: RunningPlugin;
/** The plugin's key_id with every backend healthy (changes at the rotation step). */
let fullKeyId: string;
let failures = 0;
let probes = 0;

test.before(async () => {
  run = await E2eRun.create('cluster');
  plugin = await run.startPlugin();
  const status = await trousseauStatus(plugin);
  if (status.exitCode !== 0 || !status.keyId || status.partial) throw new Error(`the plugin is not fully healthy at start: ${JSON.stringify(status)}`);
  fullKeyId = status.keyId;

  const example = findEncryptionConfigs().find((e) => e.where === 'deploy/encryption-config/kms-v2.yaml');
  if (!example) throw new Error('deploy/encryption-config/kms-v2.yaml not found');
  const text = pointedAt(example, run.socketPath).replace(/^(\s*)- secrets\n/m, '$1- secrets\n$1- configmaps\n');
  if (!text.includes('- configmaps')) throw new Error('could not add configmaps to the resources of kms-v2.yaml');
  apiserver = await run.startApiserver('main', run.writeFile('encryption-config.yaml', text));
  await ensureNamespace(apiserver.api, NS);
});

test.afterEach((t) => {
  if (!t.passed) failures++;
});

test.after.always(async () => {
  await run?.close(failures > 0);
});

async function readAll(objects: readonly Written[] = written): Promise<string[]> {
  const results = await inParallel(objects, 8, (object) => readBack(apiserver.api, object));
  return results.filter((r): r is string => r !== undefined);
}

function rawValues(kind: Kind, namespace?: string): Promise<Map<string, Buffer>> {
  return run.etcd.getPrefix(`${apiserver.settings.etcdPrefix}/${kind}/${namespace ? `${namespace}/` : ''}`);
}

/** Writes a new small Secret and returns the key_id its etcd value carries. */
async function probeWrite(): Promise<string> {
  const secret = newSecret(NS, `probe-${++probes}`, 1);
  await create(apiserver.api, secret);
  written.push(secret);
  const key = etcdKey(apiserver.settings.etcdPrefix, secret);
  const raw = (await run.etcd.getPrefix(key)).get(key);
  if (!raw) throw new Error(`${key} is not in etcd`);
  return kmsV2KeyId(raw, PROVIDER);
}

/**
 * Waits until a new write is wrapped under `keyId`: the apiserver sees a new key_id at
 * its next Status poll (once a minute while healthy) and then makes a new DEK seed.
 */
async function waitForWritesUnder(keyId: string): Promise<void> {
  let last = '';
  await waitFor(`new writes under key_id ${keyId}`, async () => (last = await probeWrite()) === keyId, {
    timeoutMs: 240_000, intervalMs: 5000, describe: () => `key_id ${last}`,
  });
}

async function waitForStatus(what: string, accept: (s: StatusReport) => boolean, timeoutMs = 90_000): Promise<StatusReport> {
  let last: StatusReport | undefined;
  return waitFor(`trousseau status: ${what}`, async () => {
    last = await trousseauStatus(plugin);
    return accept(last) ? last : undefined;
  }, { timeoutMs, intervalMs: 500, describe: () => JSON.stringify(last) });
}

async function waitForApiserverKms(what: string, accept: (r: { status: number; kms: string[] }) => boolean, timeoutMs = 150_000): Promise<string[]> {
  let last: { status: number; kms: string[] } | undefined;
  const seen = await waitFor(`kube-apiserver /readyz: ${what}`, async () => {
    last = await apiserver.kmsChecks();
    return accept(last) ? last : undefined;
  }, { timeoutMs, intervalMs: 1000, describe: () => JSON.stringify(last) });
  return seen.kms;
}

const kmsOk = (r: { status: number; kms: string[] }) => r.status === 200 && r.kms.length === 1 && r.kms[0] === '[+]kms-providers ok';

test('kube-apiserver /readyz shows the KMS check ok (and /livez has none)', async (t) => {
  const { status, kms } = await apiserver.kmsChecks();
  t.is(status, 200);
  t.deepEqual(kms, ['[+]kms-providers ok']);
  const livez = await apiserver.api.request('GET', '/livez?verbose');
  t.is(livez.status, 200);
  t.false(/kms/.test(livez.text));
});

test('200 Secrets and 50 ConfigMaps are created and read back byte-exact', async (t) => {
  const objects = [
    ...Array.from({ length: 200 }, (_, i) => newSecret(NS, `secret-${i}`, i)),
    ...Array.from({ length: 50 }, (_, i) => newConfigMap(NS, `config-${i}`, i)),
  ];
  await inParallel(objects, 8, (object) => create(apiserver.api, object));
  written.push(...objects);
  t.deepEqual(await readAll(objects), []);
  const secrets = await apiserver.api.json<{ items: unknown[] }>('GET', `/api/v1/namespaces/${NS}/secrets`);
  const configMaps = await apiserver.api.json<{ items: { metadata: { name: string } }[] }>('GET', `/api/v1/namespaces/${NS}/configmaps`);
  t.is(secrets.items.length, 200);
  // The namespace's own kube-root-ca.crt is made by the controller-manager, which is not run.
  t.is(configMaps.items.filter((c) => c.metadata.name.startsWith('config-')).length, 50);
});

test('every raw etcd value is k8s:enc:kms:v2:trousseau: + the current key_id, with no plaintext in it', async (t) => {
  const prefix = Buffer.from(kmsPrefix('v2', PROVIDER));
  for (const [kind, count] of [['secrets', 200], ['configmaps', 50]] as const) {
    const values = await rawValues(kind, NS);
    const ours = written.filter((o) => o.kind === kind);
    t.is(values.size, count, kind);
    let enveloped = 0;
    let plaintext = 0;
    const keyIds = new Set<string>();
    for (const object of ours) {
      const raw = values.get(etcdKey(apiserver.settings.etcdPrefix, object));
      if (!raw) continue;
      if (raw.subarray(0, prefix.length).equals(prefix)) {
        enveloped++;
        keyIds.add(kmsV2KeyId(raw, PROVIDER));
      }
      if (containsPlaintext(raw, object.marker)) plaintext++;
    }
    t.is(enveloped, count, `${kind} under ${prefix.toString()}`);
    t.is(plaintext, 0, `${kind} with plaintext in etcd`);
    t.deepEqual([...keyIds], [fullKeyId]);
  }
});

test('kube-apiserver restart: afterwards every Secret and ConfigMap reads back', async (t) => {
  const before = apiserver.pid;
  const readyMs = await apiserver.restart();
  t.log(`restart-to-ready with ${written.length} objects: ${(readyMs / 1000).toFixed(1)} s`);
  t.not(apiserver.pid, before);
  t.deepEqual(await readAll(), []);
  t.true(kmsOk(await apiserver.kmsChecks()));
});

// The outage steps below share these: which backends sit behind a proxy, and what the
// plugin announced at quorum.
let partialKeyId: string | undefined;
let apiserverPid: number | undefined;
let pluginPid: number | undefined;

function networkBackends(t: ExecutionContext): { toQuorum: [string, FaultProxy][]; last: [string, FaultProxy] } | undefined {
  const { backends, quorum, proxies } = run.pluginConfig;
  const stoppable = [...proxies.entries()];
  // Down to quorum: all but `quorum` backends stopped; below: one more.
  const toQuorum = stoppable.slice(0, backends.length - quorum);
  const last = stoppable[backends.length - quorum];
  if (!last) {
    t.fail(`the plugin configuration has ${backends.length} backends, quorum ${quorum}, ${stoppable.length} behind proxies: not enough to go below quorum`);
    return undefined;
  }
  return { toQuorum, last };
}

test('backends stopped down to quorum: writes (with a new DEK seed) and reads work, readyz ok everywhere, status names the missing backends', async (t) => {
  const plan = networkBackends(t);
  if (!plan) return;
  apiserverPid = apiserver.pid;
  pluginPid = plugin.pid;
  for (const [, proxy] of plan.toQuorum) await proxy.refuse();
  const stopped = plan.toQuorum.map(([name]) => name).sort();
  t.log(`stopped: ${stopped.join(', ')}`);

  const status = await waitForStatus('partial key_id, missing the stopped backends', (s) =>
    s.exitCode === 0 && s.partial && s.keyId !== fullKeyId
    && JSON.stringify(s.backends.filter((b) => !b.probeOk).map((b) => b.name).sort()) === JSON.stringify(stopped));
  partialKeyId = status.keyId!;
  t.is((await pluginReadyz(plugin)).status, 200);

  // The apiserver sees the partial key_id at a Status poll and asks the plugin for a new
  // DEK seed: an Encrypt that succeeds at exactly quorum.
  await waitForWritesUnder(partialKeyId);
  t.true(kmsOk(await apiserver.kmsChecks()));
  t.deepEqual(await readAll(), []);
});

test('below quorum: the plugin is not ready (/readyz 503, status exit 2, key_id frozen), kube-apiserver /readyz fails on kms-providers, writes go on with the cached seed, everything reads', async (t) => {
  const plan = networkBackends(t);
  if (!plan || !partialKeyId) return t.fail('the at-quorum step did not complete');
  await plan.last[1].refuse();

  const status = await waitForStatus('not ready (exit 2)', (s) => s.exitCode === 2);
  t.is(status.keyId, partialKeyId, 'below quorum the key_id stays the last one announced');
  const readyz = await pluginReadyz(plugin);
  t.is(readyz.status, 503);
  t.false(readyz.body.ready);

  const kms = await waitForApiserverKms('kms-providers failed', (r) => r.status !== 200 && r.kms.length === 1 && r.kms[0]!.startsWith('[-]kms-providers'));
  t.log(kms.join('\n'));
  t.is((await apiserver.api.request('GET', '/livez')).status, 200, '/livez stays ok: an outage must not restart the apiserver');

  const during = Array.from({ length: 5 }, (_, i) => newSecret(NS, `below-quorum-${i}`, i));
  for (const secret of during) await create(apiserver.api, secret);
  written.push(...during);
  t.deepEqual(await readAll(), []);
});

test('backends back: the plugin and kube-apiserver recover by themselves (no restart), the full key_id returns, new writes use it', async (t) => {
  for (const proxy of run.pluginConfig.proxies.values()) await proxy.pass();
  const status = await waitForStatus('ready with the full key_id', (s) => s.exitCode === 0 && !s.partial && s.keyId === fullKeyId);
  t.true(status.backends.every((b) => b.probeOk));
  t.is((await pluginReadyz(plugin)).status, 200);
  await waitForApiserverKms('kms-providers ok', kmsOk);
  await waitForWritesUnder(fullKeyId);
  t.deepEqual(await readAll(), []);
  t.is(apiserver.pid, apiserverPid, 'the same kube-apiserver process');
  t.is(plugin.pid, pluginPid, 'the same plugin process');
});

test('kill -9 of the plugin under a read/write loop: no failed read after recovery, no Secret lost', async (t) => {
  const reads: { at: number; failure: string | undefined }[] = [];
  const writes = { ok: 0, failed: 0 };
  const pool = written.filter((o) => o.kind === 'secrets');
  let stop = false;
  const loop = async (worker: number) => {
    for (let i = 0; !stop; i++) {
      const secret = newSecret(NS, `loop-${worker}-${i}`, i, 200);
      try {
        await create(apiserver.api, secret);
        written.push(secret);
        pool.push(secret);
        writes.ok++;
      } catch {
        writes.failed++;
      }
      const target = pool[Math.floor(Math.random() * pool.length)]!;
      reads.push({ at: Date.now(), failure: await readBack(apiserver.api, target) });
      await sleep(50);
    }
  };
  const workers = [loop(1), loop(2)];
  try {
    await waitFor('the loop to run', async () => reads.length >= 20, { timeoutMs: 60_000 });
    await plugin.kill9();
    const killedAt = reads.length;
    // The loop goes on while nothing serves the socket.
    await waitFor('the loop to run with the plugin gone', async () => reads.length >= killedAt + 20, { timeoutMs: 60_000 });
    plugin = await run.startPlugin();
    const status = await trousseauStatus(plugin);
    t.is(status.keyId, fullKeyId, 'a restarted plugin announces the same key_id');
    await waitForApiserverKms('kms-providers ok after the plugin restart', kmsOk);
    const recoveredAt = Date.now();
    await waitFor('50 reads after recovery', async () => reads.filter((r) => r.at > recoveredAt).length >= 50, { timeoutMs: 120_000 });
    stop = true;
    await Promise.all(workers);
    const after = reads.filter((r) => r.at > recoveredAt);
    const failedDuring = reads.filter((r) => r.at <= recoveredAt && r.failure).length;
    t.log(`reads: ${reads.length} (${failedDuring} failed before recovery, ${after.length} after); writes: ${writes.ok} ok, ${writes.failed} failed`);
    t.deepEqual(after.filter((r) => r.failure).map((r) => r.failure), []);
  } finally {
    stop = true;
    await Promise.all(workers);
  }
  // No Secret lost: every write that was acknowledged reads back, and the list has it.
  t.deepEqual(await readAll(), []);
  const listed = await apiserver.api.json<{ items: { metadata: { name: string } }[] }>('GET', `/api/v1/namespaces/${NS}/secrets`);
  const names = new Set(listed.items.map((s) => s.metadata.name));
  t.deepEqual(written.filter((o) => o.kind === 'secrets' && !names.has(o.name)).map((o) => o.name), []);
});

test('a backend key rotation reaches kube-apiserver as a new key_id; `kubectl get secrets -A -o json | kubectl replace -f -` then rewrites every older etcd value under it', async (t) => {
  const keyFile = run.pluginConfig.localKeyFile;
  if (!keyFile) return t.fail('the plugin configuration has no local backend to rotate');
  await rotateLocalKey(keyFile);
  const rotated = await waitForStatus('a new full key_id', (s) => s.exitCode === 0 && !s.partial && s.keyId !== undefined && s.keyId !== fullKeyId);
  const newKeyId = rotated.keyId!;
  t.log(`key_id ${fullKeyId} -> ${newKeyId}`);
  fullKeyId = newKeyId;
  await waitForWritesUnder(newKeyId);

  const before = await rawValues('secrets');
  const stale = [...before].filter(([, value]) => kmsV2KeyId(value, PROVIDER) !== newKeyId).map(([key]) => key);
  t.true(stale.length > 0, 'Secrets written before the rotation carry the old key_id');
  await apiserver.kubectl.shell('kubectl get secrets -A -o json | kubectl replace -f -');
  const after = await rawValues('secrets');
  t.is(after.size, before.size);
  // The apiserver skips the etcd write of an update that changes nothing unless the
  // value it read was stale: every value under an old key_id must have been rewritten.
  t.deepEqual(stale.filter((key) => after.get(key)?.equals(before.get(key)!) ?? true), [], 'stale values not rewritten');
  t.is([...after.values()].filter((v) => kmsV2KeyId(v, PROVIDER) === newKeyId).length, after.size, 'every value under the new key_id');
  const changed = [...before].filter(([key, value]) => !after.get(key)?.equals(value)).length;
  t.log(`${before.size} Secrets in etcd, ${stale.length} under an older key_id before the migration; ${changed} etcd values changed`);
  t.deepEqual(await readAll(), []);
});

test('2,000 more Secrets, then kube-apiserver restart-to-ready and the first full read (timed, not asserted)', async (t) => {
  await ensureNamespace(apiserver.api, 'e2e-scale');
  const scale = Array.from({ length: 2000 }, (_, i) => newSecret('e2e-scale', `scale-${i}`, i, 256));
  await inParallel(scale, 8, (secret) => create(apiserver.api, secret));
  written.push(...scale);
  const total = (await rawValues('secrets')).size;
  const load = os.loadavg().map((l) => l.toFixed(2)).join(' ');

  const readyMs = await apiserver.restart();
  const started = performance.now();
  const list = await apiserver.api.json<{ items: { metadata: { namespace: string; name: string }; data?: Record<string, string> }[] }>('GET', '/api/v1/secrets', undefined, 300_000);
  const listMs = performance.now() - started;
  t.is(list.items.length, total);
  const byName = new Map(list.items.map((s) => [`${s.metadata.namespace}/${s.metadata.name}`, s]));
  t.is(scale.filter((s) => { const got = byName.get(`${s.namespace}/${s.name}`); return got && sameContent(s, got); }).length, 2000);
  t.log(`e2e timing: ${total} Secrets in etcd; restart-to-ready ${(readyMs / 1000).toFixed(1)} s; first full read (LIST all Secrets) ${(listMs / 1000).toFixed(2)} s; load average before the restart ${load}; plugin ${run.launcher.description}`);
  t.deepEqual(await readAll(), []);
});
