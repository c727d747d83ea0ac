/**
 * Start-up scenario (`npm run bench -- --scenario startup [--runs N]`): from spawning
 * `trousseau serve` to the socket answering v2 Status, and to Status saying healthz
 * "ok" (every backend probed once), in the dev configuration (three local backends)
 * and with one backend of each type against the real test servers (plugin-process.ts).
 *
 * Each configuration is started N times (default 5) with a warm compile cache
 * (TROUSSEAU_COMPILE_CACHE; the first, untimed start fills it) and N times without
 * one, interleaved. Reported: median and max wall time, and the plugin's CPU
 * time to the first answer, which depends less on what else the machine runs.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { startPluginProcess, unavailable, type PluginConfiguration } from './plugin-process.ts';
import { loadAverage } from './process-stats.ts';

const median = (values: number[]) => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid]! : Math.round((sorted[mid - 1]! + sorted[mid]!) / 2);
};

interface Run {
  firstAnswerMs: number;
  healthyMs: number;
  cpuToFirstAnswerMs: number;
}

async function startOnce(configuration: PluginConfiguration, compileCache: string | undefined): Promise<Run> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'trousseau-startup-'));
  try {
    const plugin = await startPluginProcess(dir, configuration, { compileCache });
    await plugin.stop();
    return { firstAnswerMs: plugin.firstAnswerMs, healthyMs: plugin.healthyMs, cpuToFirstAnswerMs: plugin.cpuToFirstAnswerMs };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

const summary = (runs: Run[]) => ({
  firstAnswerMs: { median: median(runs.map((r) => r.firstAnswerMs)), max: Math.max(...runs.map((r) => r.firstAnswerMs)) },
  healthyMs: { median: median(runs.map((r) => r.healthyMs)), max: Math.max(...runs.map((r) => r.healthyMs)) },
  cpuToFirstAnswerMs: { median: median(runs.map((r) => r.cpuToFirstAnswerMs)), max: Math.max(...runs.map((r) => r.cpuToFirstAnswerMs)) },
  runs,
});

export async function runStartup(options: { runs?: number | undefined } = {}): Promise<Record<string, unknown>> {
  const runs = options.runs ?? 5;
  const result: Record<string, unknown> = { load: loadAverage(), runs };
  const cache = await mkdtemp(path.join(os.tmpdir(), 'trousseau-compile-cache-'));
  try {
    for (const configuration of ['dev', 'all'] as const) {
      const missing = unavailable(configuration);
      if (missing) {
        console.error(`startup ${configuration}: skipped (${missing})`);
        result[configuration] = { skipped: missing };
        continue;
      }
      await startOnce(configuration, cache); // fills the compile cache, untimed
      const warm: Run[] = [];
      const cold: Run[] = [];
      for (let i = 0; i < runs; i++) {
        warm.push(await startOnce(configuration, cache));
        cold.push(await startOnce(configuration, undefined));
      }
      result[configuration] = { withCompileCache: summary(warm), withoutCompileCache: summary(cold), load: loadAverage() };
      const line = (name: string, s: ReturnType<typeof summary>) =>
        `${name}: Status answers after median ${s.firstAnswerMs.median} ms (max ${s.firstAnswerMs.max}), healthy after ${s.healthyMs.median} ms (max ${s.healthyMs.max}), plugin CPU to first answer ${s.cpuToFirstAnswerMs.median} ms`;
      console.error(`startup ${configuration}, ${line('compile cache', summary(warm))}; ${line('no cache', summary(cold))} (load ${loadAverage()})`);
    }
  } finally {
    await rm(cache, { recursive: true, force: true });
  }
  result.loadAtEnd = loadAverage();
  return result;
}
