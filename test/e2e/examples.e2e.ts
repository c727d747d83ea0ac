/**
 * Every EncryptionConfiguration in deploy/ and docs/ loads in a real kube-apiserver
 * (v2 and v1 providers, the KMSv1 feature gate where a v1 provider is listed), its KMS
 * check in /readyz is ok, and a Secret written through it is stored in etcd under the
 * first provider's prefix without its plaintext. A v1 provider without the gate is
 * refused at start, naming the gate.
 */
import test from 'ava';
import { KubeApiserver } from './lib/apiserver.ts';
import { findEncryptionConfigs, pointedAt } from './lib/encryption-configs.ts';
import { E2eRun } from './lib/e2e-run.ts';
import { containsPlaintext, kmsPrefix } from './lib/etcd-value.ts';
import { create, ensureNamespace, etcdKey, newSecret, readBack } from './lib/objects.ts';

const examples = findEncryptionConfigs();
let run: E2eRun;
let failures = 0;

test.before(async () => {
  run = await E2eRun.create('examples');
  await run.startPlugin();
});

test.afterEach((t) => {
  if (!t.passed) failures++;
});

test.after.always(async () => {
  await run?.close(failures > 0);
});

test('the examples are found: the four files of deploy/encryption-config and the blocks in docs/', (t) => {
  const where = examples.map((e) => e.where);
  t.log(where.join('\n'));
  for (const file of ['kms-v2.yaml', 'kms-v2-with-identity-fallback.yaml', 'kms-v1.yaml', 'kms-v1-to-v2-migration.yaml']) {
    t.true(where.includes(`deploy/encryption-config/${file}`), file);
  }
  t.true(where.some((w) => w.startsWith('docs/')), 'at least one example in docs/');
});

examples.forEach((example, index) => {
  const gate = example.needsKmsV1 ? ' (with --feature-gates=KMSv1=true)' : '';
  test(`${example.where} loads in kube-apiserver${gate}: KMS check ok, a Secret is stored encrypted`, async (t) => {
    const first = example.first;
    if (!first) return t.fail('the first provider of the first rule is not KMS');
    const config = run.writeFile(`example-${index}.yaml`, pointedAt(example, run.socketPath));
    const apiserver = await run.startApiserver(`ex${index}`, config, example.needsKmsV1 ? ['KMSv1=true'] : []);
    try {
      const { status, kms } = await apiserver.kmsChecks();
      t.is(status, 200);
      t.log(kms.join('\n'));
      // v2 only: one "kms-providers" check; with a v1 provider: one "kms-provider-N" per provider.
      const expected = example.needsKmsV1 ? example.providers.length : 1;
      t.is(kms.length, expected, kms.join(' | '));
      t.true(kms.every((line) => line.startsWith('[+]') && line.endsWith(' ok')), kms.join(' | '));

      await ensureNamespace(apiserver.api, 'examples');
      const secret = newSecret('examples', 'example-secret', 3);
      await create(apiserver.api, secret);
      t.is(await readBack(apiserver.api, secret), undefined);
      const raw = (await run.etcd.getPrefix(etcdKey(apiserver.settings.etcdPrefix, secret))).get(etcdKey(apiserver.settings.etcdPrefix, secret));
      if (!raw) return t.fail('the Secret is not in etcd');
      const prefix = kmsPrefix(first.apiVersion, first.name);
      t.is(raw.subarray(0, prefix.length).toString(), prefix);
      t.false(containsPlaintext(raw, secret.marker));
    } finally {
      await run.closeApiserver(apiserver);
    }
  });
});

test('a KMS v1 provider without the KMSv1 feature gate: kube-apiserver exits at start and names the gate', async (t) => {
  const v1 = examples.find((e) => e.where === 'deploy/encryption-config/kms-v1.yaml');
  if (!v1) return t.fail('deploy/encryption-config/kms-v1.yaml not found');
  const config = run.writeFile('kms-v1-no-gate.yaml', pointedAt(v1, run.socketPath));
  const { status, log } = await KubeApiserver.startExpectingExit({
    name: 'v1-no-gate', binDir: run.kubeBin, workDir: run.workDir, etcd: run.etcd, credentials: run.credentials,
    encryptionConfigFile: config, etcdPrefix: '/e2e-v1-no-gate',
  });
  t.truthy(status, 'it kept running');
  t.not(status?.code, 0);
  t.regex(log, /KMSv1/);
});
