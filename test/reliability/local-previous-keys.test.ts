/**
 * previousKeyFiles that cannot be read (issue 10, item 15). A copy naming a key
 * version this backend does not hold is a copy it cannot open: BACKEND_REJECTED, so
 * the engine tries the next copy and the breaker stays closed; never an outage. The
 * failure is cached: per call no file is read (a file that appears is seen at the
 * next reload, the health probe), and it is logged once.
 */
import { chmod, copyFile, rename } from 'node:fs/promises';
import path from 'node:path';
import test from 'ava';
import { generateKeyFile } from '../../src/backends/local.ts';
import { probeBackend } from '../../src/engine/health-probe.ts';
import { tempDir } from '../helpers/plugin-harness.ts';
import { guardedLocal, never } from '../helpers/local-keys.ts';

const context = { envelopeId: Buffer.alloc(16, 3), backendName: 'a' };

for (const problem of ['missing', 'mode 644'] as const) {
  test(`a ${problem} previousKeyFiles entry: unknown versions are rejected copies, no breaker trip, no disk read per call`, async (t) => {
    const dir = await tempDir(t);
    const current = path.join(dir, 'current.key');
    const old = path.join(dir, 'old.key');
    const stash = path.join(dir, 'stash.key');
    await generateKeyFile(current);
    const oldVersion = await generateKeyFile(stash);
    // A copy made under the old key, to open once the file is back.
    const maker = guardedLocal('a', stash);
    const copy = await maker.backend.wrap(Buffer.alloc(32, 9), context);
    if (problem === 'mode 644') {
      await copyFile(stash, old);
      await chmod(old, 0o644);
    }

    const { guarded, metrics, log } = guardedLocal('a', current, [old]);
    t.true((await probeBackend(guarded, never)).ok, 'the backend itself is healthy');
    for (let i = 0; i < 20; i++) {
      await t.throwsAsync(guarded.unwrap(copy.wrapped, oldVersion, context, never), { code: 'BACKEND_REJECTED' } as never);
      await t.throwsAsync(guarded.unwrap(copy.wrapped, 'ffffffffffffffff', context, never), { code: 'BACKEND_REJECTED' } as never);
    }
    t.is(guarded.health().breaker, 'closed');
    const outcomes = await metrics.registry.getSingleMetricAsString('trousseau_backend_requests_total');
    t.regex(outcomes, /operation="unwrap",outcome="rejected"} 40/);
    t.notRegex(outcomes, /outcome="unavailable"/);
    t.is(log.lines().filter((l) => l.level === 'error').length, 1, 'the unreadable file is logged once');

    // The file becomes readable: no unwrap reads it (the failure is cached) ...
    if (problem === 'mode 644') await chmod(old, 0o600);
    else await rename(stash, old);
    await t.throwsAsync(guarded.unwrap(copy.wrapped, oldVersion, context, never), { code: 'BACKEND_REJECTED' } as never);
    // ... the next reload (health probe) does, and the old copy opens.
    t.true((await probeBackend(guarded, never)).ok);
    t.deepEqual(Buffer.from(await guarded.unwrap(copy.wrapped, oldVersion, context, never)), Buffer.alloc(32, 9));
  });
}
