/**
 * Every EncryptionConfiguration a user may copy: the YAML files under deploy/ and
 * docs/, and the ```yaml blocks of the Markdown pages there (the same rule as
 * test/k8s/examples_test.go). Each is given to a real kube-apiserver as written,
 * except that every KMS endpoint is pointed at this run's plugin socket.
 */
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';
import { repoRoot } from './plugin-config.ts';

export interface KmsProvider {
  apiVersion: 'v1' | 'v2';
  name: string;
}

export interface EncryptionConfigExample {
  /** Path relative to the repository, plus "#yaml-block-N" for Markdown. */
  where: string;
  text: string;
  /** The resources of the first rule and its first provider: what new writes use. */
  resources: string[];
  first: KmsProvider | undefined;
  providers: KmsProvider[];
  /** True when any KMS provider is v1 (the apiserver then needs the KMSv1 gate). */
  needsKmsV1: boolean;
}

const KIND = /^kind:\s*EncryptionConfiguration\s*$/m;
const FENCE = /^([ \t]*)```ya?ml[^\n]*\n([\s\S]*?)^[ \t]*```/gm;
const ENDPOINT = /^(\s*endpoint:\s*)["']?unix:\/\/[^\s"']+["']?\s*$/gm;

function* files(dir: string): Generator<string> {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) yield* files(full);
    else if (/\.(ya?ml|md)$/i.test(entry.name)) yield full;
  }
}

interface ProviderYaml {
  kms?: { apiVersion?: string; name?: string };
}

export function findEncryptionConfigs(): EncryptionConfigExample[] {
  const found: EncryptionConfigExample[] = [];
  for (const top of ['deploy', 'docs']) {
    for (const file of [...files(path.join(repoRoot, top))].sort()) {
      const rel = path.relative(repoRoot, file);
      const data = readFileSync(file, 'utf8');
      const blocks = rel.endsWith('.md')
        ? [...data.matchAll(FENCE)].map((m) => m[2]!.split('\n').map((line) => (line.startsWith(m[1]!) ? line.slice(m[1]!.length) : line)).join('\n'))
        : [data];
      blocks.forEach((block, i) => {
        block.split(/^---\s*$/m).forEach((doc, j) => {
          if (!KIND.test(doc)) return;
          const where = rel + (rel.endsWith('.md') ? `#yaml-block-${i + 1}` : '') + (j > 0 ? `#doc-${j + 1}` : '');
          const parsed = YAML.parse(doc) as { resources: { resources: string[]; providers: ProviderYaml[] }[] };
          const providers = parsed.resources.flatMap((rule) => rule.providers)
            .filter((p) => p.kms)
            // An omitted apiVersion means v1 (docs/kubernetes.md).
            .map((p) => ({ apiVersion: p.kms!.apiVersion === 'v2' ? 'v2' as const : 'v1' as const, name: String(p.kms!.name) }));
          const firstRule = parsed.resources[0]!;
          const firstKms = firstRule.providers[0]?.kms;
          found.push({
            where,
            text: doc,
            resources: firstRule.resources,
            first: firstKms ? { apiVersion: firstKms.apiVersion === 'v2' ? 'v2' : 'v1', name: String(firstKms.name) } : undefined,
            providers,
            needsKmsV1: providers.some((p) => p.apiVersion === 'v1'),
          });
        });
      });
    }
  }
  return found;
}

/** The example's text with every KMS endpoint pointed at `socketPath`. */
export function pointedAt(example: EncryptionConfigExample, socketPath: string): string {
  return example.text.replace(ENDPOINT, (_line, head: string) => `${head}unix://${socketPath}`);
}
