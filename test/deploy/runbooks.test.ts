/**
 * The runbooks in docs/operations/ as an operator uses them on a control-plane node,
 * where the `trousseau` CLI is not installed (it lives in the image) and the plugin is
 * a static pod:
 * - every shell block that runs the CLI, jq or the loopback port says where it runs;
 * - no command calls a bare `trousseau` (it goes through deploy/node/trousseau-node, the
 *   crictl form, or kubectl exec);
 * - no runbook restarts the plugin with `kubectl delete pod` (that only recreates a
 *   static pod's mirror pod); the one place that names it is the DaemonSet case;
 * - the wrapper finds the container by the name every manifest gives it;
 * - every alert has a runbook that names it.
 */
import { execFile } from 'node:child_process';
import { accessSync, constants, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import test from 'ava';
import { parse as parseYaml, parseAllDocuments } from 'yaml';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const read = (file: string) => readFileSync(path.join(root, file), 'utf8');
const runbooks = readdirSync(path.join(root, 'docs/operations'))
  .filter((f) => f.endsWith('.md'))
  .map((f) => `docs/operations/${f}`);

/** Shell blocks of a Markdown file: their lines and the line number of the opening fence. */
function shellBlocks(file: string): { start: number; lines: string[] }[] {
  const blocks: { start: number; lines: string[] }[] = [];
  let current: { start: number; lines: string[] } | undefined;
  read(file)
    .split('\n')
    .forEach((line, i) => {
      if (!current && /^\s*```(sh|bash)\s*$/.test(line)) current = { start: i + 1, lines: [] };
      else if (current && /^\s*```\s*$/.test(line)) {
        blocks.push(current);
        current = undefined;
      } else if (current) current.lines.push(line.trim());
    });
  return blocks;
}

const WHERE = /#\s*on (the node|a workstation|the recovery machine)/;
const NEEDS_WHERE = /(^|[|;&(]\s*|\$\()(trousseau-node|trousseau|jq|crictl)\b|curl [^|]*127\.0\.0\.1/;

test('every shell block that runs the CLI, jq, crictl or the loopback port says where it runs', (t) => {
  let checked = 0;
  for (const file of runbooks) {
    for (const block of shellBlocks(file)) {
      if (!block.lines.some((l) => NEEDS_WHERE.test(l))) continue;
      checked++;
      const blockSays = WHERE.test(block.lines[0] ?? '');
      const everyLineSays = block.lines.filter((l) => NEEDS_WHERE.test(l)).every((l) => WHERE.test(l));
      t.true(blockSays || everyLineSays, `${file}:${block.start}: say where this block runs (first line "# on the node" or "# on a workstation")`);
    }
  }
  t.true(checked >= 25, `only ${checked} blocks checked`);
});

test('no runbook command calls a bare `trousseau`: the CLI is not on the node', (t) => {
  for (const file of runbooks) {
    for (const block of shellBlocks(file)) {
      for (const line of block.lines) {
        if (line.startsWith('#')) continue;
        t.false(/(^|[|;&(]\s*|\$\()trousseau\s/.test(line), `${file}:${block.start}: "${line}" calls trousseau directly; use trousseau-node (on the node) or kubectl exec`);
      }
    }
  }
});

test('the plugin is never restarted with kubectl delete pod, except in the DaemonSet case', (t) => {
  let restarts = 0;
  for (const file of runbooks) {
    const text = read(file);
    for (const block of shellBlocks(file)) {
      if (!block.lines.some((l) => /^kubectl\b.*\bdelete pod/.test(l))) continue;
      const before = text.split('\n').slice(0, block.start).join('\n');
      const section = before.slice(before.lastIndexOf('- **'));
      t.true(file.endsWith('README.md') && section.startsWith('- **DaemonSet'), `${file}:${block.start}: kubectl delete pod does not restart a static pod`);
    }
    if (/restart the plugin/i.test(text) && !file.endsWith('README.md')) {
      restarts++;
      t.true(
        text.includes('trousseau-node restart') || text.includes('README.md#restarting-the-plugin-on-a-node'),
        `${file} restarts the plugin without the static-pod procedure`,
      );
    }
  }
  t.true(restarts >= 4, `only ${restarts} runbooks restart the plugin`);
  const readme = read('docs/operations/README.md');
  for (const step of ['mv /etc/kubernetes/manifests/trousseau.yaml', 'mv /etc/kubernetes/trousseau.yaml /etc/kubernetes/manifests/trousseau.yaml', 'trousseau-node restart']) {
    t.true(readme.includes(step), `README.md lacks "${step}"`);
  }
});

test('trousseau-node is executable, parses, and finds the container by the name every manifest gives it', async (t) => {
  const script = 'deploy/node/trousseau-node';
  accessSync(path.join(root, script), constants.X_OK);
  await run('bash', ['-n', path.join(root, script)]);
  const names = new Set<string>();
  for (const file of ['deploy/static-pod/trousseau.yaml', 'deploy/daemonset/trousseau.yaml']) {
    for (const doc of parseAllDocuments(read(file))) {
      const o = doc.toJS() as { kind?: string; spec?: { containers?: { name: string }[]; template?: { spec: { containers: { name: string }[] } } } } | null;
      const containers = o?.kind === 'Pod' ? o.spec?.containers : o?.kind === 'DaemonSet' ? o.spec?.template?.spec.containers : undefined;
      for (const c of containers ?? []) names.add(c.name);
    }
  }
  t.true(/^\s+- name: trousseau$/m.test(read('deploy/helm/trousseau/templates/daemonset.yaml')), 'the chart names its container trousseau');
  t.deepEqual([...names], ['trousseau']);
  t.regex(read(script), /name=\$\{TROUSSEAU_CONTAINER:-trousseau\}/);
  // The CLI's path in the image.
  t.regex(read('Dockerfile'), /ENTRYPOINT \["node", "\/app\/bin\/trousseau\.js"\]/);
  t.regex(read(script), /node \/app\/bin\/trousseau\.js/);
});

test('every alert is named in the runbook its runbook_url points to', (t) => {
  const doc = parseYaml(read('deploy/monitoring/prometheus-rules.yaml')) as { spec: { groups: { rules: { alert: string; annotations: { runbook_url: string } }[] }[] } };
  for (const rule of doc.spec.groups.flatMap((g) => g.rules)) {
    const page = rule.annotations.runbook_url.split('/').pop()!;
    const text = read(`docs/operations/${page}`);
    t.true(text.includes(`\`${rule.alert}\``), `docs/operations/${page} does not name ${rule.alert}`);
  }
});
