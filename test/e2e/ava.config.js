// ava settings of the end-to-end suite (test/e2e/run.sh), apart from package.json's:
// these files start etcd, kube-apiserver and the plugin, so they run one at a time,
// their tests in order (each file is one cluster's story), with long timeouts, and
// never in the normal `npx ava` run (its glob is test/**/*.test.ts).
import { fileURLToPath } from 'node:url';

export default {
  // Relative to the project folder (package.json's), not to this file.
  files: ['test/e2e/*.e2e.ts'],
  extensions: { ts: 'module' },
  workerThreads: false,
  concurrency: 1,
  serial: true,
  timeout: '10m',
  // Absolute: ava resolves a relative entry against its cache folder here.
  require: [fileURLToPath(new URL('../helpers/exit-when-done.ts', import.meta.url))],
};
