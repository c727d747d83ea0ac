// @ts-check
/**
 * The folder walk of the trusted-path rule (trusted-path.ts explains the rule).
 *
 * Plain JavaScript on purpose: bin/trousseau.js checks the compile cache folder with
 * it before any TypeScript file is loaded. Loading a .ts file makes Node load its
 * type stripper (a WebAssembly module, about 15 MiB of RSS for the life of the
 * process); with a warm compile cache the plugin never loads it, but the cache may be
 * used only once its folder has passed this check. One walk serves both, so the
 * compile cache folder is held to exactly the rule every other trusted path is.
 */
import { lstat, mkdir, readlink } from 'node:fs/promises';
import path from 'node:path';

/** Links followed while walking one path, as the kernel's own limit. */
export const MAX_LINKS = 40;

export const ownUid = () => process.getuid?.() ?? 0;
/**
 * Root and the plugin's own user: the only owners whose folders and files we trust.
 * @param {number} uid
 */
export const trustedOwner = (uid) => uid === 0 || uid === ownUid();

/**
 * Why a folder cannot hold the thing (or lead to it), or undefined when it can.
 * A sticky world-writable folder such as /tmp may lead to it (others cannot rename or
 * remove what they do not own there), but not hold it.
 * @param {string} folder
 * @param {import('node:fs').Stats} info
 * @param {boolean} holdsIt
 * @returns {string | undefined}
 */
export function untrustedFolderReason(folder, info, holdsIt) {
  if (!trustedOwner(info.uid)) return `${folder} is owned by uid ${info.uid}, not by root or the plugin's user`;
  const othersCanWrite = (info.mode & 0o022) !== 0;
  if (!othersCanWrite) return undefined;
  const sticky = (info.mode & 0o1000) !== 0;
  if (sticky && !holdsIt) return undefined;
  return sticky
    ? `${folder} is writable by other users (sticky, like /tmp); it must be a folder only root and the plugin's user can write`
    : `${folder} is writable by users other than root and the plugin's user (mode ${(info.mode & 0o7777).toString(8)})`;
}

/**
 * The folder an entry is missing from: whoever can write it can create the entry.
 * @typedef {{ path: string, info: import('node:fs').Stats }} Holder
 */

/**
 * ENOENT from a walk, with the deepest folder that exists on the way.
 * @typedef {NodeJS.ErrnoException & { holder?: Holder }} MissingPathError
 */

/**
 * An error with the errno code of a missing path, as fs calls give it.
 * @param {string} what
 * @param {string} where
 * @param {Holder} [holder]
 * @returns {MissingPathError}
 */
export function missing(what, where, holder) {
  /** @type {MissingPathError} */
  const error = new Error(`${what}: ${where} does not exist`);
  error.code = 'ENOENT';
  if (holder) error.holder = holder;
  return error;
}

/** @typedef {(message: string) => never} Refuse */

/**
 * Walk `folder` from the root, one component at a time, with lstat only: follow a
 * link only when the folder holding it is trusted (and, in a sticky folder, only a
 * link owned by root or us), and refuse any folder someone else could change. A
 * missing folder is created with mkdir (which never follows a link) with `createMode`,
 * or, without one, is an ENOENT error. `what` names the folder in a refusal, which
 * `refuse` throws. `holdsIt` false when the caller will check what the last folder
 * holds itself. Returns the real path and its lstat.
 * @param {string} folder
 * @param {string} what
 * @param {number | undefined} createMode
 * @param {boolean} holdsIt
 * @param {Refuse} refuse
 * @returns {Promise<{ path: string; info: import('node:fs').Stats }>}
 */
export async function walkTrustedFolder(folder, what, createMode, holdsIt, refuse) {
  const pending = path.resolve(folder).split('/').filter(Boolean);
  let current = '/';
  let currentInfo = await lstat(current);
  let links = 0;
  // Each folder we look into is checked before we trust what we find in it.
  /** @type {(dir: string, info: import('node:fs').Stats, holdsIt: boolean) => void} */
  const check = (dir, info, holdsIt) => {
    const reason = untrustedFolderReason(dir, info, holdsIt);
    if (reason) refuse(`refusing ${what}: ${reason}`);
  };
  check(current, currentInfo, false);
  while (pending.length > 0) {
    const name = /** @type {string} */ (pending.shift());
    if (name === '.') continue;
    if (name === '..') {
      current = path.dirname(current);
      currentInfo = await lstat(current);
      continue;
    }
    const next = path.join(current, name);
    let info = await lstat(next).catch((/** @type {NodeJS.ErrnoException} */ error) => {
      if (error.code === 'ENOENT') return undefined;
      throw error;
    });
    if (info === undefined) {
      if (createMode === undefined) throw missing(what, next, { path: current, info: currentInfo });
      await mkdir(next, { mode: createMode }).catch((/** @type {NodeJS.ErrnoException} */ error) => {
        // Someone created it first: what is there now is checked below like anything else.
        if (error.code !== 'EEXIST') throw error;
      });
      info = await lstat(next);
    }
    if (info.isSymbolicLink()) {
      // In a sticky folder others may own entries; only a link root or we made is trusted.
      if ((currentInfo.mode & 0o1000) !== 0 && !trustedOwner(info.uid)) refuse(`refusing ${what}: ${next} is a link owned by uid ${info.uid}`);
      if (++links > MAX_LINKS) refuse(`refusing ${what}: too many links under ${folder}`);
      const target = await readlink(next);
      pending.unshift(...target.split('/').filter(Boolean));
      if (path.isAbsolute(target)) {
        current = '/';
        currentInfo = await lstat(current);
      }
      continue;
    }
    if (!info.isDirectory()) refuse(`refusing ${what}: ${next} is not a folder`);
    check(next, info, false);
    current = next;
    currentInfo = info;
  }
  // The folder that holds it: a sticky world-writable one is not enough here.
  if (holdsIt) check(current, currentInfo, true);
  return { path: current, info: currentInfo };
}
