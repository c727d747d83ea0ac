/**
 * `trousseau rewrap`: envelopes written with an old local key version, or missing a
 * backend's copy, come out wrapped by every current backend, with the plaintext
 * unchanged (proved by opening the new envelope with each backend's copy alone).
 */
import { chmod, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import test from 'ava';
import { addKeyToFile } from '../../src/backends/local.ts';
import { formatEnvelopeDocument, parseEnvelopeDocument } from '../../src/cli/envelope-document.ts';
import { parseConfig } from '../../src/config/load.ts';
import { parseEnvelope } from '../../src/envelope/format.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { Metrics } from '../../src/observability/metrics.ts';
import { Plugin } from '../../src/plugin.ts';
import { unavailable } from '../helpers/fault-backend.ts';
import { runCli } from '../helpers/operate-cli.ts';
import { startHarness, type Harness } from '../helpers/plugin-harness.ts';

async function configFor(h: Harness): Promise<string> {
  const file = path.join(h.dir, 'rewrap.yaml');
  const lines = ['quorum: 2', 'backends:', ...[...h.keyFiles].map(([name, key]) => `  - { name: ${name}, type: local, keyFile: "${key}" }`), ''];
  await writeFile(file, lines.join('\n'));
  return file;
}

function copies(doc: string): Map<string, string> {
  const parsed = parseEnvelopeDocument(doc);
  const envelope = parseEnvelope(parsed.ciphertext, new Map(Object.entries(parsed.annotations)));
  return new Map(envelope.copies.filter((c) => c.wrapped).map((c) => [c.backendName, c.keyVersion]));
}

/** Open `doc` once per backend with that backend's copy only, in a fresh plugin on the same key files. */
async function openWithEach(h: Harness, doc: string): Promise<Map<string, string>> {
  const config = parseConfig({ quorum: 2, backends: [...h.keyFiles].map(([name, keyFile]) => ({ name, type: 'local', keyFile })) });
  const plugin = await Plugin.create({ config, baseDir: h.dir, logger: silentLogger(), metrics: new Metrics() });
  try {
    const parsed = parseEnvelopeDocument(doc);
    const opened = new Map<string, string>();
    for (const name of h.keyFiles.keys()) {
      const { plaintext } = await plugin.engine.decryptWithOnly(name, parsed.ciphertext, new Map(Object.entries(parsed.annotations)), AbortSignal.timeout(5000));
      opened.set(name, plaintext.toString());
    }
    return opened;
  } finally {
    await plugin.close();
  }
}

const documentOf = (e: { ciphertext: Buffer; key_id: string; annotations: Record<string, Buffer> }) => formatEnvelopeDocument(e.ciphertext, e.key_id, e.annotations);

test('an envelope under an old local key version and one missing a copy are rewrapped by every current backend (stdin to stdout)', async (t) => {
  const h = await startHarness(t);
  const old = documentOf(await h.encrypt(Buffer.from('first secret')));
  h.fault('c').setMode(unavailable);
  const partial = documentOf(await h.encrypt(Buffer.from('second secret')));
  h.fault('c').setMode({ kind: 'ok' });
  t.false(copies(partial).has('c'), 'written without c');
  const oldVersion = copies(old).get('b')!;
  const newVersion = await addKeyToFile(h.keyFiles.get('b')!);

  const result = await runCli(['rewrap', '--config', await configFor(h)], { input: `${old}\n\n${partial}\n` });
  t.is(result.code, 0, result.stderr);
  const out = result.stdout.trim().split('\n');
  t.is(out.length, 2);
  t.regex(result.stderr, new RegExp(`stdin:1: rewrapped .*b ${oldVersion}->${newVersion}`));
  t.regex(result.stderr, /stdin:2: rewrapped .*\(\+c; b /);
  t.regex(result.stderr, /rewrap: 2 rewrapped, 0 already current, 0 failed/);
  t.false(out.join('\n').includes('secret'), 'no plaintext in the output');

  for (const [doc, plaintext] of [[out[0]!, 'first secret'], [out[1]!, 'second secret']] as const) {
    const now = copies(doc);
    t.deepEqual([...now.keys()], ['a', 'b', 'c']);
    t.is(now.get('b'), newVersion);
    t.deepEqual([...(await openWithEach(h, doc)).values()], [plaintext, plaintext, plaintext]);
    t.regex((JSON.parse(doc) as { keyId: string }).keyId, /^trousseau-v1-/);
  }
});

test('files are rewritten in place, current ones left alone, --dry-run writes nothing', async (t) => {
  const h = await startHarness(t);
  const file = path.join(h.dir, 'envelope.json');
  await writeFile(file, `${documentOf(await h.encrypt(Buffer.from('in a file')))}\n`);
  const config = await configFor(h);
  const original = await readFile(file, 'utf8');

  let result = await runCli(['rewrap', '-c', config, file]);
  t.is(result.code, 0, result.stderr);
  t.regex(result.stderr, /already current/);
  t.is(await readFile(file, 'utf8'), original);

  await addKeyToFile(h.keyFiles.get('a')!);
  result = await runCli(['rewrap', '-c', config, '--dry-run', file]);
  t.regex(result.stderr, /would rewrap .*a [0-9a-f]+->[0-9a-f]+.*\n.*would be rewrapped.*dry run/);
  t.is(await readFile(file, 'utf8'), original);

  result = await runCli(['rewrap', '-c', config, '--json', file]);
  t.is(result.code, 0, result.stderr);
  const report = JSON.parse(result.stderr.split('\n')[0]!) as { action: string; rotated: { backend: string }[]; output?: string };
  t.is(report.action, 'rewrapped');
  t.deepEqual(report.rotated.map((r) => r.backend), ['a']);
  t.is(report.output, undefined, 'the report never carries the envelope');
  const rewritten = await readFile(file, 'utf8');
  t.not(rewritten, original);
  t.deepEqual([...(await openWithEach(h, rewritten)).values()], ['in a file', 'in a file', 'in a file']);
});

test('a bare base64 (KMS v1) envelope stays inline; envelopes that fail are written back unchanged and the exit status is 1', async (t) => {
  const h = await startHarness(t);
  const encrypted = await h.encrypt(Buffer.from('v1 data'));
  const v1 = encrypted.ciphertext.toString('base64');
  const config = await configFor(h);
  await addKeyToFile(h.keyFiles.get('c')!);

  let result = await runCli(['rewrap', '-c', config], { input: `${v1}\n` });
  t.is(result.code, 0, result.stderr);
  t.regex(result.stdout.trim(), /^[A-Za-z0-9+/=]+$/, 'still bare base64');
  const parsed = parseEnvelope(Buffer.from(result.stdout.trim(), 'base64'));
  t.true(parsed.copies.every((c) => c.location === 'inline' && c.wrapped));

  // A garbage line and an envelope whose every copy was altered: both written back unchanged.
  const broken = Buffer.from(encrypted.ciphertext);
  broken[broken.length - 1]! ^= 1;
  result = await runCli(['rewrap', '-c', config], { input: `not-an-envelope\n${broken.toString('base64')}\n` });
  t.is(result.code, 1);
  t.deepEqual(result.stdout.trim().split('\n'), ['not-an-envelope', broken.toString('base64')]);
  t.regex(result.stderr, /stdin:1: FAILED INVALID_INPUT/);
  t.regex(result.stderr, /stdin:2: FAILED TAMPERED/);
  t.regex(result.stderr, /0 rewrapped, 0 already current, 2 failed/);
});

test('while one backend cannot wrap, rewrap leaves envelopes unchanged unless --allow-partial accepts the quorum', async (t) => {
  const h = await startHarness(t);
  const doc = documentOf(await h.encrypt(Buffer.from('keep me')));
  const config = await configFor(h);
  await addKeyToFile(h.keyFiles.get('a')!);
  // A key file readable by others is refused by the local backend: c is unavailable.
  await chmod(h.keyFiles.get('c')!, 0o644);

  let result = await runCli(['rewrap', '-c', config], { input: doc });
  t.is(result.code, 1);
  t.is(result.stdout.trim(), doc);
  t.regex(result.stderr, /FAILED BACKEND_UNAVAILABLE: not every backend wrapped the key \(c: BACKEND_UNAVAILABLE\)/);

  result = await runCli(['rewrap', '-c', config, '--allow-partial'], { input: doc });
  t.is(result.code, 0, result.stderr);
  t.regex(result.stderr, /still lacks c/);
  t.deepEqual([...copies(result.stdout).keys()], ['a', 'b']);
});
