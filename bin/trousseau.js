#!/usr/bin/env node
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

const compiled = new URL('../dist/src/main.js', import.meta.url);
await import(existsSync(compiled) ? compiled.href : new URL('../src/main.ts', import.meta.url).href);
