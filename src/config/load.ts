/**
 * Reads and validates the configuration. Errors name the field and echo the bad
 * value, and an invalid file is the only thing that stops the plugin from starting.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { TrousseauError } from '../errors.ts';
import { configSchema, type Config } from './schema.ts';

function describeValue(input: unknown, pathParts: readonly PropertyKey[]): string {
  let value: unknown = input;
  for (const part of pathParts) value = (value as Record<PropertyKey, unknown> | undefined)?.[part];
  if (value === undefined) return 'missing';
  const text = JSON.stringify(value);
  return `got ${text.length > 60 ? `${text.slice(0, 57)}...` : text}`;
}

export function formatIssues(error: z.ZodError, input: unknown): string {
  return error.issues
    .map((issue) => {
      const where = issue.path.length ? issue.path.map(String).join('.') : '(top level)';
      return `  ${where}: ${issue.message} (${describeValue(input, issue.path)})`;
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

export async function loadConfigFile(file: string): Promise<LoadedConfig> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (error) {
    throw new TrousseauError('CONFIG', `cannot read configuration ${file} (${(error as NodeJS.ErrnoException).code ?? 'error'})`, { cause: error });
  }
  let input: unknown;
  try {
    input = parseYaml(text);
  } catch (error) {
    throw new TrousseauError('CONFIG', `configuration ${file} is not valid YAML: ${(error as Error).message}`, { cause: error });
  }
  return { config: parseConfig(input, file), baseDir: path.dirname(path.resolve(file)) };
}

export function configJsonSchema(): unknown {
  return z.toJSONSchema(configSchema, { io: 'input', unrepresentable: 'any' });
}
