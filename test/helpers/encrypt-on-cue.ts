/**
 * A KMS v2 client in a process of its own, for tests that stall the plugin's event
 * loop: its clock keeps running while the plugin's is stopped, as the apiserver's does.
 *
 *   node test/helpers/encrypt-on-cue.ts <socket> <deadline ms>
 *
 * Connects (a v2 Status), prints "ready", and on the line "go" on its standard input
 * sends one Encrypt with that deadline, then prints one JSON line
 * `{ code, details, ms }` (ms: from sending to the answer, by this process's clock).
 */
import { createInterface } from 'node:readline';
import { status } from '@grpc/grpc-js';
import { call, clientsFor } from '../../src/cli/client.ts';
import type * as T from '../../src/kms/types.ts';

const [socketPath, deadline] = process.argv.slice(2);
const deadlineMs = Number(deadline);
const clients = clientsFor(socketPath!);
await call<object, T.V2StatusResponse>(clients.v2, 'Status', {});
process.stdout.write('ready\n');
for await (const line of createInterface({ input: process.stdin })) {
  if (line.trim() !== 'go') continue;
  const started = performance.now();
  const answer = await call<T.V2EncryptRequest, T.V2EncryptResponse>(clients.v2, 'Encrypt', { plaintext: Buffer.from('a seed, not a secret'), uid: 'encrypt-on-cue' }, deadlineMs).then(
    () => ({ code: status.OK, details: '' }),
    (error: { code: status; details: string }) => ({ code: error.code, details: error.details }),
  );
  process.stdout.write(`${JSON.stringify({ ...answer, ms: Math.round(performance.now() - started) })}\n`);
  break;
}
clients.close();
