/**
 * Configuration errors never echo a value (issue 10, item 17). A secret is put in
 * every kind of wrong place (an unknown key next to a token, a wrong type, a wrong
 * enum value, invalid YAML around it, a backend's own schema, a key that is itself a
 * secret); neither `trousseau validate` nor `trousseau serve` prints it, on stdout or
 * stderr, and the thrown error (message, cause, everything util.inspect reaches)
 * does not hold it. The errors still name the field and what it expects.
 */
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { inspect } from 'node:util';
import path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { loadConfigFile } from '../../src/config/load.ts';
import { runCli, tempDir } from '../helpers/plugin-harness.ts';

/** A token-like secret with a random core; the core is what must never appear. */
function secret(): { value: string; core: string; letters: string } {
  const core = randomBytes(9).toString('hex');
  const letters = Array.from(randomBytes(12), (b) => String.fromCharCode(97 + (b % 26))).join('');
  return { value: `hvs.CAES${core}xYz`, core, letters };
}

const vault = (auth: string, extra = '') =>
  `quorum: 1\nbackends:\n  - name: v\n    type: vault\n    address: https://vault.example:8200\n    keyName: k\n${extra}    auth: ${auth}\n`;

interface Case {
  name: string;
  /** The file, given a token-like secret and a letters-only one (for fields that take only letters). */
  yaml: (s: string, letters: string) => string;
  /** What the error must still say: the field, and what it expects. */
  says: RegExp;
}

const cases: Case[] = [
  { name: 'unknown key next to a token file', yaml: (s) => vault(`{token: "${s}", method: token, tokenFile: token.txt}`), says: /backends\.0\.auth: unknown key \("token"\)/ },
  { name: 'token in the method field', yaml: (s) => vault(`{method: "${s}", tokenFile: token.txt}`), says: /backends\.0\.auth\.method: must be one of "token"/ },
  { name: 'token where a string list is expected', yaml: (s) => vault(`{method: token, tokenFile: ["${s}"]}`), says: /backends\.0\.auth\.tokenFile: expected string, got a list/ },
  { name: 'token as a number field', yaml: (s) => `quorum: "${s}"\nbackends:\n  - {name: a, type: local, keyFile: a.key}\n`, says: /quorum: expected number, got a string/ },
  { name: 'token as the log level (enum)', yaml: (s) => `quorum: 1\nbackends:\n  - {name: a, type: local, keyFile: a.key}\nlog: {level: "${s}"}\n`, says: /log\.level: must be one of/ },
  { name: 'token as a backend type (discriminator)', yaml: (s) => `quorum: 1\nbackends:\n  - {name: a, type: "${s}"}\n`, says: /backends\.0\.type: must be one of "local"/ },
  { name: 'token as a backend name (regex)', yaml: (s) => `quorum: 1\nbackends:\n  - {name: "${s}", type: local, keyFile: a.key}\n`, says: /backends\.0\.name: must be a DNS label/ },
  { name: 'token as the Vault address (url)', yaml: (s) => vault('{method: token, tokenFile: t}').replace('https://vault.example:8200', `"${s}"`), says: /backends\.0\.address: must be an http/ },
  { name: 'secret as a top-level key', yaml: (s) => `quorum: 1\n"${s}": 1\nbackends:\n  - {name: a, type: local, keyFile: a.key}\n`, says: /\(top level\): unknown key \(1 not shown/ },
  { name: 'secret as a key inside a backend', yaml: (s) => `quorum: 1\nbackends:\n  - {name: a, type: local, keyFile: a.key, "${s}": x}\n`, says: /backends\.0: unknown key \(1 not shown/ },
  { name: 'azure client secret inline', yaml: (s) => `quorum: 1\nbackends:\n  - name: z\n    type: azure\n    vaultUrl: https://kv.example\n    keyName: k\n    credential: {secret: "${s}", method: clientSecret, tenantId: t, clientId: c, secretFile: f}\n`, says: /backends\.0\.credential: unknown key \("secret"\)/ },
  { name: 'aws: a value the schema\'s own check quotes', yaml: (_, letters) => `quorum: 1\nbackends:\n  - name: w\n    type: aws\n    region: eu-west-1\n    keyId: arn:aws:kms:xq-${letters}-1:123456789012:key/0123456789abcdef0123456789abcdef\n`, says: /backends\.0\.keyId: is invalid/ },
  { name: 'aws: token as the endpoint', yaml: (s) => `quorum: 1\nbackends:\n  - {name: w, type: aws, region: eu-west-1, keyId: alias/k, endpoint: "${s}"}\n`, says: /backends\.0\.endpoint: must be a valid url/ },
  { name: 'invalid YAML: a token line that is a nested mapping', yaml: (s) => `quorum: 1\ntoken: ${s}\n  bad: 1\n`, says: /not valid YAML: [A-Z_]+ at line 2, column \d+/ },
  { name: 'invalid YAML: unclosed flow sequence around a token', yaml: (s) => `quorum: 1\nbackends: [{name: v, token: ${s}}\n`, says: /not valid YAML: [A-Z_]+ at line \d+/ },
  { name: 'invalid YAML: junk after a quoted token', yaml: (s) => `token: "${s}" junk\n`, says: /not valid YAML: [A-Z_]+ at line 1, column \d+/ },
  { name: 'invalid YAML: duplicate key holding a token', yaml: (s) => `quorum: 1\nquorum: "${s}"\n`, says: /not valid YAML: DUPLICATE_KEY at line 2/ },
  { name: 'invalid YAML: tab indentation on the token line', yaml: (s) => `quorum: 1\nbackends:\n\t- token: ${s}\n`, says: /not valid YAML: [A-Z_]+ at line \d+/ },
];

const prepared = async (t: ExecutionContext, c: Case) => {
  const dir = await tempDir(t);
  const { value, core, letters } = secret();
  const file = path.join(dir, 'config.yaml');
  await writeFile(file, c.yaml(value, letters));
  const needles = [value, core, letters];
  return { dir, file, leaks: (text: string) => needles.filter((n) => text.includes(n)) };
};

test('config errors, in process: every case names the field; the thrown error holds no secret', async (t) => {
  for (const c of cases) {
    const { file, leaks } = await prepared(t, c);
    const error = await t.throwsAsync(loadConfigFile(file), undefined, c.name);
    t.deepEqual(leaks(inspect(error, { depth: 20, showHidden: true })), [], `${c.name}: the thrown error holds the secret:\n${error?.message}`);
    t.regex(error?.message ?? '', c.says, c.name);
  }
});

// One process at a time: each loads every backend SDK, and the machine is shared.
for (const c of cases) {
  test.serial(`config error, ${c.name}: validate and serve print the field, never the value`, async (t) => {
    const { dir, file, leaks } = await prepared(t, c);
    for (const args of [['validate', '-c', file], ['serve', '-c', file, '--socket', path.join(dir, 'kms.sock')]]) {
      const result = await runCli(args, { timeoutMs: 60_000 });
      t.deepEqual(leaks(result.stdout + result.stderr), [], `${args[0]} printed the secret:\n${result.stderr}`);
      t.is(result.code, 1, `${args[0]} exit code`);
      t.regex(result.stderr, c.says, args[0]);
    }
  });
}
