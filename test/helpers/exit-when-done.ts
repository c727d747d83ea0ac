// Loaded into every ava worker before its test file (package.json: ava.require).
//
// When ava has finished a file, its worker process must exit. One that lingers makes
// ava print "Timed out while running tests" / "Failed to exit when running <file>"
// after its inactivity timeout, which fails the whole run although every test in the
// file passed. That happened in CI and in full local runs (the chaos scenarios, after
// all 31 passed), never when the file ran alone, and the worker printed nothing even
// from a timer: it was no longer running JavaScript, i.e. it was already in Node's
// natural exit, where the environment's clean-up waits for every pending libuv request
// (seen before as a spin in Environment::CleanupHandles). process.exit() does not wait
// for those. So once ava has reported everything: name any child process this worker
// left running and end it (a plugin left running would keep its socket and ports),
// name the handles still open (for the next person to fix), then exit at once.
import { readdirSync, readFileSync } from 'node:fs';
import { relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import test, { registerCompletionHandler } from 'ava';

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
  const resources = process.getActiveResourcesInfo().filter((name) => name !== 'Timeout' && name !== 'TTYWrap');
  const children = childPids();
  if (children.length > 0) {
    const file = relative(process.cwd(), fileURLToPath(test.meta.file));
    console.error(
      `exit-when-done: ${file} left child processes running after its last test: ${JSON.stringify(children)}; ` +
        `active resources: ${JSON.stringify(resources)}. Ending them.`,
    );
    for (const pid of children) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // Already gone.
      }
    }
  }
  process.exit(process.exitCode ?? 0);
});
