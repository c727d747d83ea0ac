/**
 * The fault proxy's `drained()`: the soak's settle between phases waits on it, so that
 * a request a heavy tail still delays after the switch back to `pass` ends (and, at
 * the plugin, times out) before the next phase starts, not inside it.
 */
import test from 'ava';
import net from 'node:net';
import { once } from 'node:events';
import { FaultProxy } from './fault-proxy.ts';

async function echoServer(t: import('ava').ExecutionContext): Promise<number> {
  const server = net.createServer((socket) => socket.pipe(socket));
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.teardown(() => server.close());
  return (server.address() as net.AddressInfo).port;
}

test('drained() waits for a request a heavy tail delayed past the switch to pass', async (t) => {
  const port = await echoServer(t);
  const proxy = await FaultProxy.start('echo', `127.0.0.1:${port}`);
  t.teardown(() => proxy.close());
  const socket = net.connect(proxy.port, '127.0.0.1');
  t.teardown(() => socket.destroy());
  await once(socket, 'connect');

  await proxy.heavyTail(1, 400);
  const echoed = once(socket, 'data');
  const writtenAt = Date.now();
  socket.write('delayed');
  // Give the proxy the bytes (and the 400 ms delay) before the fault ends.
  await new Promise((resolve) => setTimeout(resolve, 50));
  await proxy.pass();
  await proxy.drained();
  // The chunk was scheduled 400 ms after it arrived; a timer never fires early.
  t.true(Date.now() - writtenAt >= 395, `drained() resolved ${Date.now() - writtenAt} ms after the write`);
  await echoed;
});

test('drained() resolves when nothing is delayed', async (t) => {
  const port = await echoServer(t);
  const proxy = await FaultProxy.start('echo', `127.0.0.1:${port}`);
  t.teardown(() => proxy.close());
  await t.notThrowsAsync(proxy.drained(100));
});
