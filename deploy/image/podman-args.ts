/**
 * The one place where the Kubernetes settings of deploy/image/settings.json become
 * podman flags. deploy/image/run.sh runs the image with these flags, and
 * test/deploy/image-settings.test.ts checks that the static pod, the DaemonSet and the
 * rendered Helm chart carry the same settings, so what the image test ran is what the
 * manifests ask of the kubelet.
 *
 *   node deploy/image/podman-args.ts container|init   flags, NUL-separated, on stdout
 *   node deploy/image/podman-args.ts get KEY          one top-level value (image, socketDir, ...)
 *
 * The schema is strict: a setting added to the file without a translation here is an
 * error, never silently left out of the test run.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { z } from 'zod';

const capabilities = z.strictObject({ drop: z.array(z.string()), add: z.array(z.string()).optional() });

const containerSecurityContext = z.strictObject({
  runAsNonRoot: z.boolean().optional(),
  runAsUser: z.number().int().min(0).optional(),
  runAsGroup: z.number().int().min(0).optional(),
  allowPrivilegeEscalation: z.boolean(),
  readOnlyRootFilesystem: z.boolean(),
  capabilities,
});

const memory = z.string().regex(/^\d+Mi$/, 'a whole number of Mi');

export const imageSettingsSchema = z.strictObject({
  image: z.string().min(1),
  /** The org.opencontainers.image.source label. */
  source: z.url(),
  podSecurityContext: z.strictObject({
    runAsNonRoot: z.boolean(),
    runAsUser: z.number().int().min(1),
    runAsGroup: z.number().int().min(1),
    seccompProfile: z.strictObject({ type: z.literal('RuntimeDefault') }),
  }),
  initContainer: z.strictObject({ command: z.array(z.string()).min(1), securityContext: containerSecurityContext, memoryLimit: memory }),
  container: z.strictObject({ env: z.record(z.string().regex(/^[A-Z_][A-Z0-9_]*$/), z.string()), securityContext: containerSecurityContext, memoryLimit: memory }),
  hostNetwork: z.literal(true),
  socketDir: z.string().startsWith('/'),
  /** A host folder for Node's compile cache (TROUSSEAU_COMPILE_CACHE), kept across restarts. */
  compileCacheDir: z.string().startsWith('/'),
  configDir: z.string().startsWith('/'),
  terminationGracePeriodSeconds: z.number().int().min(1),
  ulimits: z.strictObject({ nofile: z.number().int().min(1024), nproc: z.number().int().min(64) }),
});
export type ImageSettings = z.infer<typeof imageSettingsSchema>;

export const settingsFile = path.join(path.dirname(fileURLToPath(import.meta.url)), 'settings.json');

export function loadImageSettings(file = settingsFile): ImageSettings {
  return imageSettingsSchema.parse(JSON.parse(readFileSync(file, 'utf8')));
}

/** package.json's version: the tag every manifest and the image build use. */
export function imageTag(): string {
  const pkg = JSON.parse(readFileSync(path.join(path.dirname(settingsFile), '../../package.json'), 'utf8')) as { version: string };
  return pkg.version;
}

export const imageReference = (settings: ImageSettings) => `${settings.image}:${imageTag()}`;

/**
 * The podman flags of one container: its securityContext over the pod's (Kubernetes
 * gives the container's field precedence), its memory limit, the node's network, and
 * for the plugin's container its environment.
 * seccompProfile RuntimeDefault is podman's default profile, so it needs no flag.
 */
export function podmanArgs(settings: ImageSettings, which: 'container' | 'init'): string[] {
  const spec = which === 'init' ? settings.initContainer : settings.container;
  const context = { ...settings.podSecurityContext, ...spec.securityContext };
  if (context.runAsNonRoot && context.runAsUser === 0) throw new Error(`${which}: runAsNonRoot with runAsUser 0`);
  const args = [`--user=${context.runAsUser}:${context.runAsGroup}`];
  // Kubernetes' read-only root has no tmpfs on /tmp, /run or /var/tmp; podman's has
  // unless told otherwise, which would hide a write the kubelet's container refuses.
  if (context.readOnlyRootFilesystem) args.push('--read-only', '--read-only-tmpfs=false');
  if (!context.allowPrivilegeEscalation) args.push('--security-opt=no-new-privileges');
  for (const cap of context.capabilities.drop) args.push(`--cap-drop=${cap}`);
  for (const cap of context.capabilities.add ?? []) args.push(`--cap-add=${cap}`);
  args.push(`--memory=${Number.parseInt(spec.memoryLimit, 10)}m`);
  if (settings.hostNetwork) args.push('--network=host');
  if (which === 'container') for (const [name, value] of Object.entries(settings.container.env)) args.push(`--env=${name}=${value}`);
  return args;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const [what, key] = process.argv.slice(2);
  const settings = loadImageSettings();
  if (what === 'container' || what === 'init') {
    const args = podmanArgs(settings, what);
    // Kubernetes' `command` replaces the image's ENTRYPOINT, as podman's JSON form does.
    if (what === 'init') args.push(`--entrypoint=${JSON.stringify(settings.initContainer.command)}`);
    process.stdout.write(args.map((a) => `${a}\0`).join(''));
  } else if (what === 'get' && key === 'reference') {
    process.stdout.write(imageReference(settings));
  } else if (what === 'get' && key && key in settings) {
    const value = settings[key as keyof ImageSettings];
    process.stdout.write(typeof value === 'object' ? JSON.stringify(value) : String(value));
  } else {
    process.stderr.write('usage: podman-args.ts container|init | get reference|KEY\n');
    process.exit(2);
  }
}
