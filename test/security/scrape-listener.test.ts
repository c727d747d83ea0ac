/**
 * The scrape listener (`http.scrape`, src/observability/scrape-listener.ts) is the
 * one port of the plugin a network can reach. Whoever lacks the bearer token gets 401
 * on every path, health included; the token holder gets /metrics only, over TLS; the
 * listener refuses to start on a token or key file others can read; a rotated token
 * is taken without a restart. The callers here are an unprivileged user (uid 65534),
 * as a hostile local user or network peer is.
 */
import { execFile } from 'node:child_process';
import { chmod, readFile, rename, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import test, { type ExecutionContext } from 'ava';
import { generateKeyFile } from '../../src/backends/local.ts';
import { startPlugin, type RunningPlugin } from '../../src/cli/serve.ts';
import { parseConfig } from '../../src/config/load.ts';
import { TrousseauError } from '../../src/errors.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { tempDir } from '../helpers/plugin-harness.ts';

const run = promisify(execFile);
const TOKEN = 'scrape-token-0123456789abcdef';

/** A self-signed certificate for the name `trousseau-metrics`, as docs/operations/monitoring.md makes one. */
async function makeCertificate(dir: string): Promise<void> {
  await run('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2',
    '-subj', '/CN=trousseau-metrics', '-addext', 'subjectAltName=DNS:trousseau-metrics',
    '-keyout', path.join(dir, 'metrics.key'), '-out', path.join(dir, 'metrics.crt'),
  ], { timeout: 30_000 });
  await chmod(path.join(dir, 'metrics.key'), 0o600);
  await chmod(path.join(dir, 'metrics.crt'), 0o644);
  // The CA bundle the scraper trusts, readable by the unprivileged caller.
  await writeFile(path.join(dir, 'ca.crt'), await readFile(path.join(dir, 'metrics.crt')), { mode: 0o644 });
}

async function setUp(t: ExecutionContext, tokenMode = 0o600): Promise<{ dir: string; config: ReturnType<typeof parseConfig> }> {
  const dir = await tempDir(t);
  await chmod(dir, 0o755); // the unprivileged caller reads ca.crt here
  await generateKeyFile(path.join(dir, 'a.key'));
  await makeCertificate(dir);
  await writeFile(path.join(dir, 'token'), `${TOKEN}\n`, { mode: tokenMode });
  await chmod(path.join(dir, 'token'), tokenMode);
  const config = parseConfig({
    socket: { path: path.join(dir, 'kms.sock') },
    quorum: 1,
    backends: [{ name: 'a', type: 'local', keyFile: 'a.key' }],
    http: { listen: '127.0.0.1:0', scrape: { listen: '127.0.0.1:0', certFile: 'metrics.crt', keyFile: 'metrics.key', bearerTokenFile: 'token' } },
    health: { probeIntervalMs: 3_600_000 },
    escrow: { initialDelayMs: 3_600_000 },
  });
  return { dir, config };
}

async function start(t: ExecutionContext, dir: string, config: ReturnType<typeof parseConfig>): Promise<RunningPlugin> {
  const running = await startPlugin(config, dir, silentLogger());
  t.teardown(() => running.stop());
  return running;
}

/**
 * HTTPS GET as uid 65534 (when run as root), trusting `ca`, sending `token` if given;
 * status code and body. A transport failure (code 0: on a loaded machine a handshake
 * can miss curl's bound) is tried again, up to three times; any HTTP answer is final.
 */
async function curlAsNobody(url: string, ca: string, token?: string): Promise<{ code: number; body: string }> {
  const curl = ['curl', '-s', '--max-time', '30', '--cacert', ca, '--resolve', `trousseau-metrics:${new URL(url).port}:127.0.0.1`, '-w', '\n%{http_code}'];
  if (token !== undefined) curl.push('-H', `Authorization: Bearer ${token}`);
  curl.push(url);
  const [file, ...args] = process.getuid?.() === 0 ? ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', ...curl] : curl;
  let answer = { code: 0, body: '' };
  for (let attempt = 0; attempt < 3 && answer.code === 0; attempt++) {
    const { stdout } = await run(file!, args, { timeout: 45_000 }).catch((error: { stdout?: string }) => ({ stdout: error.stdout ?? '\n0' }));
    const cut = stdout.lastIndexOf('\n');
    answer = { code: Number(stdout.slice(cut + 1)), body: stdout.slice(0, cut) };
  }
  return answer;
}

test.serial('without the bearer token every path answers 401 and shows nothing; with it only /metrics answers, over verified TLS', async (t) => {
  t.timeout(180_000); // 36 curl runs as another user: slow on a loaded machine, never a measure of anything
  const { dir, config } = await setUp(t);
  const running = await start(t, dir, config);
  const port = Number(running.scrapeAddress!.split(':').pop());
  const ca = path.join(dir, 'ca.crt');
  const base = `https://trousseau-metrics:${port}`;

  for (const url of ['/metrics', '/readyz', '/healthz', '/livez', '/', '/nothing']) {
    for (const token of [undefined, 'wrong-token-0123456789abcdef', `${TOKEN}x`, TOKEN.slice(0, -1), '']) {
      const answer = await curlAsNobody(base + url, ca, token);
      t.is(answer.code, 401, `${url} with ${token === undefined ? 'no token' : 'a wrong token'}`);
      t.is(answer.body, '', `${url} shows nothing without the token`);
    }
  }

  const metrics = await curlAsNobody(`${base}/metrics`, ca, TOKEN);
  t.is(metrics.code, 200);
  t.regex(metrics.body, /^trousseau_configured_backends 1$/m);
  // Health details stay on the loopback listener, token or not.
  t.is((await curlAsNobody(`${base}/readyz`, ca, TOKEN)).code, 404);
  t.is((await curlAsNobody(`${base}/healthz`, ca, TOKEN)).code, 404);
  // Plain HTTP on the TLS port gets no metrics.
  const plain = await curlAsNobody(`http://trousseau-metrics:${port}/metrics`, ca, TOKEN);
  t.not(plain.code, 200);
  t.false(plain.body.includes('trousseau_'));
  // The loopback listener is unchanged: probes need no token.
  t.is((await fetch(`http://${running.httpAddress}/healthz`)).status, 200);
});

test.serial('the listener refuses to start when the token file is readable by others, and names the field, not the token', async (t) => {
  const { dir, config } = await setUp(t, 0o644);
  const error = await t.throwsAsync(startPlugin(config, dir, silentLogger()));
  t.true(error instanceof TrousseauError);
  t.regex(error.message, /http\.scrape\.bearerTokenFile is readable by group or others/);
  t.false(error.message.includes(TOKEN));
  // Start-up failed closed: the socket is gone, nothing listens.
  await t.throwsAsync(readFile(path.join(dir, 'kms.sock')));
});

test.serial('the listener refuses a token that is too short to resist guessing', async (t) => {
  const { dir, config } = await setUp(t);
  await writeFile(path.join(dir, 'token'), 'short\n', { mode: 0o600 });
  const error = await t.throwsAsync(startPlugin(config, dir, silentLogger()));
  t.regex(error.message, /bearerTokenFile must hold one token of at least 16 characters/);
  t.false(error.message.includes('short'));
});

test.serial('a rotated token file is taken without a restart: the new token works, the old one is refused', async (t) => {
  const { dir, config } = await setUp(t);
  const running = await start(t, dir, config);
  const port = Number(running.scrapeAddress!.split(':').pop());
  const ca = path.join(dir, 'ca.crt');
  const url = `https://trousseau-metrics:${port}/metrics`;
  t.is((await curlAsNobody(url, ca, TOKEN)).code, 200);

  const rotated = 'rotated-token-fedcba9876543210';
  await writeFile(path.join(dir, 'token.new'), `${rotated}\n`, { mode: 0o600 });
  await rename(path.join(dir, 'token.new'), path.join(dir, 'token'));
  // The listener looks at its files every 30 s; ask it now instead of waiting.
  await running.reloadScrapeListener();
  t.is((await curlAsNobody(url, ca, rotated)).code, 200);
  t.is((await curlAsNobody(url, ca, TOKEN)).code, 401);

  // A broken replacement (others can read it) is not taken: the last good token stays.
  await chmod(path.join(dir, 'token'), 0o644);
  await running.reloadScrapeListener();
  t.is((await curlAsNobody(url, ca, rotated)).code, 200);
});
