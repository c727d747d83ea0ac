/**
 * `trousseau doctor`, run as the operator runs it, against real files, real ports and
 * the real OpenBao TLS server. Each problem the issue names gets a configuration that
 * has it and a check that catches it: a missing key file, a key file readable by
 * others, a host that does not resolve, a certificate nobody trusts, an HTTP port
 * already taken, a clock 10 minutes off (told by a small HTTP server of the test that
 * dates its answers 10 minutes ahead: it is the peer doctor reads the time from).
 */
import test, { type ExecutionContext } from 'ava';
import { chmod, mkdir, readFile, writeFile } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { generateKeyFile } from '../../src/backends/local.ts';
import type { CheckResult, DoctorReport } from '../../src/cli/doctor.ts';
import { eventually, runCli, spawnServe, tempDir } from '../helpers/plugin-harness.ts';
import { requireServer, requireVar } from '../helpers/servers.ts';

interface Doctor {
  code: number | null;
  report: DoctorReport;
  text: string;
}

async function doctor(t: ExecutionContext, dir: string, yaml: string, extra: string[] = []): Promise<Doctor> {
  const file = path.join(dir, 'trousseau.yaml');
  await writeFile(file, yaml);
  // Each run loads every backend SDK: generous bounds for a loaded CI machine.
  t.timeout(180_000);
  const [json, text] = await Promise.all([
    runCli(['doctor', '-c', file, '--json', ...extra], { timeoutMs: 120_000 }),
    runCli(['doctor', '-c', file, ...extra], { timeoutMs: 120_000 }),
  ]);
  t.is(json.code, text.code, 'the exit status does not depend on --json');
  t.notRegex(json.stderr + text.stderr, /\n\s+at /, 'no stack trace');
  return { code: json.code, report: JSON.parse(json.stdout) as DoctorReport, text: text.stdout };
}

function result(t: ExecutionContext, report: DoctorReport, check: string): CheckResult {
  const found = report.checks.find((c) => c.check === check);
  if (found) return found;
  t.fail(`no check "${check}" in ${report.checks.map((c) => c.check).join(', ')}`);
  return { check, status: 'skip', detail: 'absent' };
}

const localBackends = (dir: string, names: string[]) =>
  names.flatMap((n) => [`  - name: ${n}`, '    type: local', `    keyFile: ${path.join(dir, `${n}.key`)}`]).join('\n');

const header = (dir: string, quorum: number, listen?: string) =>
  [`socket:`, `  path: ${path.join(dir, 'kms.sock')}`, ...(listen ? ['http:', `  listen: ${listen}`] : []), `quorum: ${quorum}`, 'backends:'].join('\n');

test.serial('a missing key file and a key file of mode 644 fail, each with its fix; exit status 1', async (t) => {
  const dir = await tempDir(t);
  await generateKeyFile(path.join(dir, 'good.key'));
  await generateKeyFile(path.join(dir, 'open.key'));
  await chmod(path.join(dir, 'open.key'), 0o644);
  const run = await doctor(t, dir, `${header(dir, 1)}\n${localBackends(dir, ['good', 'open', 'gone'])}\n`);
  t.is(run.code, 1);
  t.false(run.report.ok);
  t.is(result(t, run.report, 'good keyFile').status, 'pass');
  const open = result(t, run.report, 'open keyFile');
  t.is(open.status, 'fail');
  t.regex(open.detail, /readable by group or others \(mode 644\)/);
  t.is(open.fix, `chmod 600 ${path.join(dir, 'open.key')}`);
  const gone = result(t, run.report, 'gone keyFile');
  t.is(gone.status, 'fail');
  t.regex(gone.detail, /does not exist/);
  t.regex(gone.fix!, /restore it from its backup/);
  t.regex(run.text, /^FAIL +open keyFile .*-> fix: chmod 600 /m);
  t.regex(run.text, /^FAIL +gone keyFile .*does not exist/m);
  t.regex(run.text, /NOT OK: /);
  // The key itself is never printed.
  const key = (await readFile(path.join(dir, 'good.key'), 'utf8')).split(' ')[0]!;
  t.false(run.text.includes(key) || JSON.stringify(run.report).includes(key), 'a key was printed');
});

test.serial('a good local configuration passes with exit status 0, and --live wraps and unwraps', async (t) => {
  const dir = await tempDir(t);
  for (const n of ['a', 'b']) await generateKeyFile(path.join(dir, `${n}.key`));
  const run = await doctor(t, dir, `${header(dir, 2)}\n${localBackends(dir, ['a', 'b'])}\n`, ['--live']);
  t.is(run.code, 0, run.text);
  t.true(run.report.ok);
  t.is(result(t, run.report, 'socket folder').status, 'pass');
  for (const n of ['a', 'b']) t.is(result(t, run.report, `${n} live`).status, 'pass');
  t.regex(run.text, /^ok: /m);
});

test.serial('a backend host that does not resolve fails the DNS check; what depends on it is skipped', async (t) => {
  const dir = await tempDir(t);
  await writeFile(path.join(dir, 'token'), 'not-a-real-token', { mode: 0o600 });
  // .invalid never resolves (RFC 6761).
  const yaml = [
    header(dir, 1),
    '  - name: far',
    '    type: vault',
    '    address: https://no-such-vault.invalid:8200',
    '    keyName: trousseau',
    '    auth:',
    '      method: token',
    `      tokenFile: ${path.join(dir, 'token')}`,
  ].join('\n');
  const run = await doctor(t, dir, `${yaml}\n`);
  t.is(run.code, 1);
  const lookup = result(t, run.report, 'far dns');
  t.is(lookup.status, 'fail');
  t.regex(lookup.detail, /no-such-vault\.invalid does not resolve/);
  t.regex(lookup.fix!, /DNS/);
  t.is(result(t, run.report, 'far tls').status, 'skip');
  t.is(result(t, run.report, 'far credentials').status, 'skip');
  t.false(run.text.includes('not-a-real-token'), 'the token was printed');
});

test.serial('an HTTP port already in use fails the port check', async (t) => {
  const dir = await tempDir(t);
  await generateKeyFile(path.join(dir, 'a.key'));
  const taken = net.createServer();
  await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => taken.close(() => resolve())));
  const { port } = taken.address() as net.AddressInfo;
  const run = await doctor(t, dir, `${header(dir, 1, `127.0.0.1:${port}`)}\n${localBackends(dir, ['a'])}\n`);
  t.is(run.code, 1);
  const check = result(t, run.report, 'http port');
  t.is(check.status, 'fail');
  t.regex(check.detail, new RegExp(`127\\.0\\.0\\.1:${port} is in use`));
  t.regex(check.fix!, /http\.listen|--http-listen/);
});

test.serial('a backend whose clock is 10 minutes ahead fails the clock check', async (t) => {
  const dir = await tempDir(t);
  await writeFile(path.join(dir, 'token'), 'not-a-real-token', { mode: 0o600 });
  const ahead = http.createServer((_request, response) => {
    response.writeHead(404, { date: new Date(Date.now() + 10 * 60_000).toUTCString(), 'content-type': 'application/json' });
    response.end('{"errors":[]}');
  });
  await new Promise<void>((resolve) => ahead.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => ahead.close(() => resolve())));
  const { port } = ahead.address() as net.AddressInfo;
  const yaml = [
    header(dir, 1),
    '  - name: skewed',
    '    type: vault',
    `    address: http://127.0.0.1:${port}`,
    '    keyName: trousseau',
    '    auth:',
    '      method: token',
    `      tokenFile: ${path.join(dir, 'token')}`,
  ].join('\n');
  const run = await doctor(t, dir, `${yaml}\n`);
  t.is(run.code, 1);
  const clock = result(t, run.report, 'skewed clock');
  t.is(clock.status, 'fail');
  t.regex(clock.detail, /this node's clock is (59\d|60\d) s behind 127\.0\.0\.1/);
  t.regex(clock.fix!, /synchronise the node clock/);
});

test.serial('OpenBao over TLS: without its CA the certificate is untrusted; with it every check passes, --live included', async (t) => {
  const server = requireServer('openbao');
  if ('missing' in server) {
    t.pass(server.missing);
    return;
  }
  const address = requireVar(server.env, 'VAULT_TLS_ADDR', 'openbao');
  const caFile = requireVar(server.env, 'VAULT_TLS_CA_FILE', 'openbao');
  const tokenFile = requireVar(server.env, 'VAULT_TLS_TOKEN_FILE', 'openbao');
  const keyName = requireVar(server.env, 'VAULT_KEY_NAME', 'openbao');
  const token = (await readFile(tokenFile, 'utf8')).trim();
  const vault = (name: string, withCa: boolean) =>
    [
      `  - name: ${name}`,
      '    type: vault',
      `    address: ${address}`,
      `    keyName: ${keyName}`,
      ...(withCa ? ['    tls:', `      caFile: ${caFile}`] : []),
      '    auth:',
      '      method: token',
      `      tokenFile: ${tokenFile}`,
    ].join('\n');
  const dir = await tempDir(t);

  const untrusted = await doctor(t, dir, `${header(dir, 1)}\n${vault('bao', false)}\n`);
  t.is(untrusted.code, 1);
  const handshake = result(t, untrusted.report, 'bao tls');
  t.is(handshake.status, 'fail');
  t.regex(handshake.detail, /the server certificate is not trusted \((UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)\)/);
  t.regex(handshake.fix!, /tls\.caFile/);
  t.is(result(t, untrusted.report, 'bao credentials').status, 'skip');

  const trusted = await doctor(t, dir, `${header(dir, 1)}\n${vault('bao', true)}\n`, ['--live']);
  t.is(trusted.code, 0, trusted.text);
  for (const check of ['bao auth.tokenFile', 'bao tls.caFile', 'bao dns', 'bao tls', 'bao clock', 'bao credentials', 'bao live']) {
    t.is(result(t, trusted.report, check).status, 'pass', check);
  }
  for (const output of [trusted.text, JSON.stringify(trusted.report), untrusted.text]) t.false(output.includes(token), 'the Vault token was printed');
});

test.serial('on a node where the plugin already serves: the taken port and the served socket are warnings, not failures', async (t) => {
  t.timeout(180_000);
  const dir = await tempDir(t);
  const socketPath = path.join(dir, 'run', 'kms.sock');
  const keys = path.join(dir, 'keys');
  const serving = await spawnServe(t, ['--dev', '--data-dir', keys, '--socket', socketPath, '--http-listen', '127.0.0.1:0'], socketPath);
  const address = await eventually(() => {
    const line = serving.stderr.split('\n').find((l) => l.includes('"serving /metrics, /healthz, /readyz"'));
    return line ? (JSON.parse(line) as { address: string }).address : undefined;
  }, 60_000, 50);
  const yaml = [
    'socket:',
    `  path: ${socketPath}`,
    'http:',
    `  listen: ${address}`,
    'quorum: 2',
    'backends:',
    ...['local-a', 'local-b', 'local-c'].flatMap((n) => [`  - name: ${n}`, '    type: local', `    keyFile: ${path.join(keys, `${n}.key`)}`]),
  ].join('\n');
  const run = await doctor(t, dir, `${yaml}\n`);
  t.is(run.code, 0, run.text);
  t.is(result(t, run.report, 'socket').status, 'warn');
  const port = result(t, run.report, 'http port');
  t.is(port.status, 'warn');
  t.regex(port.detail, /in use, and a process serves the socket/);
  await serving.terminate();
});

test.serial('a Vault token file in a folder other users can write fails, as the plugin would refuse it', async (t) => {
  const dir = await tempDir(t);
  const open = path.join(dir, 'open');
  await mkdir(open);
  await chmod(open, 0o777);
  await writeFile(path.join(open, 'token'), 'hvs.not-a-real-token-0123456789', { mode: 0o600 });
  await generateKeyFile(path.join(dir, 'good.key'));
  const vault = ['  - name: vault-a', '    type: vault', '    address: http://127.0.0.1:1', '    keyName: k', '    auth:', '      method: token', `      tokenFile: ${path.join(open, 'token')}`].join('\n');
  const run = await doctor(t, dir, `${header(dir, 1)}\n${localBackends(dir, ['good'])}\n${vault}\n`);
  t.is(run.code, 1);
  const token = result(t, run.report, 'vault-a auth.tokenFile');
  t.is(token.status, 'fail');
  t.regex(token.detail, /open is writable by users other than root and the plugin's user \(mode 777\)/);
  t.false(run.text.includes('hvs.not-a-real-token'), 'the token was printed');
});
