/**
 * A local-kms of a test's (or a bench's) own: the binary test/servers/local-kms.server.sh
 * installs, on a free port, with one fresh AES key. For runs that freeze the server
 * (SIGSTOP) or stop it: the shared one on LOCAL_KMS_ENDPOINT is everyone's.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const OWN_KMS_REGION = 'us-east-1';
const ACCOUNT = '111122223333';
const KEY_ID = '6f0c2d1e-3b4a-4c5d-8e9f-0a1b2c3d4e5f';
export const OWN_KMS_KEY_ARN = `arn:aws:kms:${OWN_KMS_REGION}:${ACCOUNT}:key/${KEY_ID}`;
/** What the AWS SDK needs to sign requests local-kms accepts (it checks none). */
export const OWN_KMS_CREDENTIALS = { AWS_ACCESS_KEY_ID: 'test', AWS_SECRET_ACCESS_KEY: 'test', AWS_EC2_METADATA_DISABLED: 'true' };

export interface OwnLocalKms {
  child: ChildProcess;
  endpoint: string;
  /** SIGCONT (in case it was frozen), then SIGTERM, and wait for the exit. */
  stop(): Promise<void>;
}

export function localKmsBinary(): string {
  return path.join(root, '.servers', 'bin', 'local-kms');
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

/** Start one in `dir` (its database and seed go there); resolves once it answers. */
export async function startOwnLocalKms(dir: string): Promise<OwnLocalKms> {
  const binary = localKmsBinary();
  if (!existsSync(binary)) throw new Error('local-kms is not installed: bash test/servers/up.sh local-kms');
  const data = path.join(dir, 'local-kms');
  await mkdir(path.join(data, 'db'), { recursive: true });
  const seed = `Keys:\n  Symmetric:\n    Aes:\n      - Metadata:\n          KeyId: ${KEY_ID}\n        BackingKeys:\n          - ${randomBytes(32).toString('hex')}\n`;
  await writeFile(path.join(data, 'seed.yaml'), seed, { mode: 0o600 });
  const port = await freePort();
  // local-kms has no bind-address option (it listens on all interfaces): only loopback traffic is sent to it.
  const child = spawn(binary, [], {
    stdio: 'ignore',
    env: { ...process.env, PORT: String(port), KMS_REGION: OWN_KMS_REGION, KMS_ACCOUNT_ID: ACCOUNT, KMS_DATA_PATH: path.join(data, 'db'), KMS_SEED_PATH: path.join(data, 'seed.yaml') },
  });
  const endpoint = `http://127.0.0.1:${port}`;
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGCONT');
    child.kill('SIGTERM');
    await exited;
  };
  const deadline = Date.now() + 30_000;
  for (;;) {
    const answered = await fetch(endpoint, {
      method: 'POST',
      headers: { 'content-type': 'application/x-amz-json-1.1', 'x-amz-target': 'TrentService.ListKeys' },
      body: '{}',
      signal: AbortSignal.timeout(2000),
    }).then(
      (r) => r.ok,
      () => false,
    );
    if (answered) return { child, endpoint, stop };
    if (Date.now() > deadline || child.exitCode !== null) {
      await stop();
      throw new Error('local-kms did not start');
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}
