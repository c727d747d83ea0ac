/**
 * Loopback ports for etcd and kube-apiserver. A fixed port can be taken by another
 * helper's server or, inside the kernel's ephemeral range, by any outgoing socket; so
 * the kernel picks a free one, and the caller starts its server on it and retries
 * with another port when the server reports the address in use (see `retryOnPortClash`).
 */
import net from 'node:net';

export async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: '127.0.0.1', port: 0, exclusive: true }, resolve);
  });
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

export class PortClash extends Error {}

/** Runs `start` up to `attempts` times while it throws PortClash. */
export async function retryOnPortClash<T>(start: () => Promise<T>, attempts = 4): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await start();
    } catch (error) {
      if (!(error instanceof PortClash) || attempt >= attempts) throw error;
    }
  }
}

/** True when a server's log says it could not bind. */
export function saysAddressInUse(log: string): boolean {
  return /address already in use|EADDRINUSE/i.test(log);
}
