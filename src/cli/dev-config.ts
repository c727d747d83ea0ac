/**
 * The embedded default of `serve --dev`: three local key backends (local-a, local-b,
 * local-c) in DATA_DIR, quorum 2. Keys are created only on the very first start, when
 * the folder holds no key at all. After that a missing key file makes that backend
 * unavailable: creating a new key in its place would silently lose every envelope
 * the old one wrapped.
 */
import { mkdir, readdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from 'pino';
import { generateKeyFile } from '../backends/local.ts';
import { parseConfig } from '../config/load.ts';
import type { Config } from '../config/schema.ts';
import { TrousseauError } from '../errors.ts';

export const DEV_BACKENDS = ['local-a', 'local-b', 'local-c'] as const;

/**
 * Written once every key exists. Until then the plugin has never served, so no
 * envelope can depend on a key yet and an interrupted first start may be completed.
 */
const INITIALISED_MARKER = '.keys-initialised';

export async function prepareDevKeys(dataDir: string, logger: Logger): Promise<void> {
  await mkdir(dataDir, { recursive: true, mode: 0o700 }).catch((error: NodeJS.ErrnoException) => {
    // mkdir's own words ("EEXIST: file already exists, mkdir") do not say which part is wrong.
    if (error.code === 'EEXIST') throw new TrousseauError('CONFIG', `--data-dir ${dataDir} is a file, not a folder; name a folder for the development keys`);
    if (error.code === 'ENOTDIR') throw new TrousseauError('CONFIG', `--data-dir ${dataDir}: a part of the path is a file, not a folder`);
    if (error.code === 'EACCES') throw new TrousseauError('CONFIG', `--data-dir ${dataDir} cannot be created (EACCES): choose a folder this user may write`);
    throw error;
  });
  const files = await readdir(dataDir);
  if (files.includes(INITIALISED_MARKER)) return;
  for (const name of DEV_BACKENDS) {
    if (files.includes(`${name}.key`)) continue; // an interrupted first start: keep what it made
    const version = await generateKeyFile(path.join(dataDir, `${name}.key`));
    logger.info({ backend: name, keyVersion: version }, 'created development key file');
  }
  await writeFile(path.join(dataDir, INITIALISED_MARKER), 'development keys created; a missing key file is never recreated\n', { mode: 0o600 });
}

export function devConfig(dataDir: string, socketPath: string, overrides: { httpListen?: string | undefined; logLevel?: string | undefined }): Config {
  return parseConfig(
    {
      socket: { path: socketPath },
      quorum: 2,
      backends: DEV_BACKENDS.map((name) => ({ name, type: 'local', keyFile: path.join(dataDir, `${name}.key`) })),
      ...(overrides.httpListen ? { http: { listen: overrides.httpListen } } : {}),
      ...(overrides.logLevel ? { log: { level: overrides.logLevel } } : {}),
    },
    'development configuration',
  );
}
