/**
 * Unix socket life cycle: create the parent folder, replace a stale socket left by a
 * crash (but never a live one, and never a file that is not a socket), and set the
 * permissions before any client can connect.
 */
import { chmod, chown, lstat, mkdir, readFile, unlink } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { TrousseauError } from '../errors.ts';

export interface SocketSettings {
  path: string;
  /** File mode, default 0o600 (only the apiserver's user). */
  mode: number;
  /** Optional group (name or numeric gid) given access with mode 0o660. */
  group?: string | undefined;
}

/** True when something accepts connections on the socket. */
function isServed(socketPath: string): Promise<boolean> {
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

export async function prepareSocketPath(socketPath: string): Promise<void> {
  await mkdir(path.dirname(socketPath), { recursive: true, mode: 0o750 });
  let info;
  try {
    info = await lstat(socketPath);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw error;
  }
  if (!info.isSocket()) {
    throw new TrousseauError('CONFIG', `${socketPath} exists and is not a socket; refusing to replace it`);
  }
  if (await isServed(socketPath)) {
    throw new TrousseauError('CONFIG', `another process is serving ${socketPath}; refusing to start a second plugin on it`);
  }
  await unlink(socketPath); // stale: left by a crash or a hard reboot
}

async function groupId(group: string): Promise<number> {
  if (/^\d+$/.test(group)) return Number(group);
  const lines = (await readFile('/etc/group', 'utf8')).split('\n');
  for (const line of lines) {
    const [name, , gid] = line.split(':');
    if (name === group && gid !== undefined) return Number(gid);
  }
  throw new TrousseauError('CONFIG', `socket group "${group}" does not exist`);
}

/** Run `bind` with a umask that keeps the socket private until its mode is set. */
export async function bindPrivately<T>(settings: SocketSettings, bind: () => Promise<T>): Promise<T> {
  const previous = process.umask(0o177);
  let result: T;
  try {
    result = await bind();
  } finally {
    process.umask(previous);
  }
  if (settings.group !== undefined) await chown(settings.path, process.getuid?.() ?? 0, await groupId(settings.group));
  await chmod(settings.path, settings.mode);
  return result;
}

export async function removeSocket(socketPath: string): Promise<void> {
  try {
    await unlink(socketPath);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
  }
}
