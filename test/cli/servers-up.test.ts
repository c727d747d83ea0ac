/**
 * test/servers/up.sh: a server that cannot be installed (a third-party program no
 * route could give) does not keep the other servers down. They still start, so the
 * tests that fail are the ones that need it, and the script still exits 1 naming it.
 */
import test from 'ava';
import { execFile } from 'node:child_process';
import { access, copyFile, mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { tempDir } from '../helpers/plugin-harness.ts';

const run = promisify(execFile);
const upScript = path.resolve(import.meta.dirname, '../servers/up.sh');

test('a server that fails to install leaves the others started, and up.sh exits 1 naming it', async (t) => {
  t.timeout(60_000);
  // A checkout of its own: up.sh works from the folder two levels above itself.
  const root = await tempDir(t);
  const servers = path.join(root, 'test', 'servers');
  await mkdir(servers, { recursive: true });
  await copyFile(upScript, path.join(servers, 'up.sh'));
  await writeFile(path.join(servers, 'missing.server.sh'), 'echo "no binary found (FAKE-INSTALL-REASON)"; exit 1\n');
  await writeFile(path.join(servers, 'fine.server.sh'), 'case "$1" in start) touch "$SERVERS_DIR/fine.started" ;; esac\n');

  const error = await run('bash', [path.join(servers, 'up.sh'), 'missing', 'fine'], { timeout: 30_000 }).then(
    () => undefined,
    (e: { code?: number; stderr?: string }) => e,
  );
  t.truthy(error, 'up.sh succeeded although a server was not installed');
  t.is(error?.code, 1);
  t.regex(error?.stderr ?? '', /install of missing failed/);
  t.regex(error?.stderr ?? '', /FAKE-INSTALL-REASON/);
  t.regex(error?.stderr ?? '', /not installed: missing/);
  await t.notThrowsAsync(access(path.join(root, '.servers', 'fine.started')), 'the installed server was not started');
});
