/**
 * SoftHSM2 for the pkcs11 tests, the chaos rig and the bench: each test process
 * works on a private copy of the token test/servers/softhsm.server.sh made (a copy
 * of a token folder is the same token, keys included, as an HSM replica is), so
 * one process moving or re-initialising its token never disturbs another's.
 *
 * The PKCS#11 module is one per process (C_Initialize reads SOFTHSM2_CONF once), so
 * the copy must be chosen before any backend in the process makes its first call.
 */
import { execFile } from 'node:child_process';
import { cp, mkdir, mkdtemp, readdir, rename, rm, writeFile } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { requireServer, requireVar } from '../helpers/servers.ts';
import { pkcs11ConfigSchema, type Pkcs11BackendConfig } from '../../src/backends/pkcs11.ts';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const NODE = path.join(root, 'node_modules', '.bin', 'node');

export interface SoftHsm {
  module: string;
  tokenLabel: string;
  pinFile: string;
  pin: string;
  soPin: string;
  keyLabel: string;
  keyBLabel: string;
  /** Folder of this process's copy: its conf, tokens/ and room to move a token away. */
  dir: string;
  tokensDir: string;
  config(overrides?: Record<string, unknown>): Pkcs11BackendConfig;
  /** Generate a key in the copy from another process (so that this one has not initialised the module yet). */
  generateKey(label: string, options?: { extractable?: boolean }): Promise<string>;
  /** Move the token folder out of the token directory: the module no longer finds the token. */
  removeToken(): Promise<void>;
  /** Put it back. */
  restoreToken(): Promise<void>;
  cleanup(): Promise<void>;
}

export function softHsmServer(): { env: Record<string, string> } | { missing: string } {
  return requireServer('softhsm');
}

export async function privateSoftHsm(env: Record<string, string>): Promise<SoftHsm> {
  const need = (name: string) => requireVar(env, name, 'softhsm');
  const dir = await mkdtemp(path.join(tmpdir(), 'trousseau-softhsm-'));
  const tokensDir = path.join(dir, 'tokens');
  await cp(path.join(need('SOFTHSM_DIR'), 'tokens'), tokensDir, { recursive: true });
  const conf = path.join(dir, 'softhsm2.conf');
  await writeFile(conf, `directories.tokendir = ${tokensDir}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n`);
  process.env.SOFTHSM2_CONF = conf;
  const [tokenFolder] = await readdir(tokensDir);
  const module = need('SOFTHSM_MODULE');
  const tokenLabel = need('SOFTHSM_TOKEN_LABEL');
  const pinFile = need('SOFTHSM_PIN_FILE');
  const away = path.join(dir, 'away');
  return {
    module,
    tokenLabel,
    pinFile,
    pin: readFileSync(pinFile, 'utf8').trim(),
    soPin: readFileSync(need('SOFTHSM_SO_PIN_FILE'), 'utf8').trim(),
    keyLabel: need('SOFTHSM_KEY_LABEL'),
    keyBLabel: need('SOFTHSM_KEY_B_LABEL'),
    dir,
    tokensDir,
    config: (overrides = {}) =>
      pkcs11ConfigSchema.parse({ name: 'hsm', type: 'pkcs11', module, tokenLabel, pinFile, key: { label: need('SOFTHSM_KEY_LABEL') }, ...overrides }),
    async generateKey(label, options = {}) {
      const script = `const { generateTokenKey } = await import(${JSON.stringify(path.join(root, 'src/backends/pkcs11-token.ts'))});
process.stdout.write(generateTokenKey(${JSON.stringify({ modulePath: module, tokenLabel, pinFile })}, ${JSON.stringify(label)}, ${JSON.stringify(options)}));`;
      const { stdout } = await run(NODE, ['--input-type=module', '-e', script], { env: { ...process.env, SOFTHSM2_CONF: conf }, timeout: 60_000 });
      return stdout;
    },
    removeToken: async () => {
      await mkdir(away, { recursive: true });
      await rename(path.join(tokensDir, tokenFolder!), path.join(away, tokenFolder!));
    },
    restoreToken: () => rename(path.join(away, tokenFolder!), path.join(tokensDir, tokenFolder!)),
    cleanup: () => rm(dir, { recursive: true, force: true }),
  };
}
