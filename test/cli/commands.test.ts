/**
 * The offline CLI commands, run as the user runs them: validate, keygen, inspect.
 */
import test from 'ava';
import { readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { generateKeyFile } from '../../src/backends/local.ts';
import { formatEnvelopeDocument } from '../../src/cli/envelope-document.ts';
import { runCli, startHarness, tempDir } from '../helpers/plugin-harness.ts';

test('validate accepts a good configuration', async (t) => {
  t.timeout(300_000);
  const dir = await tempDir(t);
  const file = path.join(dir, 'good.yaml');
  await writeFile(
    file,
    ['quorum: 2', 'backends:', ...['a', 'b', 'c'].flatMap((n) => [`  - name: ${n}`, '    type: local', `    keyFile: ${n}.key`])].join('\n'),
  );
  for (const n of ['a', 'b', 'c']) await generateKeyFile(path.join(dir, `${n}.key`));
  const result = await runCli(['validate', '-c', file], { timeoutMs: 90_000 });
  t.is(result.code, 0, result.stderr);
  t.regex(result.stdout, /valid \(3 backends: a\/local, b\/local, c\/local; quorum 2; 3 referenced files present and readable\)/);
});

test('validate checks the files a configuration names; --no-files checks the shape only', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'files.yaml');
  await writeFile(file, ['quorum: 1', 'backends:', ...['a', 'b'].flatMap((n) => [`  - name: ${n}`, '    type: local', `    keyFile: ${n}.key`])].join('\n'));
  await generateKeyFile(path.join(dir, 'a.key'));
  const missing = await runCli(['validate', '-c', file], { timeoutMs: 90_000 });
  t.is(missing.code, 1, missing.stdout);
  t.regex(missing.stderr, /well-formed, but 1 referenced file fails a check:\n {2}FAIL b keyFile: .*b\.key does not exist/);
  await writeFile(path.join(dir, 'b.key'), '', { mode: 0o644 });
  const open = await runCli(['validate', '-c', file], { timeoutMs: 90_000 });
  t.is(open.code, 1);
  t.regex(open.stderr, /FAIL b keyFile: .*mode 644.*\(fix: chmod 600 /);
  const shapeOnly = await runCli(['validate', '--no-files', '-c', file], { timeoutMs: 90_000 });
  t.is(shapeOnly.code, 0, shapeOnly.stderr);
  t.regex(shapeOnly.stdout, /: valid \(2 backends: a\/local, b\/local; quorum 1; files not checked\)/);
  const one = path.join(dir, 'one.yaml');
  await writeFile(one, 'quorum: 1\nbackends:\n  - name: a\n    type: local\n    keyFile: a.key\n');
  t.regex((await runCli(['validate', '-c', one], { timeoutMs: 90_000 })).stdout, /valid \(1 backend: a\/local; quorum 1; 1 referenced file present/, 'plural of one');
});

test('validate names the bad field and what it expects, never the value, exit code 1', async (t) => {
  const dir = await tempDir(t);
  const cases: { yaml: string; field: RegExp; value: RegExp }[] = [
    {
      yaml: 'quorum: 2\nbackends:\n  - name: a\n    type: local\n    keyFile: a.key\n    timeoutMs: 5\n  - name: b\n    type: local\n    keyFile: b.key\n',
      field: /backends\.0\.timeoutMs/,
      value: /must be at least 10$/m,
    },
    { yaml: 'quorum: 7\nbackends:\n  - name: a\n    type: local\n    keyFile: a.key\n', field: /quorum/, value: /cannot exceed the number of backends$/m },
    { yaml: 'quorum: 1\nbackends:\n  - name: Bad_Name\n    type: local\n    keyFile: a.key\n', field: /backends\.0\.name/, value: /must be a DNS label[^\n]*characters$/m },
    { yaml: 'quorum: 1\nsocket:\n  mode: "0666"\nbackends:\n  - name: a\n    type: local\n    keyFile: a.key\n', field: /socket\.mode/, value: /last octal digit 0\)$/m },
  ];
  for (const [i, c] of cases.entries()) {
    const file = path.join(dir, `bad-${i}.yaml`);
    await writeFile(file, c.yaml);
    const result = await runCli(['validate', '-c', file]);
    t.is(result.code, 1, `case ${i}: ${result.stdout}`);
    t.regex(result.stderr, c.field, `case ${i}`);
    t.regex(result.stderr, c.value, `case ${i}`);
    t.notRegex(result.stderr, /\bgot\b|Bad_Name|0666/, `case ${i}: a value is echoed`);
    t.notRegex(result.stderr, /\n\s+at /, 'no stack trace');
  }
});

test('keygen creates a 0600 key file and refuses to overwrite it', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'new.key');
  const created = await runCli(['keygen', file]);
  t.is(created.code, 0, created.stderr);
  t.regex(created.stdout, /created key version [0-9a-f]{16}/);
  t.is((await stat(file)).mode & 0o777, 0o600);
  const content = await readFile(file, 'utf8');
  const [key, check] = content.trim().split(' ');
  t.is(Buffer.from(key!, 'base64').length, 32);
  t.regex(check!, /^[0-9a-f]{16}$/, 'the key is followed by its check value');
  t.false(created.stdout.includes(key!), 'keygen printed the key');

  const again = await runCli(['keygen', file]);
  t.is(again.code, 1);
  t.regex(again.stderr, /EEXIST|exists/);
  t.is(await readFile(file, 'utf8'), content, 'the existing key was overwritten');

  const rotated = await runCli(['keygen', '--rotate', file]);
  t.is(rotated.code, 0, rotated.stderr);
  const lines = (await readFile(file, 'utf8')).trim().split('\n');
  t.is(lines.length, 2);
  t.is(lines[1], content.trim(), 'rotation must keep the old key after the new one');
  t.is((await stat(file)).mode & 0o777, 0o600);
});

test('inspect shows the copies and no secret', async (t) => {
  const h = await startHarness(t);
  const plaintext = Buffer.from('INSPECT-PLAINTEXT-MARKER');
  // Large enough that some copies move to annotations.
  const big = Buffer.concat([plaintext, Buffer.alloc(680, 0x41)]);
  for (const p of [plaintext, big]) {
    const encrypted = await h.encrypt(p);
    const file = path.join(h.dir, 'envelope.json');
    await writeFile(file, formatEnvelopeDocument(encrypted.ciphertext, encrypted.key_id, encrypted.annotations));
    const result = await runCli(['inspect', file]);
    t.is(result.code, 0, result.stderr);
    const doc = JSON.parse(result.stdout) as { keyId: string; quorum: number; copies: { backend: string; present: boolean; location: string }[] };
    t.is(doc.keyId, encrypted.key_id);
    t.is(doc.quorum, 2);
    t.deepEqual(
      doc.copies.map((c) => [c.backend, c.present]),
      [
        ['a', true],
        ['b', true],
        ['c', true],
      ],
    );
    if (p === big) t.true(doc.copies.some((c) => c.location === 'annotation'));
    const shown = result.stdout + result.stderr;
    t.false(shown.includes('INSPECT-PLAINTEXT-MARKER'));
    for (const keyFile of h.keyFiles.values()) t.false(shown.includes((await readFile(keyFile, 'utf8')).trim()));
    for (const wrapped of Object.values(encrypted.annotations)) t.false(shown.includes(wrapped.toString('base64')));
    t.false(shown.includes(encrypted.ciphertext.toString('base64')));
  }
  // stdin works too, and garbage is a clean error.
  const bad = await runCli(['inspect'], { input: 'not an envelope' });
  t.is(bad.code, 1);
  t.regex(bad.stderr, /^trousseau: /);
});
