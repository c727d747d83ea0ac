/**
 * Reads and validates the configuration. An invalid file is the only thing that
 * stops the plugin from starting.
 *
 * Errors name the field, what it expects and what kind of thing it got ("got a
 * string"), never the value itself: a configuration may hold a token where it should
 * not (an unknown key next to a real one, a secret pasted into the wrong field), and
 * the message goes to a terminal and to the pod log. That rules out zod's messages
 * for unknown keys (they quote the keys), the yaml library's messages (they quote the
 * source line) and any message a schema builds from the input; see formatIssues.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { parseDocument, YAMLError } from 'yaml';
import { z } from 'zod';
import { TrousseauError } from '../errors.ts';
import { configSchema, type Config } from './schema.ts';

type Issue = z.core.$ZodIssue;

function valueAt(input: unknown, pathParts: readonly PropertyKey[]): unknown {
  let value: unknown = input;
  for (const part of pathParts) value = typeof value === 'object' && value !== null ? (value as Record<PropertyKey, unknown>)[part] : undefined;
  return value;
}

/** What kind of value sits at a path ("a string", "missing"): never the value. */
function kindOf(value: unknown): string {
  if (value === undefined) return 'nothing (missing)';
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'a list';
  if (typeof value === 'object') return 'a mapping';
  if (typeof value === 'number' && !Number.isFinite(value)) return 'a non-finite number';
  return `a ${typeof value}`;
}

/**
 * A key name we show only when it looks like a field name (letters only, short):
 * an unknown key might be a pasted secret, and tokens carry digits or punctuation.
 */
const SHOWABLE_KEY = /^[A-Za-z][A-Za-z_-]{0,31}$/;

function unknownKeys(keys: readonly string[]): string {
  const shown = keys.filter((k) => SHOWABLE_KEY.test(k)).map((k) => `"${k}"`);
  const hidden = keys.length - shown.length;
  const parts = [...shown, ...(hidden > 0 ? [`${hidden} not shown because ${hidden > 1 ? 'they do' : 'it does'} not look like a field name`] : [])];
  return `unknown key${keys.length > 1 ? 's' : ''} (${parts.join(', ')}): not allowed here`;
}

const LIST = (values: readonly unknown[]) => values.map((v) => JSON.stringify(v)).join(' | ');

function bound(issue: { origin: string; inclusive?: boolean }, limit: number | bigint, lower: boolean): string {
  const exact = issue.inclusive !== false;
  const relation = lower ? (exact ? 'at least' : 'more than') : exact ? 'at most' : 'less than';
  if (issue.origin === 'string') return `must have ${relation} ${limit} ${limit === 1 ? 'character' : 'characters'}`;
  if (issue.origin === 'array' || issue.origin === 'set') return `must have ${relation} ${limit} ${limit === 1 ? 'entry' : 'entries'}`;
  return `must be ${relation} ${limit}`;
}

/** Every string value in the input long enough to be worth hiding (keys are the schema's words). */
function inputStrings(input: unknown, found = new Set<string>(), depth = 0): Set<string> {
  if (depth > 32) return found;
  if (typeof input === 'string') {
    if (input.length >= 6) found.add(input);
  } else if (Array.isArray(input)) {
    for (const item of input) inputStrings(item, found, depth + 1);
  } else if (typeof input === 'object' && input !== null) {
    for (const value of Object.values(input)) inputStrings(value, found, depth + 1);
  }
  return found;
}

/**
 * A message written by a schema (a refine, a regex's explanation): shown unless it
 * quotes something from the input, which a schema may do by mistake.
 */
function authored(message: string, quoted: ReadonlySet<string>): string {
  for (const text of quoted) if (message.includes(text)) return 'is invalid (the explanation is withheld because it quotes the configuration)';
  return message;
}

/** One issue as "what is expected", from the issue's structured fields. */
function describe(issue: Issue, input: unknown, quoted: ReadonlySet<string>): string {
  switch (issue.code) {
    case 'invalid_type':
      return `expected ${issue.expected}, got ${kindOf(valueAt(input, issue.path))}`;
    case 'unrecognized_keys':
      return unknownKeys(issue.keys);
    case 'invalid_value':
      return issue.values.length === 1 ? `must be ${LIST(issue.values)}` : `must be one of ${LIST(issue.values)}`;
    case 'invalid_union': {
      const options = (issue as { options?: unknown[] }).options;
      if (Array.isArray(options)) return `must be one of ${LIST(options)}`;
      return 'matches none of the allowed forms';
    }
    case 'too_small':
      return bound(issue, issue.minimum, true);
    case 'too_big':
      return bound(issue, issue.maximum, false);
    case 'not_multiple_of':
      return `must be a multiple of ${issue.divisor}`;
    case 'invalid_format':
      // zod's own text is "Invalid ..."; anything else is the schema's explanation.
      return issue.message.startsWith('Invalid') ? `must be a valid ${issue.format}` : authored(issue.message, quoted);
    case 'invalid_key':
    case 'invalid_element':
      return `holds an invalid ${issue.code === 'invalid_key' ? 'key' : 'entry'}`;
    default:
      return authored(issue.message, quoted);
  }
}

/** The issues of a failed parse, one line each: path, then what it expects. Never a value. */
export function formatIssues(error: z.ZodError, input: unknown): string {
  const quoted = inputStrings(input);
  return error.issues
    .map((issue) => {
      const where = issue.path.length ? issue.path.map(String).join('.') : '(top level)';
      return `  ${where}: ${describe(issue, input, quoted)}`;
    })
    .join('\n');
}

export function parseConfig(input: unknown, source = 'configuration'): Config {
  const result = configSchema.safeParse(input);
  if (!result.success) throw new TrousseauError('CONFIG', `${source} is invalid:\n${formatIssues(result.error, input)}`);
  return result.data;
}

export interface LoadedConfig {
  config: Config;
  /** Folder of the file: relative paths inside it are resolved against it. */
  baseDir: string;
}

/** A YAML error as its code and position: the library's message quotes the source line. */
function yamlProblem(error: unknown): string {
  if (error instanceof YAMLError) {
    const at = error.linePos?.[0];
    return `${error.code}${at ? ` at line ${at.line}, column ${at.col}` : ''}`;
  }
  return 'the document cannot be read';
}

/** Parse YAML text to plain data; errors give the YAML error code and position only. */
export function parseConfigYaml(text: string, source: string): unknown {
  let problem: string | undefined;
  try {
    const document = parseDocument(text, { prettyErrors: true, uniqueKeys: true });
    const first = document.errors[0];
    if (first) problem = yamlProblem(first);
    else return document.toJS({ maxAliasCount: 100 });
  } catch (error) {
    problem = yamlProblem(error);
  }
  // No cause either: the yaml error's message and source excerpt must not travel.
  throw new TrousseauError('CONFIG', `configuration ${source} is not valid YAML: ${problem}`);
}

export async function loadConfigFile(file: string): Promise<LoadedConfig> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (error) {
    throw new TrousseauError('CONFIG', `cannot read configuration ${file} (${(error as NodeJS.ErrnoException).code ?? 'error'})`, { cause: error });
  }
  return { config: parseConfig(parseConfigYaml(text, file), file), baseDir: path.dirname(path.resolve(file)) };
}

export function configJsonSchema(): unknown {
  return z.toJSONSchema(configSchema, { io: 'input', unrepresentable: 'any' });
}
