/**
 * The keep-alive HTTPS agent a backend client sends through, with its TLS material
 * (extra CAs, a client certificate) parsed once into one secure context.
 *
 * Why not `new https.Agent({ ca, cert, key })`: Node's agent names its connection pool
 * by concatenating those options into a string on every request (`Agent.getName`), and
 * builds a new secure context, parsing every PEM again, for every new connection. With
 * Node's ~145 root certificates plus a CA file, as the Azure backend passes them, that
 * is a string of about 180,000 characters per request: a quarter of the CPU per Azure call
 * under load, and a large object in the heap each time (docs/performance.md, "TLS
 * material parsed once"). A `secureContext` is not part of the pool's name, and one
 * context serves every connection. Its certificates and key are the same ones
 * `tls.connect` would have used; the server name is still checked per connection.
 */
import type https from 'node:https';
import type { SecureContextOptions } from 'node:tls';
import { TrousseauError } from '../errors.ts';

// The CommonJS modules, not ESM imports: see the note in vault.ts (an ESM import of
// node:http loads Node's bundled undici; this module is loaded by every plugin).
const httpsModule = process.getBuiltinModule('node:https');
const tlsModule = process.getBuiltinModule('node:tls');

export interface TlsMaterial {
  /** PEM CA certificates that replace Node's roots (pass them in to extend, not replace). */
  ca?: SecureContextOptions['ca'];
  /** PEM client certificate chain and its key, for mutual TLS. */
  cert?: SecureContextOptions['cert'];
  key?: SecureContextOptions['key'];
  /** Name to send and check instead of the URL's host. */
  servername?: string | undefined;
}

/**
 * `label` names the backend in the error a certificate or key that OpenSSL refuses
 * gives (BACKEND_UNAVAILABLE, with OpenSSL's error code only: never the file's text).
 */
export function keepAliveHttpsAgent(label: string, material: TlsMaterial): https.Agent {
  const { ca, cert, key, servername } = material;
  let secureContext: ReturnType<typeof tlsModule.createSecureContext>;
  try {
    secureContext = tlsModule.createSecureContext({
      ...(ca !== undefined ? { ca } : {}),
      ...(cert !== undefined ? { cert } : {}),
      ...(key !== undefined ? { key } : {}),
    });
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? 'error';
    throw new TrousseauError('BACKEND_UNAVAILABLE', `${label}: the TLS certificate or key cannot be used (${code})`, { cause: error });
  }
  return new httpsModule.Agent({ keepAlive: true, secureContext, ...(servername !== undefined ? { servername } : {}) });
}
