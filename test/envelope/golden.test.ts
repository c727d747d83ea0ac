/**
 * Compatibility: envelopes written by earlier versions (test/fixtures/golden/) must
 * keep decrypting to the exact plaintext. A failure here means stored data would
 * become unreadable; fix the code, never the vector.
 */
import test from 'ava';
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { parseEnvelope, annotationKeyFor } from '../../src/envelope/format.ts';
import { V2_MAX_ANNOTATION_BYTES, V2_MAX_CIPHERTEXT_BYTES } from '../../src/envelope/limits.ts';
import { GOLDEN_DIR, makePlugin, makeTempDir, tryDecrypt, REJECTION_CODES, type TempDir } from '../helpers/envelope-fixtures.ts';
import { annotationsOf, buildGoldenBackend, VECTORS_DIR, type GoldenVector } from '../fixtures/golden/vector.ts';
import { requireServer } from '../helpers/servers.ts';

// Read synchronously: ava needs every test declared before the module finishes loading.
const files = readdirSync(path.join(GOLDEN_DIR, VECTORS_DIR)).filter((f) => f.endsWith('.json')).sort();
const all = files.map((file) => ({ file, vector: JSON.parse(readFileSync(path.join(GOLDEN_DIR, VECTORS_DIR, file), 'utf8')) as GoldenVector }));
// Vectors with a Vault copy need the OpenBao test server (required in CI, a loud skip elsewhere).
const needsVault = all.some((v) => v.vector.backends.some((b) => b.kind === 'vault'));
const vaultMissing = needsVault && 'missing' in requireServer('openbao');
const vectors = all.filter((v) => !vaultMissing || !v.vector.backends.some((b) => b.kind === 'vault'));

let temp: TempDir = { dir: '', remove: async () => {} };
test.before(async () => {
  temp = await makeTempDir('trousseau-golden-test-');
});
test.after.always(() => temp.remove());

test('the golden set covers v2 inline, v2 annotations, v1 inline, a partially wrapped envelope and both Vault key version forms', (t) => {
  t.deepEqual(files, ['v1-inline.json', 'v2-annotations.json', 'v2-inline.json', 'v2-partial.json', 'v2-vault-bare-version.json', 'v2-vault.json']);
  // Every file, the Vault ones too: this only parses them, so it needs no server.
  const byFile = new Map(all.map((v) => [v.file, v.vector]));
  t.true(Object.keys(byFile.get('v2-annotations.json')!.annotations).length > 0);
  t.is(Object.keys(byFile.get('v1-inline.json')!.annotations).length, 0);
  t.true(byFile.get('v2-partial.json')!.missing.length > 0);
  const vaultVersion = (file: string) => parseEnvelope(Buffer.from(byFile.get(file)!.ciphertext, 'base64'), annotationsOf(byFile.get(file)!)).copies.find((c) => c.backendName === 'vault-a')?.keyVersion;
  t.is(vaultVersion('v2-vault-bare-version.json'), '1');
  t.regex(vaultVersion('v2-vault.json') ?? '', /^1@\d+$/);
});

for (const { file, vector } of vectors) {
  const ciphertext = Buffer.from(vector.ciphertext, 'base64');
  const plaintext = Buffer.from(vector.plaintext, 'base64');
  const annotations = annotationsOf(vector);

  test(`${file}: header matches its description`, (t) => {
    const envelope = parseEnvelope(ciphertext, annotations);
    t.is(envelope.formatVersion, vector.formatVersion);
    t.is(envelope.quorum, vector.quorum);
    t.is(envelope.configuredBackends, vector.backends.length);
    t.deepEqual(envelope.copies.map((c) => c.backendName), vector.wrappedBy);
    t.true(envelope.copies.every((c) => c.wrapped !== undefined), 'every annotation copy resolves');
    for (const copy of envelope.copies) {
      t.is(copy.location === 'annotation', annotations.has(annotationKeyFor(copy.backendName)));
    }
    if (vector.transport === 'v2') {
      t.true(ciphertext.length <= V2_MAX_CIPHERTEXT_BYTES);
      let total = 0;
      for (const [k, v] of annotations) total += k.length + v.length;
      t.true(total <= V2_MAX_ANNOTATION_BYTES);
    } else {
      t.is(annotations.size, 0);
    }
  });

  test(`${file}: decrypts to the exact plaintext with every backend configured`, async (t) => {
    const backends = await Promise.all(vector.backends.map((b) => buildGoldenBackend(b, temp.dir)));
    const { plugin, close } = makePlugin(backends, { quorum: vector.quorum });
    t.teardown(close);
    const result = await tryDecrypt(plugin, ciphertext, annotations);
    t.true(result.ok && result.plaintext.equals(plaintext));
  });

  for (const name of vector.wrappedBy) {
    test(`${file}: the copy of ${name} alone decrypts it`, async (t) => {
      const backend = await buildGoldenBackend(vector.backends.find((b) => b.name === name)!, temp.dir);
      const { plugin, close } = makePlugin([backend]);
      t.teardown(close);
      const decrypted = await plugin.engine.decrypt(ciphertext, annotations, AbortSignal.timeout(5000));
      t.is(decrypted.unwrappedBy, name);
      t.true(decrypted.plaintext.equals(plaintext));
    });
  }

  for (const name of vector.missing) {
    test(`${file}: ${name} has no copy, so it alone cannot decrypt and is never called`, async (t) => {
      const backend = await buildGoldenBackend(vector.backends.find((b) => b.name === name)!, temp.dir);
      const { plugin, close } = makePlugin([backend]);
      t.teardown(close);
      const result = await tryDecrypt(plugin, ciphertext, annotations);
      t.false(result.ok);
      t.is(!result.ok && result.code, 'INVALID_INPUT');
    });
  }
}

// Each sweep runs alone: hundreds of RSA-4096 decrypts on this thread would otherwise
// hold up another sweep's Vault calls past their deadline.
for (const { file, vector } of vectors.filter((v) => v.vector.transport === 'v2')) {
  test.serial(`${file}: every single-byte change fails or yields the exact plaintext`, async (t) => {
    const ciphertext = Buffer.from(vector.ciphertext, 'base64');
    const plaintext = Buffer.from(vector.plaintext, 'base64');
    const annotations = annotationsOf(vector);
    const backends = await Promise.all(vector.backends.map((b) => buildGoldenBackend(b, temp.dir)));
    const { plugin, close } = makePlugin(backends, { quorum: vector.quorum });
    t.teardown(close);
    const codes = new Map<string, number>();
    let accepted = 0;
    for (let i = 0; i < ciphertext.length; i++) {
      for (const mask of [0x01, 0x80]) {
        const mutated = Buffer.from(ciphertext);
        mutated[i] = mutated[i]! ^ mask;
        const result = await tryDecrypt(plugin, mutated, annotations);
        if (result.ok) {
          // Only a byte nothing authenticates could be changed without effect; none exists.
          t.true(result.plaintext.equals(plaintext), `byte ${i} mask ${mask}: different plaintext`);
          accepted++;
        } else {
          t.true(REJECTION_CODES.includes(result.code), `byte ${i} mask ${mask}: unexpected ${result.code}`);
          codes.set(result.code, (codes.get(result.code) ?? 0) + 1);
        }
      }
    }
    t.is(accepted, 0, 'every byte of the envelope is authenticated');
    t.log(`${ciphertext.length * 2} mutations rejected: ${JSON.stringify(Object.fromEntries(codes))}`);
  });
}
