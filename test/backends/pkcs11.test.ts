/**
 * pkcs11 backend against SoftHSM2 (test/servers/softhsm.server.sh), on a private copy
 * of its token (test/backends/pkcs11-helpers.ts).
 *
 * Serial: the PKCS#11 module's state (initialisation, login) is one per process, so
 * tests that pull the token out would disturb tests running beside them.
 */
import { randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import test from 'ava';
import type { WrapContext } from '../../src/backends/backend.ts';
import { Pkcs11Backend, pkcs11ConfigSchema } from '../../src/backends/pkcs11.ts';
import { errorCodeOf } from '../../src/errors.ts';
import { runBackendConformance } from './conformance.ts';
import { privateSoftHsm, softHsmServer, type SoftHsm } from './pkcs11-helpers.ts';

const run = promisify(execFile);
const root = path.resolve(import.meta.dirname, '../..');
const signal = () => AbortSignal.timeout(10_000);
const contextFor = (b: Pkcs11Backend): WrapContext => ({ envelopeId: randomBytes(16), backendName: b.name });

// ---------------------------------------------------------------- no token needed

test('config: a PIN is never inline, one of tokenLabel and slot, one label per key', (t) => {
  const base = { name: 'hsm', type: 'pkcs11', module: '/usr/lib/softhsm/libsofthsm2.so', tokenLabel: 't', pinFile: 'pin', key: { label: 'k1' } };
  const parsed = pkcs11ConfigSchema.parse(base);
  t.deepEqual(parsed.previousKeys, []);
  t.is(parsed.timeoutMs, 1000);
  for (const bad of [
    { ...base, pin: '1234' },
    { ...base, slot: 0 },
    { ...base, tokenLabel: undefined },
    { ...base, key: { label: 'with:colon' } },
    { ...base, key: { label: 'with space' } },
    { ...base, key: { label: 'k1', id: 'XYZ' } },
    { ...base, previousKeys: [{ label: 'k1' }] },
    { ...base, pinFile: undefined },
  ]) {
    t.false(pkcs11ConfigSchema.safeParse(bad).success, JSON.stringify(bad));
  }
  t.true(pkcs11ConfigSchema.safeParse({ ...base, tokenLabel: undefined, slot: 3 }).success);
});

test('the key policy file and the template keygen uses say the same', async (t) => {
  const policy = JSON.parse(readFileSync(path.join(root, 'policies/pkcs11/key-template.json'), 'utf8')) as {
    required: Record<string, unknown>;
    requiredForTheCurrentKey: Record<string, unknown>;
    setByKeygen: Record<string, unknown>;
  };
  const { keyTemplate, policyViolation } = await import('../../src/backends/pkcs11-token.ts');
  const pkcs11js = (await import('pkcs11js')).default as unknown as Record<string, number>;
  const names = new Map(Object.entries(pkcs11js).filter(([n]) => /^CK[AOK]_/.test(n)).map(([n, v]) => [`${n.slice(0, 3)}:${v}`, n]));
  const template = Object.fromEntries(
    keyTemplate('k', Buffer.from('01', 'hex'))
      .filter((a) => a.type !== pkcs11js.CKA_LABEL && a.type !== pkcs11js.CKA_ID)
      .map((a) => {
        const name = names.get(`CKA:${a.type}`)!;
        const value = typeof a.value === 'number' && name !== 'CKA_VALUE_LEN' ? names.get(`${name === 'CKA_CLASS' ? 'CKO' : 'CKK'}:${a.value}`) : a.value;
        return [name, value];
      }),
  );
  t.deepEqual(template, { ...policy.required, ...policy.requiredForTheCurrentKey, ...policy.setByKeygen });
  // And the check refuses what the policy forbids.
  const good = { keyType: pkcs11js.CKK_AES, valueLength: 32, checkValue: undefined, id: undefined, flags: { token: true, sensitive: true, extractable: false, neverExtractable: true, encrypt: true, decrypt: true, wrap: false, unwrap: false, sign: false, verify: false, derive: false } };
  t.is(policyViolation(good), undefined);
  for (const [flag, value] of [['extractable', true], ['extractable', undefined], ['sensitive', false], ['wrap', true], ['derive', true], ['token', false], ['decrypt', false]] as const) {
    t.truthy(policyViolation({ ...good, flags: { ...good.flags, [flag]: value } }), `${flag}=${String(value)} passes`);
  }
  t.truthy(policyViolation({ ...good, valueLength: 16 }));
});

test('a plugin without a pkcs11 backend never loads the native binding', async (t) => {
  const script = `await import(${JSON.stringify(path.join(root, 'src/backends/registry.ts'))});
const { readFileSync } = await import('node:fs');
process.stdout.write(String(readFileSync('/proc/self/maps', 'utf8').includes('pkcs11.node')));`;
  const { stdout } = await run(path.join(root, 'node_modules/.bin/node'), ['--input-type=module', '-e', script], { timeout: 60_000 });
  t.is(stdout, 'false');
});

// ---------------------------------------------------------------- SoftHSM2

const server = softHsmServer();
if ('missing' in server) {
  test.skip('pkcs11 (SoftHSM2): real token tests', () => {});
} else {
  let hsm!: SoftHsm;
  const extractableLabel = `extractable-${randomBytes(3).toString('hex')}`;
  test.before(async () => {
    hsm = await privateSoftHsm(server.env);
    // Before any backend of this process initialises the module (it reads the token list once).
    await hsm.generateKey(extractableLabel, { extractable: true });
  });
  test.after.always(async () => hsm?.cleanup());

  const backend = (overrides: Record<string, unknown> = {}) => new Pkcs11Backend(hsm.config(overrides), { baseDir: hsm.dir });

  runBackendConformance(test, {
    label: 'pkcs11 (SoftHSM2)',
    create: () => backend(),
    createUnreachable: () => backend({ tokenLabel: 'no-such-token' }),
    secrets: ['SOFTHSM_PIN_FILE', 'SOFTHSM_SO_PIN_FILE'].map((name) => readFileSync(server.env[name]!, 'utf8').trim()),
    bindsContext: true,
  });

  test.serial('key version: label and check value; rotation to a new key object keeps old copies unwrapping', async (t) => {
    const first = backend();
    const rotated = backend({ key: { label: hsm.keyBLabel }, previousKeys: [{ label: hsm.keyLabel }] });
    const forgetful = backend({ key: { label: hsm.keyBLabel } });
    try {
      const v1 = await first.currentKeyVersion(signal());
      t.regex(v1, new RegExp(`^${hsm.keyLabel}:[0-9a-f]{6}$`));
      const dataKey = randomBytes(32);
      const context = contextFor(first);
      const old = await first.wrap(dataKey, context, signal());
      const v2 = await rotated.currentKeyVersion(signal());
      t.not(v2, v1);
      t.true(v2.startsWith(`${hsm.keyBLabel}:`));
      t.true(Buffer.from(await rotated.unwrap(old.wrapped, old.keyVersion, context, signal())).equals(dataKey));
      const fresh = await rotated.wrap(randomBytes(32), contextFor(rotated), signal());
      t.is(fresh.keyVersion, v2);
      // Without the old label configured, the old copy is refused as a copy, not as an outage.
      const error = await t.throwsAsync(forgetful.unwrap(old.wrapped, old.keyVersion, context, signal()));
      t.is(errorCodeOf(error), 'BACKEND_REJECTED');
    } finally {
      await Promise.all([first.close(), rotated.close(), forgetful.close()]);
    }
  });

  test.serial('an extractable key is refused before any use', async (t) => {
    const b = backend({ key: { label: extractableLabel } });
    try {
      const error = await t.throwsAsync(b.currentKeyVersion(signal()));
      t.is(errorCodeOf(error), 'BACKEND_REJECTED');
      t.regex(error.message, /extractable/);
      t.is(errorCodeOf(await t.throwsAsync(b.wrap(randomBytes(32), contextFor(b), signal()))), 'BACKEND_REJECTED');
    } finally {
      await b.close();
    }
  });

  test.serial('token removed then back: unavailable meanwhile, then the backend logs in again and old copies unwrap', async (t) => {
    const b = backend();
    try {
      const dataKey = randomBytes(32);
      const context = contextFor(b);
      const copy = await b.wrap(dataKey, context, signal());
      const loginsBefore = b.logins;
      await hsm.removeToken();
      try {
        const error = await t.throwsAsync(b.wrap(randomBytes(32), contextFor(b), signal()));
        t.is(errorCodeOf(error), 'BACKEND_UNAVAILABLE');
      } finally {
        await hsm.restoreToken();
      }
      // Failed connections are retried after a short pause: wait for the first success.
      const deadline = Date.now() + 30_000;
      let unwrapped: Uint8Array | undefined;
      while (!unwrapped && Date.now() < deadline) {
        unwrapped = await b.unwrap(copy.wrapped, copy.keyVersion, context, signal()).catch(() => undefined);
        if (!unwrapped) await sleep(100);
      }
      t.true(unwrapped !== undefined && Buffer.from(unwrapped).equals(dataKey), 'never unwrapped after the token came back');
      t.true(b.logins > loginsBefore, 'no new login');
      t.is((await b.wrap(randomBytes(32), contextFor(b), signal())).keyVersion, copy.keyVersion);
    } finally {
      await b.close();
    }
  });

  test.serial('PIN file: refused when group or others can read it or when it is a link; the PIN is in no message', async (t) => {
    const open = path.join(hsm.dir, 'open.pin');
    await writeFile(open, `${hsm.pin}\n`, { mode: 0o644 });
    const link = path.join(hsm.dir, 'link.pin');
    await symlink(hsm.pinFile, link);
    for (const [file, reason] of [
      [open, /chmod 600/],
      [link, /symbolic link/],
    ] as const) {
      const b = backend({ pinFile: file });
      try {
        const error = await t.throwsAsync(b.wrap(randomBytes(32), contextFor(b), signal()));
        t.is(errorCodeOf(error), 'BACKEND_UNAVAILABLE');
        t.regex(error.message, reason);
        t.false(error.message.includes(hsm.pin));
      } finally {
        await b.close();
      }
    }
  });

  test.serial('a wrong PIN is not tried again until the PIN file changes', async (t) => {
    const file = path.join(hsm.dir, 'wrong.pin');
    const wrong = randomBytes(6).toString('hex');
    await writeFile(file, `${wrong}\n`, { mode: 0o600 });
    const b = backend({ pinFile: file });
    try {
      const first = await t.throwsAsync(b.wrap(randomBytes(32), contextFor(b), signal()));
      t.is(errorCodeOf(first), 'BACKEND_UNAVAILABLE');
      t.regex(first.message, /CKR_PIN_INCORRECT/);
      t.false(first.message.includes(wrong));
      await sleep(700); // past the pause after a failed connection
      const again = await t.throwsAsync(b.wrap(randomBytes(32), contextFor(b), signal()));
      t.regex(again.message, /not tried again until the file changes/);
      await writeFile(file, `${hsm.pin}\n`, { mode: 0o600 });
      await sleep(700);
      const copy = await b.wrap(randomBytes(32), contextFor(b), signal());
      t.truthy(copy.keyVersion);
    } finally {
      await b.close();
    }
  });
}
