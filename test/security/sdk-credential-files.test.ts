/**
 * Credential files a cloud SDK reads itself (the AWS default chain's shared files and
 * token files, Azure's workload identity token and client certificate, and the files
 * Azure's environment names) are checked by the trusted-path rule before the backend is
 * created, and again when the SDK is about to read them. Before, the SDKs read them with
 * plain reads: a local user who could write the file or a folder above it could make
 * the plugin authenticate as an identity of theirs, or send a root-only file as a token.
 *
 * Each role gets the same attacks through the real backend definitions and config
 * schemas (awsBackend / azureBackend .create): a link planted by uid 65534 in a sticky
 * folder, a group-writable file, a folder others can write, a file owned by uid 65534,
 * a missing file in a folder others could create it in; a good file and a missing one
 * in a trusted folder pass. No refusal needs a cloud call; the good paths then run
 * against the real moto (AWS web identity through its STS) and lowkey-vault servers.
 *
 * The tests change process.env (the SDKs read it), so they run one at a time.
 */
import test, { type ExecutionContext } from 'ava';
import { randomBytes } from 'node:crypto';
import { chmod, chown, mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import pino from 'pino';
import { awsBackend, awsConfigSchema } from '../../src/backends/aws.ts';
import { azureBackend, azureConfigSchema } from '../../src/backends/azure.ts';
import type { KeyBackend } from '../../src/backends/backend.ts';
import { runDoctor } from '../../src/cli/doctor.ts';
import { errorCodeOf } from '../../src/errors.ts';
import { asNobody, NOBODY } from '../helpers/local-keys.ts';
import { tempDir } from '../helpers/plugin-harness.ts';
import { requireServer } from '../helpers/servers.ts';

const isRoot = process.getuid?.() === 0;
const deps = (baseDir: string) => ({ baseDir, logger: pino({ level: 'silent' }) });

/** Every variable a test sets; each test starts from none of them set. */
const VARIABLES = [
  'AWS_ACCESS_KEY_ID',
  'AWS_SECRET_ACCESS_KEY',
  'AWS_SESSION_TOKEN',
  'AWS_PROFILE',
  'AWS_CONFIG_FILE',
  'AWS_SHARED_CREDENTIALS_FILE',
  'AWS_WEB_IDENTITY_TOKEN_FILE',
  'AWS_ROLE_ARN',
  'AWS_ROLE_SESSION_NAME',
  'AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE',
  'AWS_CONTAINER_CREDENTIALS_FULL_URI',
  'AWS_EC2_METADATA_DISABLED',
  'AWS_ENDPOINT_URL_STS',
  'AZURE_FEDERATED_TOKEN_FILE',
  'AZURE_CLIENT_CERTIFICATE_PATH',
  'AZURE_CLIENT_ID',
  'AZURE_TENANT_ID',
  'IDENTITY_ENDPOINT',
  'IDENTITY_HEADER',
  'HOME',
];

/** A clean environment for the test: none of VARIABLES, HOME in the test's own folder, no IMDS. */
function cleanEnv(t: ExecutionContext, home: string): void {
  const saved = new Map(VARIABLES.map((name) => [name, process.env[name]]));
  t.teardown(() => {
    for (const [name, value] of saved) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
  });
  for (const name of VARIABLES) delete process.env[name];
  process.env.HOME = home;
  process.env.AWS_EC2_METADATA_DISABLED = 'true';
}

/** "OK", or the error's code and message: what the plugin would record for this backend. */
async function outcome(create: () => Promise<KeyBackend>, use?: (backend: KeyBackend) => Promise<unknown>): Promise<string> {
  let backend: KeyBackend | undefined;
  try {
    backend = await create();
    await use?.(backend);
    return 'OK';
  } catch (error) {
    return `${errorCodeOf(error)}: ${(error as Error).message}`;
  } finally {
    await backend?.close();
  }
}

const awsConfig = (fields: Record<string, unknown> = {}) =>
  awsConfigSchema.parse({ name: 'aws-a', type: 'aws', keyId: 'alias/k', region: 'eu-west-1', ...fields });

const azureConfig = (credential: Record<string, unknown>, fields: Record<string, unknown> = {}) =>
  azureConfigSchema.parse({ name: 'azure-a', type: 'azure', vaultUrl: 'https://vault.invalid', keyName: 'k', credential, ...fields });

interface Role {
  /** The role as the refusal names it. */
  label: string;
  /** Set up the environment or configuration for `file`, and create the backend. */
  create(file: string, dir: string): Promise<KeyBackend>;
}

const roles: Role[] = [
  {
    label: 'aws backend aws-a: AWS shared config file (AWS_CONFIG_FILE)',
    create: (file, dir) => {
      process.env.AWS_CONFIG_FILE = file;
      return awsBackend.create(awsConfig(), deps(dir));
    },
  },
  {
    label: 'aws backend aws-a: AWS shared credentials file (AWS_SHARED_CREDENTIALS_FILE)',
    create: (file, dir) => {
      process.env.AWS_SHARED_CREDENTIALS_FILE = file;
      return awsBackend.create(awsConfig(), deps(dir));
    },
  },
  {
    label: 'aws backend aws-a: AWS web identity token file (AWS_WEB_IDENTITY_TOKEN_FILE)',
    create: (file, dir) => {
      process.env.AWS_WEB_IDENTITY_TOKEN_FILE = file;
      process.env.AWS_ROLE_ARN = 'arn:aws:iam::123456789012:role/trousseau';
      return awsBackend.create(awsConfig({ assumeRole: { roleArn: 'arn:aws:iam::123456789012:role/kms' } }), deps(dir));
    },
  },
  {
    label: 'aws backend aws-a: AWS container authorization token file (AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)',
    create: (file, dir) => {
      process.env.AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE = file;
      process.env.AWS_CONTAINER_CREDENTIALS_FULL_URI = 'http://169.254.170.23/v1/credentials';
      return awsBackend.create(awsConfig(), deps(dir));
    },
  },
  {
    label: 'azure backend azure-a: Azure workload identity token file',
    create: (file, dir) => azureBackend.create(azureConfig({ method: 'workloadIdentity', tenantId: 't', clientId: 'c', tokenFile: file }), deps(dir)),
  },
  {
    label: 'azure backend azure-a: Azure client certificate file',
    create: (file, dir) =>
      azureBackend.create(azureConfig({ method: 'clientCertificate', tenantId: 't', clientId: 'c', certificateFile: path.relative(dir, file) }), deps(dir)),
  },
  {
    label: 'azure backend azure-a: Azure federated token file (AZURE_FEDERATED_TOKEN_FILE)',
    create: (file, dir) => {
      process.env.AZURE_FEDERATED_TOKEN_FILE = file;
      return azureBackend.create(azureConfig({ method: 'default' }), deps(dir));
    },
  },
  {
    label: 'azure backend azure-a: Azure federated token file (AZURE_FEDERATED_TOKEN_FILE)',
    create: (file, dir) => {
      // Managed identity exchanges a federated token when it has a client id and a tenant.
      process.env.AZURE_FEDERATED_TOKEN_FILE = file;
      process.env.AZURE_TENANT_ID = 't';
      return azureBackend.create(azureConfig({ method: 'managedIdentity', clientId: 'c' }), deps(dir));
    },
  },
  {
    label: 'azure backend azure-a: Azure client certificate file (AZURE_CLIENT_CERTIFICATE_PATH)',
    create: (file, dir) => {
      process.env.AZURE_CLIENT_CERTIFICATE_PATH = file;
      return azureBackend.create(azureConfig({ method: 'default' }), deps(dir));
    },
  },
];

const escape = (text: string) => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** A folder for one attack: `dir/name` with `mode` (chmod, so the umask does not change it). */
async function folder(dir: string, name: string, mode: number): Promise<string> {
  const made = path.join(dir, name);
  await mkdir(made);
  await chmod(made, mode);
  return made;
}

for (const [index, role] of roles.entries()) {
  test.serial(`${index}: ${role.label}: refused when linked, writable or foreign; a good or missing file passes`, async (t) => {
    const dir = await tempDir(t);
    // uid 65534 must reach the sticky folder to plant its link.
    await chmod(dir, 0o755);
    cleanEnv(t, dir);
    const secret = `secret-${randomBytes(12).toString('hex')}`;
    const refused = (reason: RegExp) => new RegExp(`^CONFIG: refusing ${escape(role.label)}: .*${reason.source}`);
    const attempt = async (file: string) => {
      const result = await outcome(() => role.create(file, dir));
      t.false(result.includes(secret), 'the content is never in a message');
      return result;
    };

    const good = await folder(dir, 'good', 0o700);
    await writeFile(path.join(good, 'file'), secret, { mode: 0o600 });
    t.is(await attempt(path.join(good, 'file')), 'OK', 'a good file passes');
    t.is(await attempt(path.join(good, 'missing')), 'OK', 'a missing file in a trusted folder is left to the SDK');

    const groupWritable = path.join(good, 'group-writable');
    await writeFile(groupWritable, secret);
    await chmod(groupWritable, 0o620);
    t.regex(await attempt(groupWritable), refused(/group-writable is writable by group or others \(mode 620\)/));

    const open = await folder(dir, 'open', 0o777);
    await writeFile(path.join(open, 'file'), secret, { mode: 0o600 });
    t.regex(await attempt(path.join(open, 'file')), refused(/open is writable by users other than root and the plugin's user \(mode 777\)/));

    if (!isRoot) return;
    const shared = await folder(dir, 'shared', 0o1777);
    await asNobody(`ln -s ${path.join(good, 'file')} ${shared}/file`);
    t.regex(await attempt(path.join(shared, 'file')), refused(/shared\/file is a link owned by uid 65534/), 'a link planted by another user');
    t.regex(await attempt(path.join(shared, 'not-yet')), refused(/not-yet does not exist, and another user could create it: .*shared is writable by other users \(sticky/));

    const foreign = path.join(good, 'foreign');
    await writeFile(foreign, secret, { mode: 0o600 });
    await chown(foreign, NOBODY, NOBODY);
    t.regex(await attempt(foreign), refused(/foreign is owned by uid 65534, not by root or the plugin's user/));
  });
}

test.serial('AWS: the default ~/.aws files are checked too; static keys in the environment spare the token files', async (t) => {
  const dir = await tempDir(t);
  cleanEnv(t, dir);
  await folder(dir, '.aws', 0o777);
  t.regex(await outcome(() => awsBackend.create(awsConfig(), deps(dir))), /^CONFIG: refusing aws backend aws-a: AWS shared config file: .*\.aws is writable by users other than root/);
  await chmod(path.join(dir, '.aws'), 0o700);
  await writeFile(path.join(dir, '.aws', 'credentials'), '[default]\n');
  await chmod(path.join(dir, '.aws', 'credentials'), 0o666);
  t.regex(await outcome(() => awsBackend.create(awsConfig(), deps(dir))), /^CONFIG: refusing aws backend aws-a: AWS shared credentials file: .*credentials is writable by group or others/);
  await chmod(path.join(dir, '.aws', 'credentials'), 0o600);

  // The chain ends at the environment's keys: it never reads the token file.
  const open = await folder(dir, 'open', 0o777);
  process.env.AWS_WEB_IDENTITY_TOKEN_FILE = path.join(open, 'token');
  process.env.AWS_ROLE_ARN = 'arn:aws:iam::123456789012:role/trousseau';
  process.env.AWS_ACCESS_KEY_ID = 'test';
  process.env.AWS_SECRET_ACCESS_KEY = 'test';
  t.is(await outcome(() => awsBackend.create(awsConfig(), deps(dir))), 'OK');
  // With a profile named, the SDK skips the environment's keys, so the file counts again.
  process.env.AWS_PROFILE = 'default';
  t.regex(await outcome(() => awsBackend.create(awsConfig(), deps(dir))), /refusing aws backend aws-a: AWS web identity token file/);
});

// A missing server fails the file under CI (requireServer); outside CI its tests are skipped, and counted so.
const motoServer = requireServer('moto');
const moto = 'env' in motoServer ? motoServer.env : undefined;

(moto ? test.serial : test.serial.skip)('AWS web identity against moto: a good token file authenticates; a token folder opened after start stops the next read', async (t) => {
  if (!moto) return;
  const dir = await tempDir(t);
  cleanEnv(t, dir);
  const tokens = await folder(dir, 'tokens', 0o755);
  await writeFile(path.join(tokens, 'token'), `eyJ.${randomBytes(16).toString('hex')}.sig`, { mode: 0o600 });
  process.env.AWS_WEB_IDENTITY_TOKEN_FILE = path.join(tokens, 'token');
  process.env.AWS_ROLE_ARN = 'arn:aws:iam::123456789012:role/trousseau';
  process.env.AWS_ROLE_SESSION_NAME = 'trousseau-test';
  // The chain's STS client (AssumeRoleWithWebIdentity) goes to moto too.
  process.env.AWS_ENDPOINT_URL_STS = moto.MOTO_ENDPOINT;
  const config = awsConfig({ keyId: moto.MOTO_KEY_ARN, region: moto.MOTO_REGION, endpoint: moto.MOTO_ENDPOINT, timeoutMs: 2900 });
  const wrap = (backend: KeyBackend) =>
    backend.wrap(randomBytes(32), { envelopeId: randomBytes(16), backendName: 'aws-a' }, AbortSignal.timeout(10_000));
  t.is(await outcome(() => awsBackend.create(config, deps(dir)), wrap), 'OK');

  // Created while the folder was fine; opened before the SDK first reads the token.
  t.regex(
    await outcome(
      () => awsBackend.create(config, deps(dir)),
      async (backend) => {
        await chmod(tokens, 0o777);
        await wrap(backend);
      },
    ),
    /^BACKEND_UNAVAILABLE: refusing aws backend aws-a: AWS web identity token file \(AWS_WEB_IDENTITY_TOKEN_FILE\): .*tokens is writable by users other than root/,
  );
});

const lowkeyServer = requireServer('lowkey-vault');
const lowkey = 'env' in lowkeyServer ? lowkeyServer.env : undefined;

(lowkey ? test.serial : test.serial.skip)('Azure against lowkey-vault: good token files pass and the vault answers; a folder opened after start stops the next token', async (t) => {
  // The Key Vault client asks for a token only once the vault has answered its first
  // request with an authentication challenge: a real vault is needed even for the refusal.
  if (!lowkey) return;
  const dir = await tempDir(t);
  cleanEnv(t, dir);
  const tokens = await folder(dir, 'tokens', 0o755);
  await writeFile(path.join(tokens, 'token'), `eyJ.${randomBytes(16).toString('hex')}.sig`, { mode: 0o600 });
  const vault = (credential: Record<string, unknown>) =>
    azureConfig(credential, {
      vaultUrl: lowkey.AZURE_KV_URL,
      keyName: lowkey.AZURE_KV_KEY_NAME,
      caFile: lowkey.AZURE_KV_CA_FILE,
      disableChallengeResourceVerification: true,
      timeoutMs: 2900,
    });
  const version = (backend: KeyBackend) => backend.currentKeyVersion(AbortSignal.timeout(20_000));
  const openedAfterStart = (config: ReturnType<typeof vault>) =>
    outcome(
      () => azureBackend.create(config, deps(dir)),
      async (backend) => {
        await chmod(tokens, 0o777);
        try {
          await version(backend);
        } finally {
          await chmod(tokens, 0o755);
        }
      },
    );

  // Workload identity: the plugin reads the token itself; the refusal comes before any call to the authority.
  const workload = vault({ method: 'workloadIdentity', tenantId: 't', clientId: 'c', tokenFile: path.join(tokens, 'token') });
  t.regex(
    await openedAfterStart(workload),
    /^BACKEND_UNAVAILABLE: refusing azure backend azure-a: Azure workload identity token file: .*tokens is writable by users other than root/,
  );

  // DefaultAzureCredential with the variable set (no client id, so its workload identity
  // link stays out) goes on to managed identity, which lowkey-vault serves.
  process.env.AZURE_FEDERATED_TOKEN_FILE = path.join(tokens, 'token');
  process.env.IDENTITY_ENDPOINT = lowkey.AZURE_KV_IDENTITY_ENDPOINT;
  process.env.IDENTITY_HEADER = 'trousseau-test';
  const byDefault = vault({ method: 'default' });
  t.is(await outcome(() => azureBackend.create(byDefault, deps(dir)), version), 'OK');
  t.regex(
    await openedAfterStart(byDefault),
    /^BACKEND_UNAVAILABLE: refusing azure backend azure-a: Azure federated token file \(AZURE_FEDERATED_TOKEN_FILE\): .*tokens is writable by users other than root/,
  );
});

test.serial('trousseau doctor fails a refused SDK file, warns on a named file that is missing, passes a good one', async (t) => {
  const dir = await tempDir(t);
  cleanEnv(t, dir);
  const open = await folder(dir, 'open', 0o777);
  const good = await folder(dir, 'good', 0o700);
  await writeFile(path.join(good, 'token'), 'eyJ.e30.sig', { mode: 0o600 });
  process.env.AWS_WEB_IDENTITY_TOKEN_FILE = path.join(open, 'token');
  process.env.AWS_ROLE_ARN = 'arn:aws:iam::123456789012:role/trousseau';
  process.env.AWS_CONFIG_FILE = path.join(good, 'no-config');
  process.env.AZURE_FEDERATED_TOKEN_FILE = path.join(good, 'token');
  const configFile = path.join(dir, 'trousseau.yaml');
  await writeFile(
    configFile,
    [
      'socket:',
      `  path: ${path.join(dir, 'kms.sock')}`,
      'quorum: 1',
      'backends:',
      '  - name: aws-a',
      '    type: aws',
      '    keyId: alias/k',
      '    region: eu-west-1',
      '    endpoint: http://127.0.0.1:1',
      '  - name: azure-a',
      '    type: azure',
      '    vaultUrl: https://127.0.0.1:1',
      '    keyName: k',
      '',
    ].join('\n'),
  );
  const report = await runDoctor({ config: configFile });
  const check = (name: string) => report.checks.find((c) => c.check === name);
  t.is(check('aws-a AWS_WEB_IDENTITY_TOKEN_FILE')?.status, 'fail');
  t.regex(check('aws-a AWS_WEB_IDENTITY_TOKEN_FILE')?.detail ?? '', /refusing aws backend aws-a: AWS web identity token file .*open is writable by users other than root/);
  t.is(check('aws-a AWS_CONFIG_FILE')?.status, 'warn');
  t.is(check('aws-a AWS shared credentials file')?.status, 'pass');
  t.is(check('aws-a credentials')?.status, 'skip', 'no credential check on a refused file');
  t.is(check('azure-a AZURE_FEDERATED_TOKEN_FILE')?.status, 'pass');
  t.false(report.ok);
});
