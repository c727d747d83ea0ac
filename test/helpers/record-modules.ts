/**
 * Preloaded with `node --import` by tests that check which modules a process loads:
 * every module URL the process loads (import and require alike) is written, one a
 * line, to the file named by RECORD_MODULES_FILE when the process exits.
 */
import { writeFileSync } from 'node:fs';
import { registerHooks } from 'node:module';

const file = process.env.RECORD_MODULES_FILE;
if (!file) throw new Error('RECORD_MODULES_FILE is not set');
const loaded = new Set<string>();
registerHooks({
  load(url, context, nextLoad) {
    loaded.add(url);
    return nextLoad(url, context);
  },
});
process.on('exit', () => writeFileSync(file, [...loaded].join('\n') + '\n'));
