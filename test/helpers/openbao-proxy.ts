/**
 * The real OpenBao server of test/servers/up.sh behind a fault proxy, as the config of
 * a vault backend named `slow`. The proxy's hold() keeps a backend call in flight for
 * exactly as long as a test needs, then pass() lets it through. (Key files cannot do
 * this: they are read without blocking, and a FIFO is refused.)
 */
import type { ExecutionContext } from 'ava';
import { FaultProxy } from '../chaos/fault-proxy.ts';
import { requireServer, requireVar } from './servers.ts';

export async function openbaoBehindProxy(t: ExecutionContext, timeoutMs: number) {
  const server = requireServer('openbao');
  if ('missing' in server) throw new Error(server.missing);
  const need = (name: string) => requireVar(server.env, name, 'openbao');
  const proxy = await FaultProxy.start('openbao', need('VAULT_ADDR'));
  t.teardown(() => proxy.close());
  const backend = {
    name: 'slow',
    type: 'vault',
    address: `http://127.0.0.1:${proxy.port}`,
    transitMount: need('VAULT_TRANSIT_MOUNT'),
    keyName: need('VAULT_KEY_NAME'),
    auth: { method: 'token', tokenFile: need('VAULT_TOKEN_FILE') },
    timeoutMs,
  };
  return { proxy, backend };
}
