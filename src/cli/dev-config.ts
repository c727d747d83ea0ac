/**
 * The embedded default of `serve --dev`: three local key backends (local-a, local-b,
 * local-c) in DATA_DIR, quorum 2. Keys are created only on the very first start, when
 * the folder holds no key at all. After that a missing key file makes that backend
 * unavailable: creating a new key in its place would silently lose every envelope
 * the old one wrapped.
 */
import { constants as fsConstants } from 'node:fs';
import { mkdir, open, readdir } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from 'pino';
import { generateKeyFile } from '../backends/local.ts';
import { parseConfig } from '../config/load.ts';
import type { Config } from '../config/schema.ts';
import { TrousseauError } from '../errors.ts';
import { prepareTrustedFolder } from '../config/trusted-path.ts';

export const DEV_BACKENDS = ['local-a', 'local-b', 'local-c'] as const;

/**
 * Written once every key exists. Until then the plugin has never served, so no
 * envelope can depend on a key yet and an interrupted first start may be completed.
 */
const INITIALISED_MARKER = '.keys-initialised';
/** Created, never opened through a link and never over an existing file. */
const MARKER_FLAGS = fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW;

export async function prepareDevKeys(dataDir: string, logger: Logger): Promise<void> {
  await mkdir(dataDir, { recursive: true, mode: 0o700 }).catch((error: NodeJS.ErrnoException) => {
    // mkdir's own words ("EEXIST: file already exists, mkdir") do not say which part is wrong.
    if (error.code === 'EEXIST') throw new TrousseauError('CONFIG', `--data-dir ${dataDir} is a file, not a folder; name a folder for the development keys`);
    if (error.code === 'ENOTDIR') throw new TrousseauError('CONFIG', `--data-dir ${dataDir}: a part of the path is a file, not a folder`);
    if (error.code === 'EACCES') throw new TrousseauError('CONFIG', `--data-dir ${dataDir} cannot be created (EACCES): choose a folder this user may write`);
    throw error;
  });
  // Whoever can write the key folder can replace the keys (or plant links in it): the
  // same trust rule as the socket's folder, the whole path walked without trusting a
  // link that someone else could have made.
  await prepareTrustedFolder(dataDir, 'the development key folder (--data-dir)', 0o700);
  const files = await readdir(dataDir);
  if (files.includes(INITIALISED_MARKER)) return;
  for (const name of DEV_BACKENDS) {
    if (files.includes(`${name}.key`)) continue; // an interrupted first start: keep what it made
    const version = await generateKeyFile(path.join(dataDir, `${name}.key`));
    logger.info({ backend: name, keyVersion: version }, 'created development key file');
  }
  const marker = await open(path.join(dataDir, INITIALISED_MARKER), MARKER_FLAGS, 0o600);
  try {
    await marker.writeFile('development keys created; a missing key file is never recreated\n');
  } finally {
    await marker.close();
  }
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
