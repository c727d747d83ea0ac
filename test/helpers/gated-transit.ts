/**
 * A stand-in for a Vault transit engine on 127.0.0.1, for tests that need a backend
 * call to stay in flight for exactly as long as they want: `hold()` makes the next
 * decrypt wait until `release()`, and `held` resolves when that decrypt has arrived.
 * Its "encryption" is the identity (the ciphertext is the plaintext in base64): it
 * stands for a slow server, not for Vault's cryptography.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';

export interface GatedTransit {
  address: string;
  /** Hold the next decrypt; resolves once it has arrived and is being held. */
  hold(): Promise<void>;
  /** Answer the held decrypt. */
  release(): void;
  close(): Promise<void>;
}

export async function startGatedTransit(keyName: string): Promise<GatedTransit> {
  let armed: (() => void) | undefined;
  let releaseHeld: (() => void) | undefined;
  const server = http.createServer((request, response) => {
    const chunks: Buffer[] = [];
    request.on('data', (c: Buffer) => chunks.push(c));
    request.on('end', () => {
      const body = chunks.length ? (JSON.parse(Buffer.concat(chunks).toString('utf8')) as Record<string, string>) : {};
      const reply = (data: unknown) => {
        response.writeHead(200, { 'content-type': 'application/json' });
        response.end(JSON.stringify({ data }));
      };
      if (request.method === 'GET' && request.url === `/v1/transit/keys/${keyName}`) return reply({ latest_version: 1 });
      if (request.url === `/v1/transit/encrypt/${keyName}`) return reply({ ciphertext: `vault:v1:${body.plaintext}` });
      if (request.url === `/v1/transit/decrypt/${keyName}`) {
        const answer = () => reply({ plaintext: (body.ciphertext ?? '').replace(/^vault:v1:/, '') });
        if (!armed) return answer();
        const arrived = armed;
        armed = undefined;
        releaseHeld = answer;
        return arrived();
      }
      response.writeHead(404).end('{}');
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    address: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    hold: () => new Promise<void>((resolve) => (armed = resolve)),
    release: () => releaseHeld?.(),
    close: () => {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}
