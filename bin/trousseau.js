#!/usr/bin/env node
// Runs the CLI from compiled output when present (installed package, container image),
// otherwise from the TypeScript sources with Node's type stripping (a checkout).
import { existsSync } from 'node:fs';

const compiled = new URL('../dist/src/main.js', import.meta.url);
await import(existsSync(compiled) ? compiled.href : new URL('../src/main.ts', import.meta.url).href);
