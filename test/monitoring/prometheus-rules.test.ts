/**
 * The alert rules as Prometheus itself reads them: `promtool check rules` on the
 * rules (the `spec` of deploy/monitoring/prometheus-rules.yaml), and `promtool test
 * rules` with deploy/monitoring/prometheus-rules.test.yaml, where each alert that must
 * not stay silent (plugin absent or down, KMS errors, latency near the apiserver's
 * timeout, a commitment mismatch, below quorum) fires on the series that should raise
 * it. promtool comes from test/servers/install-promtool.sh (Debian's package, cached in
 * .servers/bin); when it cannot be installed the test fails in CI (CI set) and is
 * skipped, with a message, elsewhere.
 *
 * Also: the Helm chart ships the same rules and dashboard (its copies under files/
 * must equal deploy/monitoring/), and every runbook_url is absolute, under the one
 * base the chart replaces, and names a runbook that exists.
 */
import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { copyFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import test from 'ava';
import { parse as parseYaml, stringify } from 'yaml';
import { tempDir } from '../helpers/plugin-harness.ts';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const RULES = path.join(root, 'deploy/monitoring/prometheus-rules.yaml');
const RULE_TESTS = path.join(root, 'deploy/monitoring/prometheus-rules.test.yaml');
/** The base every runbook_url starts with; the chart's metrics.runbookBaseUrl replaces it. */
const DEFAULT_RUNBOOK_BASE = 'https://github.com/trousseau-io/trousseau/blob/main/docs/operations/';

interface Rule {
  alert?: string;
  annotations?: Record<string, string>;
}

const rulesDoc = () => parseYaml(readFileSync(RULES, 'utf8')) as { spec: { groups: { name: string; rules: Rule[] }[] } };

/** The promtool binary (installed once, before the tests are declared); undefined when it cannot be. */
const promtool = await run('bash', [path.join(root, 'test/servers/install-promtool.sh')], { cwd: root, timeout: 900_000, maxBuffer: 16 * 1024 * 1024 }).then(
  ({ stdout }) => stdout.trim().split('\n').pop(),
  (error: Error & { stderr?: string }) => {
    console.error(`installing promtool failed:\n${(error.stderr ?? error.message).slice(-2000)}`);
    return undefined;
  },
);
/**
 * Without promtool: a failure in CI (CI set, as test/helpers/servers.ts treats a missing
 * server), where unchecked rules must not pass; a loud skip elsewhere.
 */
const promtoolTest = promtool || process.env.CI ? test : test.skip;
const needPromtool = (t: import('ava').ExecutionContext): string | undefined => {
  if (!promtool) t.fail('promtool could not be installed (test/servers/install-promtool.sh); the alert rules are unchecked');
  return promtool;
};
if (!promtool && !process.env.CI) console.error('SKIPPED: promtool tests (promtool could not be installed; CI=true makes this a failure)');

promtoolTest('promtool check rules accepts every rule', async (t) => {
  const bin = needPromtool(t);
  if (!bin) return;
  const dir = await tempDir(t);
  const file = path.join(dir, 'rules.yaml');
  await writeFile(file, stringify(rulesDoc().spec));
  const { stdout } = await run(bin, ['check', 'rules', file], { timeout: 60_000 });
  const found = /SUCCESS: (\d+) rules found/.exec(stdout);
  t.truthy(found, stdout);
  t.is(Number(found![1]), rulesDoc().spec.groups.flatMap((g) => g.rules).length);
});

promtoolTest('promtool test rules: each alert fires on the series that should raise it, and a healthy pair of plugins raises none', async (t) => {
  const bin = needPromtool(t);
  if (!bin) return;
  const dir = await tempDir(t);
  await writeFile(path.join(dir, 'rules.yaml'), stringify(rulesDoc().spec));
  await copyFile(RULE_TESTS, path.join(dir, 'tests.yaml'));
  const result = await run(bin, ['test', 'rules', 'tests.yaml'], { cwd: dir, timeout: 60_000 }).catch((error: { stdout?: string; stderr?: string }) => error);
  t.regex(`${result.stdout ?? ''}${result.stderr ?? ''}`, /SUCCESS/, `${result.stdout ?? ''}${result.stderr ?? ''}`);
  const tested = new Set(
    (parseYaml(readFileSync(RULE_TESTS, 'utf8')) as { tests: { alert_rule_test?: { alertname: string; exp_alerts?: unknown[] }[] }[] }).tests.flatMap((c) =>
      (c.alert_rule_test ?? []).filter((a) => (a.exp_alerts ?? []).length > 0).map((a) => a.alertname),
    ),
  );
  for (const alert of ['TrousseauPluginAbsent', 'TrousseauPluginDown', 'TrousseauKmsErrors', 'TrousseauKmsLatencyNearTimeout', 'TrousseauCommitmentMismatch', 'TrousseauBelowQuorum']) {
    t.true(tested.has(alert), `no promtool test shows ${alert} firing`);
  }
});

test('every runbook_url is absolute under the one replaceable base and names a runbook in docs/operations/', (t) => {
  const rules = rulesDoc().spec.groups.flatMap((g) => g.rules);
  t.true(rules.length >= 15);
  for (const rule of rules) {
    const url = rule.annotations?.runbook_url ?? '';
    t.true(url.startsWith(DEFAULT_RUNBOOK_BASE), `${rule.alert}: runbook_url ${url} is not under ${DEFAULT_RUNBOOK_BASE}`);
    const page = url.slice(DEFAULT_RUNBOOK_BASE.length);
    t.regex(page, /^[a-z-]+\.md$/, `${rule.alert}: runbook page`);
    t.true(existsSync(path.join(root, 'docs/operations', page)), `${rule.alert}: docs/operations/${page} exists`);
  }
});

test('the Helm chart ships the same rules and dashboard as deploy/monitoring/', (t) => {
  for (const name of ['prometheus-rules.yaml', 'grafana-dashboard.json']) {
    const chartCopy = path.join(root, 'deploy/helm/trousseau/files', name);
    t.true(existsSync(chartCopy), `deploy/helm/trousseau/files/${name} is missing`);
    t.is(readFileSync(chartCopy, 'utf8'), readFileSync(path.join(root, 'deploy/monitoring', name), 'utf8'), `deploy/helm/trousseau/files/${name} differs from deploy/monitoring/${name}: copy it over`);
  }
});

test('the dashboard has a per-node variable and every query breaks down by node', (t) => {
  const dashboard = JSON.parse(readFileSync(path.join(root, 'deploy/monitoring/grafana-dashboard.json'), 'utf8')) as {
    templating: { list: { name: string; query?: string }[] };
    panels: { title: string; targets?: { expr: string; legendFormat?: string }[] }[];
  };
  const instance = dashboard.templating.list.find((v) => v.name === 'instance');
  t.truthy(instance, 'no instance variable');
  t.regex(instance?.query ?? '', /label_values\(.*, instance\)/);
  let queries = 0;
  for (const panel of dashboard.panels) {
    for (const target of panel.targets ?? []) {
      queries++;
      // Every selector is narrowed to the chosen nodes...
      for (const selector of target.expr.matchAll(/trousseau_[a-z_]+(\{[^}]*\})?|\bup(\{[^}]*\})/g)) {
        t.true((selector[1] ?? selector[2] ?? '').includes('instance=~"$instance"'), `panel "${panel.title}": ${selector[0]} is not narrowed to $instance`);
      }
      // ...and no aggregation folds the nodes together.
      for (const agg of target.expr.matchAll(/\b(sum|max|min|avg|count)\b(\s+by\s*\(([^)]*)\))?\s*\(/g)) {
        t.true((agg[3] ?? '').includes('instance'), `panel "${panel.title}": ${agg[0]} aggregates across nodes`);
      }
      t.true((target.legendFormat ?? '').includes('{{instance}}'), `panel "${panel.title}": legend does not name the node`);
    }
  }
  t.true(queries >= 25, `${queries} queries`);
});
