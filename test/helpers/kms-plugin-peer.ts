/**
 * A private instance of a real peer KMS v2 plugin (aws-encryption-provider over the
 * shared local-kms), for tests that kill and restart it: the shared instance that
 * test/servers/aws-encryption-provider.server.sh starts is used by other test files at
 * the same time and is never stopped by a test. The binary and command line come from
 * that script's env file (.servers/env/aws-encryption-provider.env).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { ExecutionContext } from 'ava';
import { call } from '../../src/cli/client.ts';
import { V2Service } from '../../src/kms/proto.ts';
import type { V2StatusResponse } from '../../src/kms/types.ts';
import { eventually } from './plugin-harness.ts';
import { requireVar } from './servers.ts';

export interface PeerInstance {
  socket: string;
  /** SIGKILL: no clean-up, the socket file stays behind (connections are refused). */
  kill(): Promise<void>;
  /** Start it again on the same socket, and wait until its Status says ok. */
  restart(): Promise<void>;
  readonly log: string;
}

/** Status of the KMS v2 plugin on `socket`, asked as the apiserver asks. */
export async function peerStatus(socket: string, timeoutMs = 2000): Promise<V2StatusResponse> {
  const client = new V2Service(`unix:${socket}`, grpc.credentials.createInsecure());
  try {
    return await call<object, V2StatusResponse>(client, 'Status', {}, timeoutMs);
  } finally {
    client.close();
  }
}

/** Start aws-encryption-provider on `<dir>/<name>.sock` (dir: a private folder) and wait for it. */
export async function startAwsEncryptionProvider(t: ExecutionContext, env: Record<string, string>, dir: string, name = 'aws-encryption-provider'): Promise<PeerInstance> {
  const server = 'aws-encryption-provider';
  const binary = requireVar(env, 'AWS_ENCRYPTION_PROVIDER_BINARY', server);
  const socket = path.join(dir, `${name}.sock`);
  const args = [
    '--listen',
    socket,
    '--key',
    requireVar(env, 'AWS_ENCRYPTION_PROVIDER_KEY_ARN', server),
    '--region',
    requireVar(env, 'AWS_ENCRYPTION_PROVIDER_REGION', server),
    '--kms-endpoint',
    requireVar(env, 'AWS_ENCRYPTION_PROVIDER_KMS_ENDPOINT', server),
    // Port 0: a free port of the kernel's choice, on loopback only.
    '--health-port',
    '127.0.0.1:0',
    '--health-kms-version',
    'v2',
  ];
  const childEnv = {
    PATH: process.env.PATH ?? '/usr/bin:/bin',
    AWS_ACCESS_KEY_ID: requireVar(env, 'AWS_ENCRYPTION_PROVIDER_ACCESS_KEY_ID', server),
    AWS_SECRET_ACCESS_KEY: requireVar(env, 'AWS_ENCRYPTION_PROVIDER_SECRET_ACCESS_KEY', server),
    AWS_EC2_METADATA_DISABLED: 'true',
  };
  let child: ChildProcess | undefined;
  let log = '';
  const launch = async () => {
    const started = spawn(binary, args, { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
    const keep = (d: Buffer) => (log = (log + d.toString()).slice(-20_000));
    started.stdout?.on('data', keep);
    started.stderr?.on('data', keep);
    child = started;
    await eventually(
      () =>
        peerStatus(socket).then(
          (s) => (s.healthz === 'ok' ? true : undefined),
          () => undefined,
        ),
      30_000,
      100,
    );
  };
  const kill = async () => {
    const running = child;
    child = undefined;
    if (!running || running.exitCode !== null || running.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => running.once('exit', () => resolve()));
    running.kill('SIGKILL');
    await exited;
  };
  t.teardown(kill);
  await launch();
  return {
    socket,
    kill,
    restart: launch,
    get log() {
      return log;
    },
  };
}
