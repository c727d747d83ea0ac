// Node's HTTPS agent keys its pool of keep-alive connections by a name built from the
// request's TLS options. Options given as PEM text (`ca`, `cert`, `key`) were
// concatenated into that name on every request and parsed again for every connection
// (src/backends/https-agent.ts says why the backends now pass a secure context).
// The backend tests read the names through Node's public diagnostics channel.
import diagnosticsChannel from 'node:diagnostics_channel';
import { Agent } from 'node:https';

/**
 * Runs `action` and returns the pool names of every HTTPS agent it sent a request
 * through, read after it ends (while its keep-alive sockets are still pooled), except
 * agents for which `ignore` is true (a test's own admin client, say).
 */
export async function httpsPoolNamesDuring(action: () => Promise<void>, ignore: (agent: Agent) => boolean = () => false): Promise<string[]> {
  const agents = new Set<Agent>();
  const onStart = (message: unknown) => {
    const agent = (message as { request: { agent?: unknown } }).request.agent;
    if (agent instanceof Agent && !ignore(agent)) agents.add(agent);
  };
  diagnosticsChannel.subscribe('http.client.request.start', onStart);
  try {
    await action();
  } finally {
    diagnosticsChannel.unsubscribe('http.client.request.start', onStart);
  }
  return [...agents].flatMap((agent) => [...Object.keys(agent.sockets), ...Object.keys(agent.freeSockets)]);
}
