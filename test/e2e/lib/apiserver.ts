/**
 * A real kube-apiserver on loopback, storing in the suite's etcd, encrypting through
 * the EncryptionConfiguration it is given. One set of credentials (serving
 * certificate, service-account keys, an admin token) serves every apiserver of a run.
 */
import { execFile } from 'node:child_process';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import type { Etcd } from './etcd.ts';
import { KubeClient, Kubectl } from './kube-client.ts';
import { Child, type ExitStatus } from './process.ts';
import { PortClash, freePort, retryOnPortClash, saysAddressInUse } from './ports.ts';
import { waitFor } from './wait.ts';

const run = promisify(execFile);

export interface Credentials {
  certFile: string;
  keyFile: string;
  /** The serving certificate is self-signed: clients trust it as their CA. */
  caPem: string;
  serviceAccountPublicKey: string;
  serviceAccountPrivateKey: string;
  tokenFile: string;
  token: string;
}

export async function makeCredentials(dir: string): Promise<Credentials> {
  const certFile = path.join(dir, 'serving.crt');
  const keyFile = path.join(dir, 'serving.key');
  await run('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', keyFile, '-out', certFile, '-days', '2', '-subj', '/CN=127.0.0.1',
    '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
  ]);
  const serviceAccount = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const serviceAccountPublicKey = path.join(dir, 'sa.pub');
  const serviceAccountPrivateKey = path.join(dir, 'sa.key');
  writeFileSync(serviceAccountPublicKey, serviceAccount.publicKey.export({ type: 'spki', format: 'pem' }));
  writeFileSync(serviceAccountPrivateKey, serviceAccount.privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
  const token = randomBytes(24).toString('hex');
  const tokenFile = path.join(dir, 'tokens.csv');
  // token,user,uid,"groups": system:masters passes every authorization check.
  writeFileSync(tokenFile, `${token},e2e-admin,e2e-admin,"system:masters"\n`, { mode: 0o600 });
  return { certFile, keyFile, caPem: readFileSync(certFile, 'utf8'), serviceAccountPublicKey, serviceAccountPrivateKey, tokenFile, token };
}

export interface ApiserverSettings {
  /** Names the log file and the failure messages. */
  name: string;
  binDir: string;
  workDir: string;
  etcd: Etcd;
  credentials: Credentials;
  encryptionConfigFile: string;
  /** Each apiserver of a run stores under its own prefix of the one etcd. */
  etcdPrefix: string;
  featureGates?: string[];
}

export class KubeApiserver {
  readonly settings: ApiserverSettings;
  readonly port: number;
  readonly api: KubeClient;
  readonly kubectl: Kubectl;
  private child: Child;

  private constructor(settings: ApiserverSettings, port: number, child: Child) {
    this.settings = settings;
    this.port = port;
    this.child = child;
    const url = `https://127.0.0.1:${port}`;
    this.api = new KubeClient(url, settings.credentials.token, settings.credentials.caPem);
    this.kubectl = new Kubectl(path.join(settings.binDir, 'kubectl'), path.join(settings.workDir, `${settings.name}.kubeconfig`), url, settings.credentials.token, settings.credentials.certFile);
  }

  /** Starts it and waits until /readyz answers 200. */
  static start(settings: ApiserverSettings): Promise<KubeApiserver> {
    return retryOnPortClash(async () => {
      const port = await freePort();
      const apiserver = new KubeApiserver(settings, port, KubeApiserver.spawn(settings, port));
      await apiserver.waitReady();
      return apiserver;
    });
  }

  /** For a configuration the apiserver must refuse: starts it and waits for its exit. */
  static async startExpectingExit(settings: ApiserverSettings, timeoutMs = 180_000): Promise<{ status: ExitStatus | undefined; log: string }> {
    const child = KubeApiserver.spawn(settings, await freePort());
    const timer = setTimeout(() => void child.stop(), timeoutMs);
    const status = await child.exited;
    clearTimeout(timer);
    return { status: status.signal === 'SIGTERM' ? undefined : status, log: child.log() };
  }

  private static spawn(settings: ApiserverSettings, port: number): Child {
    const c = settings.credentials;
    const args = [
      '--etcd-servers', settings.etcd.url, '--etcd-prefix', settings.etcdPrefix,
      // Loopback only: without --endpoint-reconciler-type none the apiserver refuses
      // to advertise 127.0.0.1 for the kubernetes Service.
      '--bind-address', '127.0.0.1', '--advertise-address', '127.0.0.1', '--secure-port', String(port),
      '--endpoint-reconciler-type', 'none',
      '--tls-cert-file', c.certFile, '--tls-private-key-file', c.keyFile,
      '--service-account-issuer', 'https://127.0.0.1', '--service-account-key-file', c.serviceAccountPublicKey,
      '--service-account-signing-key-file', c.serviceAccountPrivateKey,
      '--service-cluster-ip-range', '10.96.0.0/24',
      '--token-auth-file', c.tokenFile, '--authorization-mode', 'RBAC',
      '--encryption-provider-config', settings.encryptionConfigFile,
      '--profiling=false',
    ];
    if (settings.featureGates?.length) args.push(`--feature-gates=${settings.featureGates.join(',')}`);
    return new Child(`kube-apiserver ${settings.name}`, path.join(settings.binDir, 'kube-apiserver'), args, {
      logFile: path.join(settings.workDir, `kube-apiserver-${settings.name}.log`),
    });
  }

  private async waitReady(timeoutMs = 300_000): Promise<void> {
    let last = '';
    try {
      await waitFor(`kube-apiserver ${this.settings.name} /readyz`, async () => {
        if (this.child.exitStatus) throw new Error(`exited ${JSON.stringify(this.child.exitStatus)}`);
        const response = await this.api.request('GET', '/readyz?verbose', undefined, 10_000);
        last = `HTTP ${response.status}: ${response.text.split('\n').filter((l) => l.startsWith('[-]')).join(' ')}`;
        return response.status === 200;
      }, { timeoutMs, intervalMs: 250, describe: () => last });
    } catch (error) {
      const exited = this.child.exitStatus !== undefined;
      await this.child.stop();
      if (exited && saysAddressInUse(this.child.log())) throw new PortClash('kube-apiserver: port in use');
      throw new Error(`${(error as Error).message}\n--- ${this.child.logFile}:\n${this.child.tail(40)}`, { cause: error });
    }
  }

  /** /readyz?verbose: the status and the lines of the checks. */
  async readyz(): Promise<{ status: number; checks: string[] }> {
    const response = await this.api.request('GET', '/readyz?verbose', undefined, 10_000);
    return { status: response.status, checks: response.text.split('\n').filter((line) => /^\[[+-]\]/.test(line)) };
  }

  /** The KMS lines of /readyz ("[+]kms-providers ok", "[-]kms-provider-0 failed: ..."). */
  async kmsChecks(): Promise<{ status: number; kms: string[] }> {
    const { status, checks } = await this.readyz();
    return { status, kms: checks.filter((line) => /^\[[+-]\]kms-provider/.test(line)) };
  }

  /**
   * Stops it (SIGTERM) and starts a new process on the same port; resolves once ready,
   * with the milliseconds from the new process's start to its first 200 on /readyz.
   */
  async restart(): Promise<number> {
    await this.stop();
    const started = performance.now();
    this.child = KubeApiserver.spawn(this.settings, this.port);
    await this.waitReady();
    return performance.now() - started;
  }

  async stop(): Promise<void> {
    const status = await this.child.stop(30_000);
    if (status.signal === 'SIGKILL') throw new Error(`kube-apiserver ${this.settings.name} ignored SIGTERM for 30 s`);
  }

  /** Stops it for good and closes the client's connections. */
  async close(): Promise<void> {
    this.api.close();
    await this.child.stop(30_000);
  }

  /** The running process's id (a restart changes it). */
  get pid(): number | undefined {
    return this.child.pid;
  }

  logTail(lines = 40): string {
    return this.child.tail(lines);
  }
}
