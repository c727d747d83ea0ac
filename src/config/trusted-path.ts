/**
 * Paths the plugin trusts, on a node where every other local user is hostile.
 *
 * A folder may hold (or lead to) something the plugin relies on — its socket, its
 * development keys, a credential file — only when nobody but root and the plugin's own
 * user can change it: whoever can write a folder can swap what is in it for a link or
 * a file of their own. Paths are walked from the root one component at a time with
 * lstat, so a link is followed only where the folder holding it is trusted.
 *
 * Kubernetes secret and projected volumes fit the rule: their root is a sticky
 * world-writable tmpfs folder holding only root-owned links (`token -> ..data/token`,
 * `..data -> ..2026_12_02...`) into a root-owned 0755 folder.
 *
 * The folder walk itself is in trusted-folder.js, plain JavaScript, so that the
 * compile cache folder can be checked before any TypeScript is loaded.
 */
import { constants as fsConstants, type Stats } from 'node:fs';
import { lstat, open, readlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { TrousseauError } from '../errors.ts';
import { MAX_LINKS, missing, trustedOwner, untrustedFolderReason, walkTrustedFolder as walkFolder, type MissingPathError } from './trusted-folder.js';
/** Open for reading without following a link, without blocking on a FIFO. */
const READ_FLAGS = fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK | fsConstants.O_NOCTTY;
/** A token, secret, certificate chain or key file is far smaller than this. */
const MAX_CREDENTIAL_BYTES = 256 * 1024;

function refuse(message: string): never {
  throw new TrousseauError('CONFIG', message);
}

/** The walk (trusted-folder.js), refusing with a CONFIG error. */
const walkTrustedFolder = (folder: string, what: string, createMode: number | undefined, holdsIt: boolean) =>
  walkFolder(folder, what, createMode, holdsIt, refuse);

/**
 * Walk `folder` from the root, one component at a time, with lstat only: follow a
 * link only when the folder holding it is trusted (and, in a sticky folder, only a
 * link owned by root or us), and refuse any folder someone else could change. A
 * missing folder is created with mkdir (which never follows a link) with `createMode`,
 * or, without one, is an ENOENT error. `what` names the folder in a refusal.
 * Returns the real path.
 */
export async function prepareTrustedFolder(folder: string, what: string, createMode?: number): Promise<string> {
  return (await walkTrustedFolder(folder, what, createMode, true)).path;
}

/**
 * The real path of a file, every folder and link on the way checked by the rule
 * above (links in the file's own folder too, as in a Kubernetes secret volume).
 */
export async function resolveTrustedFile(file: string, what: string): Promise<string> {
  let current = path.resolve(file);
  for (let links = 0; ; links++) {
    const folder = await walkTrustedFolder(path.dirname(current), what, undefined, false);
    const entry = path.join(folder.path, path.basename(current));
    const info = await lstat(entry).catch((error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOENT') throw missing(what, entry, folder);
      throw error;
    });
    if (!info.isSymbolicLink()) {
      // The folder holding the file itself: a sticky world-writable one is not enough.
      const reason = untrustedFolderReason(folder.path, folder.info, true);
      if (reason) refuse(`refusing ${what}: ${reason}`);
      return entry;
    }
    // A sticky folder (a Kubernetes volume's root) may hold links, but only ours or root's.
    if ((folder.info.mode & 0o1000) !== 0 && !trustedOwner(info.uid)) refuse(`refusing ${what}: ${entry} is a link owned by uid ${info.uid}`);
    if (links >= MAX_LINKS) refuse(`refusing ${what}: too many links at ${file}`);
    current = path.resolve(folder.path, await readlink(entry));
  }
}

/** A credential file's content and an identity that changes when the file is replaced or rewritten. */
export interface CredentialFile {
  content: Buffer;
  /** dev:ino:size:mtime:ctime of the file read. */
  stamp: string;
}

/**
 * Open a resolved credential file without following a link and without blocking on a
 * FIFO, and accept it only when it is a regular file owned by root or the plugin's
 * user that others cannot write. `file` is the path as configured, for messages.
 */
async function openCredentialFile(real: string, file: string, what: string): Promise<{ handle: FileHandle; info: Stats }> {
  const handle = await open(real, READ_FLAGS);
  try {
    const info = await handle.stat();
    if (!info.isFile()) refuse(`refusing ${what}: ${file} is not a regular file`);
    if (!trustedOwner(info.uid)) refuse(`refusing ${what}: ${file} is owned by uid ${info.uid}, not by root or the plugin's user`);
    if ((info.mode & 0o022) !== 0) refuse(`refusing ${what}: ${file} is writable by group or others (mode ${(info.mode & 0o777).toString(8)})`);
    return { handle, info };
  } catch (error) {
    await handle.close();
    throw error;
  }
}

/**
 * Read a credential or key file the plugin sends somewhere (a Vault token, an AppRole
 * secret_id, a client secret, a TLS key): the path resolved as above, the file opened
 * without following a link and without blocking on a FIFO, and accepted only when it
 * is a regular file owned by root or the plugin's user that others cannot write.
 * Whether group or others can read it is left to `trousseau doctor` (a warning): a
 * Kubernetes secret volume's files are 0644 unless the pod says otherwise.
 * Errors carry the errno code or the reason, never the content.
 */
export async function readCredentialFile(file: string, what: string): Promise<CredentialFile> {
  const real = await resolveTrustedFile(file, what);
  const { handle, info } = await openCredentialFile(real, file, what);
  try {
    if (info.size > MAX_CREDENTIAL_BYTES) refuse(`refusing ${what}: ${file} is larger than such a file can be`);
    const content = await handle.readFile();
    return { content, stamp: `${info.dev}:${info.ino}:${info.size}:${info.mtimeMs}:${info.ctimeMs}` };
  } finally {
    await handle.close();
  }
}

/**
 * Check, without reading it, a credential file that an SDK reads itself (a web
 * identity token, a shared credentials file, a client certificate), by the rule of
 * readCredentialFile: once it passes, only root and the plugin's user can change what
 * the SDK's own plain read of that path finds.
 *
 * Returns false when the file does not exist (the SDK decides what that means: no
 * ~/.aws/credentials is normal), but only when nobody else could create it there: the
 * deepest folder that exists on the way must be one only root and the plugin's user
 * can write (a sticky world-writable one such as /tmp is not). Throws a CONFIG
 * TrousseauError naming the path and the reason otherwise; never reads the content.
 */
export async function checkSdkCredentialFile(file: string, what: string): Promise<boolean> {
  let real: string;
  try {
    real = await resolveTrustedFile(file, what);
  } catch (error) {
    const { code, holder } = error as MissingPathError;
    if (code !== 'ENOENT' || holder === undefined) throw error;
    const reason = untrustedFolderReason(holder.path, holder.info, true);
    if (reason) refuse(`refusing ${what}: ${file} does not exist, and another user could create it: ${reason}`);
    return false;
  }
  const { handle } = await openCredentialFile(real, file, what);
  await handle.close();
  return true;
}
