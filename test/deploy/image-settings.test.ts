/**
 * The manifests ask the kubelet for what the image test ran: the static pod, the
 * DaemonSet and the rendered Helm chart name the image `npm run image` tags, and carry
 * the securityContext, memory limits, host network, socket and compile cache folders,
 * the plugin's environment and the init container
 * that deploy/image/run.sh translated into podman flags (all read from the one file
 * deploy/image/settings.json). A manifest edited alone fails here.
 */
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import test, { type ExecutionContext } from 'ava';
import { parseAllDocuments } from 'yaml';
import { imageReference, loadImageSettings, podmanArgs } from '../../deploy/image/podman-args.ts';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const settings = loadImageSettings();

interface Container {
  name: string;
  image: string;
  command?: string[];
  env?: { name: string; value?: string }[];
  securityContext?: unknown;
  resources?: { limits?: { memory?: string } };
  volumeMounts?: { name: string; mountPath: string; readOnly?: boolean }[];
}
interface PodSpec {
  hostNetwork?: boolean;
  terminationGracePeriodSeconds?: number;
  securityContext?: unknown;
  initContainers?: Container[];
  containers: Container[];
  volumes: { name: string; hostPath?: { path: string } }[];
}

function podSpecs(text: string): PodSpec[] {
  return parseAllDocuments(text)
    .map((d) => d.toJS() as { kind?: string; spec?: PodSpec & { template?: { spec: PodSpec } } } | null)
    .flatMap((o) => (o?.kind === 'Pod' ? [o.spec!] : o?.kind === 'DaemonSet' ? [o.spec!.template!.spec] : []));
}

function checkSpec(t: ExecutionContext, where: string, spec: PodSpec) {
  const reference = imageReference(settings);
  t.true(spec.hostNetwork, `${where}: hostNetwork`);
  t.is(spec.terminationGracePeriodSeconds ?? 30, settings.terminationGracePeriodSeconds, `${where}: terminationGracePeriodSeconds`);
  t.deepEqual(spec.securityContext, settings.podSecurityContext, `${where}: pod securityContext`);

  const init = spec.initContainers?.find((c) => c.name === 'host-folders');
  t.truthy(init, `${where}: the host-folders init container`);
  t.is(init?.image, reference, `${where}: init container image`);
  t.deepEqual(init?.command, settings.initContainer.command, `${where}: init container command`);
  t.deepEqual(init?.securityContext, settings.initContainer.securityContext, `${where}: init container securityContext`);
  t.is(init?.resources?.limits?.memory, settings.initContainer.memoryLimit, `${where}: init container memory limit`);

  const plugin = spec.containers.find((c) => c.name === 'trousseau');
  t.truthy(plugin, `${where}: the trousseau container`);
  t.is(plugin?.image, reference, `${where}: image`);
  t.deepEqual(plugin?.securityContext, settings.container.securityContext, `${where}: container securityContext`);
  t.is(plugin?.resources?.limits?.memory, settings.container.memoryLimit, `${where}: memory limit`);
  for (const [name, value] of Object.entries(settings.container.env)) {
    t.is(plugin?.env?.find((e) => e.name === name)?.value, value, `${where}: ${name}`);
  }
  t.is(settings.container.env.TROUSSEAU_COMPILE_CACHE, settings.compileCacheDir, 'the compile cache the plugin is told of is the folder mounted for it');

  // The socket and compile cache folders: host folders mounted read-write where run.sh
  // mounts them (the init container hands them to the plugin); the configuration
  // read-only under the config folder.
  for (const folder of [settings.socketDir, settings.compileCacheDir]) {
    for (const container of [init, plugin]) {
      const mount = container?.volumeMounts?.find((m) => m.mountPath === folder);
      t.truthy(mount, `${where}: ${container?.name} mounts ${folder}`);
      t.falsy(mount?.readOnly);
      t.is(spec.volumes.find((v) => v.name === mount?.name)?.hostPath?.path, folder, `${where}: ${folder} is the same host folder`);
    }
  }
  const configMounts = plugin?.volumeMounts?.filter((m) => m.mountPath.startsWith(settings.configDir)) ?? [];
  t.true(configMounts.length > 0 && configMounts.every((m) => m.readOnly === true), `${where}: configuration mounted read-only under ${settings.configDir}`);
}

test('the static pod has the image settings run.sh uses', (t) => {
  const specs = podSpecs(readFileSync(path.join(root, 'deploy/static-pod/trousseau.yaml'), 'utf8'));
  t.is(specs.length, 1);
  checkSpec(t, 'static pod', specs[0]!);
});

test('the DaemonSet has the image settings run.sh uses', (t) => {
  const specs = podSpecs(readFileSync(path.join(root, 'deploy/daemonset/trousseau.yaml'), 'utf8'));
  t.is(specs.length, 1);
  checkSpec(t, 'DaemonSet', specs[0]!);
});

function helmBinary(): string | undefined {
  for (const candidate of [process.env.TROUSSEAU_HELM, path.join(root, '.servers/bin/helm')]) {
    if (candidate && existsSync(candidate)) return candidate;
  }
  return undefined;
}

test('the rendered Helm chart has the image settings run.sh uses', async (t) => {
  const helm = helmBinary();
  if (!helm) {
    const why = 'helm not found: bash test/k8s/install-helm.sh';
    if (process.env.CI) t.fail(why);
    else t.pass(`SKIPPED LOUDLY: ${why}`);
    return;
  }
  const home = mkdtempSync(path.join(tmpdir(), 'trousseau-helm-'));
  t.teardown(() => rmSync(home, { recursive: true, force: true }));
  const { stdout } = await run(
    helm,
    ['template', 'trousseau', path.join(root, 'deploy/helm/trousseau'), '--namespace', 'kube-system', '--kube-version', 'v1.33.0', '-f', path.join(root, 'deploy/helm/trousseau/ci/local-values.yaml')],
    { env: { ...process.env, HOME: home, HELM_CACHE_HOME: home, HELM_CONFIG_HOME: home, HELM_DATA_HOME: home }, timeout: 120_000 },
  );
  const specs = podSpecs(stdout);
  t.is(specs.length, 1);
  checkSpec(t, 'Helm chart', specs[0]!);
});

test('run.sh turns the same settings into the podman flags the image test runs with', (t) => {
  t.deepEqual(podmanArgs(settings, 'container'), [
    `--user=${settings.podSecurityContext.runAsUser}:${settings.podSecurityContext.runAsGroup}`,
    '--read-only',
    '--read-only-tmpfs=false',
    '--security-opt=no-new-privileges',
    '--cap-drop=ALL',
    `--memory=${Number.parseInt(settings.container.memoryLimit, 10)}m`,
    '--network=host',
    `--env=TROUSSEAU_COMPILE_CACHE=${settings.compileCacheDir}`,
  ]);
  t.deepEqual(podmanArgs(settings, 'init'), ['--user=0:0', '--read-only', '--read-only-tmpfs=false', '--security-opt=no-new-privileges', '--cap-drop=ALL', '--cap-add=CHOWN', '--memory=128m', '--network=host']);
  t.true(settings.podSecurityContext.runAsNonRoot && settings.podSecurityContext.runAsUser !== 0);
});
