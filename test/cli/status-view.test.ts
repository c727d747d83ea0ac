/**
 * The status table stays readable with AWS key ARNs as key versions: the cell is
 * shortened in the middle (both ends stay: region and account, and the key id's
 * end), while `status --json` keeps the full ARN.
 */
import test from 'ava';
import { escrowCell, middleTruncate, renderStatus, type StatusDocument } from '../../src/cli/status-view.ts';

const arn = (n: number) => `arn:aws:kms:eu-west-1:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890a${n}`;

function backend(name: string, keyVersion: string): StatusDocument['backends'][number] {
  return {
    name,
    kind: 'aws',
    priority: 100,
    breaker: 'closed',
    probeOk: true,
    lastError: 'BACKEND_UNAVAILABLE',
    lastErrorAt: Date.now() - 90_000,
    lastSuccessAt: Date.now(),
    healthySince: Date.now() - 60_000,
    keyVersion,
    latencyMs: { p50: 12, p95: 20, p99: 40 },
  };
}

test('long key ARNs are shortened in the middle, so the table stays under 200 columns', (t) => {
  const status: StatusDocument = {
    keyId: 'trousseau-v1-151241c67b9c087a776ecbcd0e0ffc67939e3f73',
    partial: false,
    missing: [],
    quorum: 2,
    usable: 3,
    healthy: true,
    backends: [backend('aws-eu-west-1-primary', arn(1)), backend('aws-eu-central-1-replica', arn(2)), backend('vault', '3@1733076000')],
  };
  const table = renderStatus(status);
  const widest = Math.max(...table.split('\n').map((l) => l.length));
  t.true(widest < 200, `${widest} columns:\n${table}`);
  t.false(table.includes(arn(1)), 'the full ARN is in the table');
  t.regex(table, /arn:aws:kms:eu-west\.\.\.\S*890a1\b/);
  t.regex(table, /3@1733076000/, 'short versions are left whole');
  // The JSON form is the document itself: every ARN whole.
  t.true(JSON.stringify(status).includes(arn(1)));
});

test('middleTruncate keeps both ends and the width', (t) => {
  t.is(middleTruncate('short'), 'short');
  const long = 'a'.repeat(30) + 'MIDDLE' + 'z'.repeat(30);
  const cut = middleTruncate(long, 20);
  t.is(cut.length, 20);
  t.true(cut.startsWith('aaaa') && cut.endsWith('zzzz') && cut.includes('...'));
});

test('ALONE DECRYPTS: the answer and for how long it has held; verify renders the same cell', (t) => {
  const now = Date.now();
  const base = { backend: 'a', checkedAt: now, lastErrorAt: undefined, keyVersion: '1', retained: true };
  t.is(escrowCell({ ...base, verified: true, since: now - 18 * 60_000, stage: undefined, lastError: undefined }, now), 'yes 18m');
  t.is(escrowCell({ ...base, verified: false, since: now - 30_000, stage: 'unwrap', lastError: 'BACKEND_REJECTED' }, now), 'NO unwrap:BACKEND_REJECTED 30s');
  t.is(escrowCell(undefined, now), '-');
});
