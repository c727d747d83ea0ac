/**
 * Talking to kube-apiserver as its admin: the REST API over HTTPS with a bearer token
 * (the suite's reads and writes), and the kubectl binary for what the documentation
 * tells an operator to type.
 */
import { execFile } from 'node:child_process';
import https from 'node:https';
import { writeFileSync } from 'node:fs';
import { promisify } from 'node:util';

const run = promisify(execFile);

export interface ApiResponse {
  status: number;
  text: string;
}

export class KubeClient {
  readonly baseUrl: string;
  private readonly token: string;
  private readonly agent: https.Agent;

  constructor(baseUrl: string, token: string, caPem: string) {
    this.baseUrl = baseUrl;
    this.token = token;
    // Node's fetch takes no CA of its own without an extra package; https does.
    this.agent = new https.Agent({ ca: caPem, keepAlive: true, maxSockets: 16 });
  }

  request(method: string, path: string, body?: unknown, timeoutMs = 30_000): Promise<ApiResponse> {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise((resolve, reject) => {
      const request = https.request(new URL(path, this.baseUrl), {
        method,
        agent: this.agent,
        timeout: timeoutMs,
        headers: {
          authorization: `Bearer ${this.token}`,
          accept: 'application/json',
          ...(payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}),
        },
      }, (response) => {
        const chunks: Buffer[] = [];
        response.on('data', (chunk: Buffer) => chunks.push(chunk));
        response.on('end', () => resolve({ status: response.statusCode ?? 0, text: Buffer.concat(chunks).toString('utf8') }));
        response.on('error', reject);
      });
      request.on('timeout', () => request.destroy(new Error(`${method} ${path}: no answer in ${timeoutMs} ms`)));
      request.on('error', reject);
      request.end(payload);
    });
  }

  /** The parsed body of a 2xx answer; anything else throws with the status and body. */
  async json<T = unknown>(method: string, path: string, body?: unknown, timeoutMs?: number): Promise<T> {
    const response = await this.request(method, path, body, timeoutMs);
    if (response.status < 200 || response.status > 299) throw new ApiError(method, path, response);
    return JSON.parse(response.text) as T;
  }

  close(): void {
    this.agent.destroy();
  }
}

export class ApiError extends Error {
  readonly status: number;
  constructor(method: string, path: string, response: ApiResponse) {
    super(`${method} ${path}: HTTP ${response.status}: ${response.text.slice(0, 300)}`);
    this.status = response.status;
  }
}

/** kubectl with a kubeconfig of its own for one apiserver. */
export class Kubectl {
  readonly bin: string;
  readonly kubeconfig: string;

  constructor(bin: string, kubeconfig: string, server: string, token: string, caFile: string) {
    this.bin = bin;
    this.kubeconfig = kubeconfig;
    writeFileSync(kubeconfig, JSON.stringify({
      apiVersion: 'v1',
      kind: 'Config',
      clusters: [{ name: 'e2e', cluster: { server, 'certificate-authority': caFile } }],
      users: [{ name: 'e2e-admin', user: { token } }],
      contexts: [{ name: 'e2e', context: { cluster: 'e2e', user: 'e2e-admin' } }],
      'current-context': 'e2e',
    }), { mode: 0o600 });
  }

  /**
   * Runs a shell pipeline as an operator would type it, with this kubectl first on the
   * PATH and its kubeconfig; any failing command of the pipeline fails it.
   */
  async shell(pipeline: string, timeoutMs = 300_000): Promise<{ stdout: string; stderr: string }> {
    const dir = this.bin.slice(0, this.bin.lastIndexOf('/'));
    return run('bash', ['-o', 'pipefail', '-ec', pipeline], {
      env: { ...process.env, PATH: `${dir}:${process.env.PATH ?? ''}`, KUBECONFIG: this.kubeconfig },
      timeout: timeoutMs,
      maxBuffer: 256 * 1024 * 1024,
    });
  }
}
