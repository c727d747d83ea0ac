/**
 * When a test server does not come up, test/servers/lib.sh's wait_for shows the end
 * of the server's own log, where the reason is (a port in use, a missing Java),
 * instead of a bare "timed out".
 */
import test from 'ava';
import { execFile } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { tempDir } from '../helpers/plugin-harness.ts';

const run = promisify(execFile);
const lib = path.resolve(import.meta.dirname, '../servers/lib.sh');

test('a start that times out prints the tail of the server log', async (t) => {
  t.timeout(120_000);
  const dir = await tempDir(t);
  await mkdir(path.join(dir, 'logs'));
  const script = [
    `source '${lib}'`,
    `start_daemon fake sh -c 'echo "bind: address already in use (FAKE-SERVER-REASON)"; sleep 30'`,
    'trap \'kill "$(cat "$SERVERS_DIR/fake.pid")"\' EXIT',
    // The server has written its reason before the wait gives up, however loaded the machine.
    'until grep -q FAKE-SERVER-REASON "$SERVERS_DIR/logs/fake.log"; do sleep 0.1; done',
    'wait_for "fake server" 1 false',
  ].join('\n');
  const error = await run('bash', ['-c', script], { env: { ...process.env, SERVERS_DIR: dir }, timeout: 60_000 }).then(
    () => undefined,
    (e: { code?: number; stderr?: string }) => e,
  );
  t.truthy(error, 'wait_for succeeded');
  t.regex(error?.stderr ?? '', /timed out after 1s waiting for fake server/);
  t.regex(error?.stderr ?? '', /--- last lines of .*fake\.log:\nbind: address already in use \(FAKE-SERVER-REASON\)/);
});
