// Loaded into every ava worker before its test file (package.json: ava.require).
//
// When ava has finished a file, its worker process must exit. One that lingers (an
// open handle a test forgot: a socket, a timer, a child process's pipes) makes ava
// print "Timed out while running tests" / "Failed to exit when running <file>" after
// its 60 s inactivity timeout, and that fails the whole run although every test in the
// file passed. It happened now and then on slower machines and was never caught in the
// act. So: a worker still alive a moment after its last test says what keeps it alive
// (for the next person to fix), ends the child processes it started (a plugin left
// running would keep its socket and ports), and exits. Results are already reported.
import { readdirSync, readFileSync } from 'node:fs';
import { relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import test, { registerCompletionHandler } from 'ava';

const GRACE_MS = 2000;

/** Processes whose parent is this worker (Linux /proc; elsewhere none are found). */
function childPids(): number[] {
  const children: number[] = [];
  let entries: string[];
  try {
    entries = readdirSync('/proc').filter((name) => /^\d+$/.test(name));
  } catch {
    return children;
  }
  for (const pid of entries) {
    try {
      // Field 4 of /proc/<pid>/stat is the parent pid; field 2 (the command) is in
      // parentheses and may itself contain spaces, so parse after the last ')'.
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (Number(fields[1]) === process.pid) children.push(Number(pid));
    } catch {
      // The process ended while we looked.
    }
  }
  return children;
}

registerCompletionHandler(() => {
  setTimeout(() => {
    const resources = process.getActiveResourcesInfo().filter((name) => name !== 'Timeout');
    const children = childPids();
    const file = relative(process.cwd(), fileURLToPath(test.meta.file));
    console.error(
      `exit-when-done: the worker for ${file} is still alive ${GRACE_MS} ms after its last test; ` +
        `active resources: ${JSON.stringify(resources)}; child processes: ${JSON.stringify(children)}. Ending them and exiting.`,
    );
    for (const pid of children) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // Already gone.
      }
    }
    process.exit(process.exitCode ?? 0);
  }, GRACE_MS).unref();
});
