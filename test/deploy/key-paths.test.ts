/**
 * One folder for key and credential files everywhere: the manifests (static pod,
 * DaemonSet, Helm chart) agree on it, every file an example configuration names lives
 * in it, and no doc or runbook names another folder under /etc/trousseau (they once
 * said /etc/trousseau/keys while the manifests mounted /etc/trousseau/credentials, so
 * a runbook's `ls` or `install` went to a folder the plugin never reads).
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import test from 'ava';
import { parse as parseYaml, parseAllDocuments } from 'yaml';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const read = (file: string) => readFileSync(path.join(root, file), 'utf8');

function filesUnder(dir: string, extensions: string[]): string[] {
  const out: string[] = [];
  for (const entry of readdirSync(path.join(root, dir))) {
    const rel = path.join(dir, entry);
    if (statSync(path.join(root, rel)).isDirectory()) out.push(...filesUnder(rel, extensions));
    else if (extensions.some((e) => entry.endsWith(e))) out.push(rel);
  }
  return out.sort();
}

interface PodSpec {
  containers: { name: string; args?: string[]; volumeMounts?: { name: string; mountPath: string }[] }[];
  volumes: { name: string; hostPath?: { path: string }; configMap?: unknown }[];
}

function podSpecs(file: string): PodSpec[] {
  return parseAllDocuments(read(file))
    .map((d) => d.toJS() as { kind?: string; spec?: PodSpec & { template?: { spec: PodSpec } } } | null)
    .flatMap((o) => (o?.kind === 'Pod' ? [o.spec!] : o?.kind === 'DaemonSet' ? [o.spec!.template!.spec] : []));
}

/** The credentials folder and the configuration file as each manifest sets them up. */
function manifestLayout(): { credentials: Map<string, string>; configFiles: Set<string>; mounts: Set<string> } {
  const credentials = new Map<string, string>();
  const configFiles = new Set<string>();
  const mounts = new Set<string>();
  for (const file of ['deploy/static-pod/trousseau.yaml', 'deploy/daemonset/trousseau.yaml']) {
    for (const spec of podSpecs(file)) {
      const plugin = spec.containers.find((c) => c.name === 'trousseau')!;
      const args = plugin.args ?? [];
      configFiles.add(args[args.indexOf('--config') + 1]!);
      for (const mount of plugin.volumeMounts ?? []) {
        if (!mount.mountPath.startsWith('/etc/trousseau')) continue;
        mounts.add(mount.mountPath);
        const volume = spec.volumes.find((v) => v.name === mount.name);
        // The static pod mounts the whole host folder; its credentials are the folder's credentials/.
        if (volume?.hostPath) {
          credentials.set(`${file} hostPath`, volume.hostPath.path === '/etc/trousseau' ? '/etc/trousseau/credentials' : volume.hostPath.path);
          if (volume.hostPath.path !== mount.mountPath) credentials.set(`${file} mount differs from host folder`, mount.mountPath);
        }
      }
    }
  }
  const values = parseYaml(read('deploy/helm/trousseau/values.yaml')) as { credentials: { hostPath: string; mountPath: string } };
  credentials.set('helm credentials.hostPath', values.credentials.hostPath);
  credentials.set('helm credentials.mountPath', values.credentials.mountPath);
  return { credentials, configFiles, mounts };
}

test('the static pod, the DaemonSet and the Helm chart mount one credentials folder', (t) => {
  const { credentials } = manifestLayout();
  t.true(credentials.size >= 4, [...credentials.keys()].join(', '));
  t.deepEqual(new Set(credentials.values()), new Set(['/etc/trousseau/credentials']), JSON.stringify(Object.fromEntries(credentials)));
});

/** Every string value of a YAML tree whose key ends in File (keyFile, caFile, roleIdFile, ...), with its key. */
function fileFields(node: unknown, where: string, out: { where: string; value: string }[] = []): { where: string; value: string }[] {
  if (Array.isArray(node)) node.forEach((n, i) => fileFields(n, `${where}[${i}]`, out));
  else if (node && typeof node === 'object') {
    for (const [key, value] of Object.entries(node)) {
      if (typeof value === 'string' && /File$/.test(key)) out.push({ where: `${where}.${key}`, value });
      else if (Array.isArray(value) && /Files$/.test(key)) for (const v of value) out.push({ where: `${where}.${key}`, value: String(v) });
      else fileFields(value, `${where}.${key}`, out);
    }
  }
  return out;
}

test('every key, token and certificate file of the example configurations is in the credentials folder', (t) => {
  const sources = [
    ...filesUnder('deploy/config', ['.yaml']),
    ...filesUnder('deploy/helm/trousseau/ci', ['.yaml']),
    'deploy/helm/trousseau/values.yaml',
    'deploy/daemonset/trousseau.yaml',
  ];
  let checked = 0;
  for (const file of sources) {
    for (const doc of parseAllDocuments(read(file))) {
      const tree = doc.toJS() as { data?: Record<string, string> } | null;
      // A ConfigMap holds the configuration as text.
      const trees = tree?.data ? Object.values(tree.data).map((text) => parseYaml(text) as unknown) : [tree];
      for (const config of trees) {
        for (const { where, value } of fileFields(config, file)) {
          // Projected service-account tokens (Vault kubernetes auth) come from their own volume.
          if (value.startsWith('/var/run/secrets/')) continue;
          t.true(value.startsWith('/etc/trousseau/credentials/'), `${where} = ${value} is not in /etc/trousseau/credentials/`);
          checked++;
        }
      }
    }
  }
  t.true(checked >= 15, `only ${checked} file fields found`);
});

test('no doc or runbook names a folder under /etc/trousseau that no manifest mounts', (t) => {
  const { configFiles, mounts } = manifestLayout();
  const allowed = (p: string) =>
    p === '/etc/trousseau' || p === '/etc/trousseau/' || [...configFiles].some((c) => p === c || p.startsWith(`${c}.`)) || [...mounts].some((m) => m !== '/etc/trousseau' && (p === m || p.startsWith(`${m}/`))) || p.startsWith('/etc/trousseau/credentials/') || p === '/etc/trousseau/credentials';
  const docs = ['README.md', ...filesUnder('docs', ['.md']), ...filesUnder('deploy', ['.md', '.yaml', '.sh'])];
  let seen = 0;
  for (const file of docs) {
    const text = read(file);
    for (const match of text.matchAll(/\/etc\/trousseau[A-Za-z0-9_./-]*/g)) {
      const p = match[0].replace(/[.]+$/, '');
      seen++;
      const line = text.slice(0, match.index).split('\n').length;
      t.true(allowed(p), `${file}:${line} names ${p}: key and credential files live in /etc/trousseau/credentials/ (the manifests mount nothing else)`);
    }
  }
  t.true(seen > 40, `only ${seen} paths under /etc/trousseau found`);
});
