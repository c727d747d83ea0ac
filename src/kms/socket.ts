/**
 * Unix socket life cycle, written for a node where every other local user is hostile.
 *
 * - The socket's folder, and every folder on the way to it, must be one that only root
 *   and the plugin's own user can change: otherwise whoever can write there can swap
 *   the socket for a link (and have root chown or chmod the link's target) or for a
 *   socket of their own (and receive the apiserver's plaintext). Such a folder is
 *   refused with a clear message; missing folders are created one at a time, each
 *   checked with lstat, never through a link.
 * - The socket gets its mode from the umask at bind time, so it never exists with a
 *   wider mode; the group (resolved before binding) is set with lchown, which never
 *   follows a link; lstat then checks the result, and only then is the socket linked
 *   into place. Its inode is recorded.
 * - While serving, `SocketIdentity.check` tells whether the path still is that inode;
 *   shutdown unlinks the path only when it still is.
 */
import { lstatSync, unlinkSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { lchown, link, lstat, readFile, unlink } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { prepareTrustedFolder } from '../config/trusted-path.ts';
import { TrousseauError } from '../errors.ts';

export interface SocketSettings {
  path: string;
  /** File mode, default 0o600 (only the apiserver's user). */
  mode: number;
  /** Optional group (name or numeric gid) given access with mode 0o660. */
  group?: string | undefined;
}

/** The device and inode of the socket we bound: what "our socket" means later. */
export interface SocketIdentity {
  path: string;
  dev: number;
  ino: number;
}

/** Mode of folders the plugin creates on the way to the socket. */
const CREATED_FOLDER_MODE = 0o750;

const ownUid = () => process.getuid?.() ?? 0;

function refuse(message: string): never {
  throw new TrousseauError('CONFIG', message);
}

/** The socket's folder, walked and created by the trust rule of src/config/trusted-path.ts. */
const prepareSocketFolder = (folder: string) => prepareTrustedFolder(folder, 'the socket folder', CREATED_FOLDER_MODE);

/** True when something accepts connections on the socket. */
export function isServed(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.connect(socketPath);
    const done = (served: boolean) => {
      probe.destroy();
      resolve(served);
    };
    probe.once('connect', () => done(true));
    probe.once('error', () => done(false));
    probe.setTimeout(1000, () => done(true)); // a hung listener is still a listener: do not steal it
  });
}

/**
 * Make the socket path ready to bind: a trusted folder (created if missing) and no
 * file at the path, a stale socket (left by a crash) removed. Returns the real path
 * of the socket, with no link in it, to bind and check.
 */
export async function prepareSocketPath(socketPath: string): Promise<string> {
  const folder = await prepareSocketFolder(path.dirname(path.resolve(socketPath)));
  const realPath = path.join(folder, path.basename(socketPath));
  let info;
  try {
    info = await lstat(realPath);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return realPath;
    throw error;
  }
  if (!info.isSocket()) refuse(`${socketPath} exists and is not a socket; refusing to replace it`);
  if (await isServed(realPath)) refuse(`another process is serving ${socketPath}; refusing to start a second plugin on it`);
  await unlink(realPath); // stale: left by a crash or a hard reboot; the folder is ours, so nobody can race us here
  return realPath;
}

/** The numeric gid of `group` (a name in /etc/group, or a number). Called before binding. */
export async function resolveGroup(group: string): Promise<number> {
  if (/^\d+$/.test(group)) return Number(group);
  const lines = (await readFile('/etc/group', 'utf8')).split('\n');
  for (const line of lines) {
    const [name, , gid] = line.split(':');
    if (name === group && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  refuse(`socket group "${group}" does not exist`);
}

/** The umask under which bind() creates the socket with exactly `mode`. */
const umaskFor = (mode: number) => ~mode & 0o777;

/**
 * Bind through `bind` so the socket is born with `settings.mode` (via the umask: it
 * never exists with a wider mode), give it the group with lchown (never follows a
 * link), check it with lstat, and only then put it in place.
 *
 * `bind` is given a fresh private name in the same folder; the finished socket is
 * then hard-linked to the real path (which fails rather than replace anything that
 * appeared there meanwhile) and the private name removed. Binding the real path
 * directly would make libuv remember it and unlink it when the server closes, even
 * when it has become another plugin's socket by then. `gid` must be resolved before:
 * nothing slow runs between bind and lchown.
 */
export async function bindPrivately<T>(
  settings: SocketSettings,
  realPath: string,
  gid: number | undefined,
  bind: (bindPath: string) => Promise<T>,
): Promise<{ result: T; identity: SocketIdentity }> {
  const bindPath = path.join(path.dirname(realPath), `.${randomBytes(4).toString('hex')}`);
  const previous = process.umask(umaskFor(settings.mode));
  let result: T;
  try {
    result = await bind(bindPath);
  } finally {
    process.umask(previous);
  }
  try {
    const bound = await lstat(bindPath);
    if (!bound.isSocket() || bound.uid !== ownUid()) refuse(`${settings.path} is not our socket right after bind`);
    if (gid !== undefined) await lchown(bindPath, ownUid(), gid);
    const info = await lstat(bindPath);
    const problem =
      info.dev !== bound.dev || info.ino !== bound.ino
        ? 'was replaced while being set up'
        : (info.mode & 0o777) !== settings.mode
          ? `has mode ${(info.mode & 0o777).toString(8)} instead of ${settings.mode.toString(8)} after bind`
          : gid !== undefined && info.gid !== gid
            ? 'does not have the socket group after bind'
            : undefined;
    if (problem) refuse(`${settings.path} ${problem}`);
    await link(bindPath, realPath).catch((error: NodeJS.ErrnoException) => {
      if (error.code === 'EEXIST') refuse(`another process created ${settings.path} while this plugin was starting; refusing to replace it`);
      throw error;
    });
    return { result, identity: { path: realPath, dev: info.dev, ino: info.ino } };
  } finally {
    await unlink(bindPath).catch(() => undefined);
  }
}

/**
 * Why the socket path no longer is the socket we bound (moved, replaced, removed), or
 * undefined while it is. Synchronous and cheap (one lstat): it runs on every poll and
 * every readiness question.
 */
export function socketReplacedReason(identity: SocketIdentity): string | undefined {
  let info;
  try {
    info = lstatSync(identity.path);
  } catch {
    return 'the socket path was removed';
  }
  if (info.dev !== identity.dev || info.ino !== identity.ino) return 'the socket path was replaced by another file';
  return undefined;
}

/**
 * Remove the socket if the path still is the inode we bound; leave anything else (a
 * second plugin's socket, someone's file) alone. Returns whether it was removed.
 */
export async function removeOwnSocket(identity: SocketIdentity): Promise<boolean> {
  if (socketReplacedReason(identity) !== undefined) return false;
  // The folder is trusted (only root and we can change it), so the path cannot change between the check and the unlink.
  try {
    await unlink(identity.path);
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw error;
  }
}

/** Synchronous removeOwnSocket, for the last moments of a process that must exit now. */
export function removeOwnSocketSync(identity: SocketIdentity): boolean {
  if (socketReplacedReason(identity) !== undefined) return false;
  try {
    unlinkSync(identity.path);
    return true;
  } catch {
    return false;
  }
}
