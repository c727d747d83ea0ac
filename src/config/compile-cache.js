// @ts-check
/**
 * Node's compile cache for `trousseau serve` (TROUSSEAU_COMPILE_CACHE=FOLDER).
 *
 * With a warm cache Node neither compiles the plugin's modules again nor loads its
 * TypeScript stripper: measured in docs/performance.md, about 15 MiB less RSS and
 * half the start-up CPU. But a compile cache is code: V8 runs what it deserialises
 * from it without any check that a hostile writer could not forge. The plugin runs as
 * root on a control-plane node, so the cache is used only when its folder passes the
 * trusted-path rule (trusted-folder.js: every folder on the way owned by root or the
 * plugin's user and not writable by others, links followed only inside trusted
 * folders) and everything already in it is a plain folder or file that nobody else
 * owns or can write. Otherwise it is not used, and `serve` logs one line saying why.
 *
 * Plain JavaScript, loaded by bin/trousseau.js before any TypeScript file: the cache
 * has to be enabled before the modules it serves are loaded, and loading a .ts file
 * first would load the stripper this is meant to avoid.
 */
import { lstat, readdir } from 'node:fs/promises';
import { constants, enableCompileCache, getCompileCacheDir } from 'node:module';
import path from 'node:path';
import { trustedOwner, untrustedFolderReason, walkTrustedFolder } from './trusted-folder.js';

const WHAT = 'the compile cache folder';
/** Node's layout: FOLDER/<version-arch-flags-uid>/<hash>: one level of folders, then files. */
const MAX_DEPTH = 1;

/**
 * @typedef {{ used: true, folder: string } | { used: false, folder: string, reason: string }} CompileCacheOutcome
 */

// Kept on the process, not in this module: a build from compiled output loads its own
// copy of this module from dist/, while bin/trousseau.js loads this one.
const OUTCOME = Symbol.for('trousseau.compileCacheOutcome');
/** @type {{ [OUTCOME]?: CompileCacheOutcome }} */
const holder = /** @type {never} */ (process);

/** What became of the compile cache asked for, or undefined when none was. */
export const compileCacheOutcome = () => holder[OUTCOME];
/** @param {CompileCacheOutcome} value */
const record = (value) => {
  holder[OUTCOME] = value;
};

class Refused extends Error {}
/** @type {import('./trusted-folder.js').Refuse} */
const refuse = (message) => {
  throw new Refused(message);
};

/**
 * Everything under `folder` must be a folder or a regular file (no link, device or
 * FIFO), owned by root or the plugin's user, that group and others cannot write.
 * @param {string} folder
 * @param {number} depth
 */
async function checkContents(folder, depth = 0) {
  for (const name of await readdir(folder)) {
    const entry = path.join(folder, name);
    const info = await lstat(entry);
    if (info.isDirectory()) {
      const reason = untrustedFolderReason(entry, info, true);
      if (reason) refuse(`refusing ${WHAT}: ${reason}`);
      if (depth >= MAX_DEPTH) refuse(`refusing ${WHAT}: ${entry} is deeper than Node's cache layout`);
      await checkContents(entry, depth + 1);
    } else if (info.isFile()) {
      if (!trustedOwner(info.uid)) refuse(`refusing ${WHAT}: ${entry} is owned by uid ${info.uid}, not by root or the plugin's user`);
      if ((info.mode & 0o022) !== 0) refuse(`refusing ${WHAT}: ${entry} is writable by group or others (mode ${(info.mode & 0o777).toString(8)})`);
    } else {
      refuse(`refusing ${WHAT}: ${entry} is ${info.isSymbolicLink() ? 'a link' : 'not a regular file or folder'}`);
    }
  }
}

/**
 * Check `folder` (created 0700 when missing) and its contents, then enable the cache
 * in it. A refusal or failure leaves the cache off and is recorded for the log line.
 * @param {string} folder
 */
async function enableTrusted(folder) {
  try {
    const real = (await walkTrustedFolder(folder, WHAT, 0o700, true, refuse)).path;
    await checkContents(real);
    // Node creates its sub-folder with mode 0777 less the umask: under a umask of 0 a
    // folder anyone could write cache entries into. 0700 whatever the umask.
    const umask = process.umask(0o077);
    let result;
    try {
      result = enableCompileCache(real);
    } finally {
      process.umask(umask);
    }
    record(
      result.status === constants.compileCacheStatus.ENABLED
        ? { used: true, folder: real }
        : { used: false, folder, reason: result.message ?? `Node's status ${result.status}` },
    );
  } catch (error) {
    const reason = error instanceof Refused ? error.message : `${/** @type {NodeJS.ErrnoException} */ (error).code ?? 'error'} preparing ${WHAT}`;
    record({ used: false, folder, reason });
  }
}

/**
 * For `serve`, before anything else is loaded. A cache Node enabled itself from
 * NODE_COMPILE_CACHE has served code already (this very module): if its folder fails
 * the rule, start-up is refused (the error is thrown), since the damage cannot be
 * undone from here. Otherwise TROUSSEAU_COMPILE_CACHE, when set, is checked and used.
 * @param {NodeJS.ProcessEnv} env
 */
export async function useCompileCache(env = process.env) {
  const inherited = getCompileCacheDir();
  if (inherited !== undefined) {
    try {
      await walkTrustedFolder(inherited, WHAT, undefined, true, refuse);
      await checkContents(inherited, 1);
    } catch (error) {
      const why = error instanceof Refused ? error.message : `${/** @type {NodeJS.ErrnoException} */ (error).code ?? 'error'} checking it`;
      throw new Error(`NODE_COMPILE_CACHE: ${why}; code may already have been loaded from it, so the plugin does not start (unset it; TROUSSEAU_COMPILE_CACHE names a checked cache folder)`, { cause: error });
    }
    record({ used: true, folder: inherited });
    return;
  }
  const folder = env.TROUSSEAU_COMPILE_CACHE;
  if (folder) await enableTrusted(folder);
}
