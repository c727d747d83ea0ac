#!/usr/bin/env node
// @ts-check
// Runs the CLI from compiled output when present (installed package, container image),
// otherwise from the TypeScript sources with Node's type stripping (a checkout).
// Plain JavaScript that any Node parses, so that an older Node says what it needs
// instead of failing on the .ts sources (ERR_UNKNOWN_FILE_EXTENSION).
import { existsSync } from 'node:fs';

const major = Number(process.versions.node.split('.')[0]);
if (major < 24) {
  console.error(
    `trousseau needs Node 24 or later; this is Node ${process.versions.node}.\n` +
      'In a checkout, `npm ci` installs Node 24 into node_modules: run `npm run trousseau -- ARGS`, ' +
      'or `node_modules/.bin/node bin/trousseau.js ARGS`.',
  );
  process.exit(1);
}

const compiled = existsSync(new URL('../dist/src/main.js', import.meta.url));
if (process.argv[2] === 'serve') {
  // Before any other module is loaded, so that the cache serves all of them (and Node's
  // TypeScript stripper is not loaded at all once it is warm). serve logs the outcome.
  // Imported here, after the version check, not at the top: a static import is loaded
  // before this file runs, and on an older Node its node:module imports would fail
  // before the check could say what is needed. Plain JavaScript, loading nothing else
  // of the plugin.
  const { useCompileCache } = await import('../src/config/compile-cache.js');
  await useCompileCache().catch((/** @type {Error} */ error) => {
    console.error(`trousseau: ${error.message}`);
    process.exit(1);
  });
}
await import(new URL(compiled ? '../dist/src/main.js' : '../src/main.ts', import.meta.url).href);
