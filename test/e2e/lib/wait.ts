/**
 * Waiting for conditions. The suite never asserts an elapsed time: it waits for what
 * the apiserver and the plugin are documented to do, with bounds far above the
 * documented delays (the apiserver polls a KMS v2 plugin's Status once a minute while
 * healthy, caches a healthy check for 20 s), so that a slow, loaded machine only makes
 * the run longer.
 */
import { setTimeout as sleep } from 'node:timers/promises';

export { sleep };

export class WaitTimeout extends Error {}

/**
 * Calls `check` until it returns something other than undefined or false, and returns
 * that. On timeout throws, quoting the last value `describe` gave (what was seen).
 */
export async function waitFor<T>(
  what: string,
  check: () => Promise<T | undefined | false>,
  options: { timeoutMs: number; intervalMs?: number; describe?: () => string },
): Promise<T> {
  const deadline = Date.now() + options.timeoutMs;
  let lastError: unknown;
  for (;;) {
    try {
      const result = await check();
      if (result !== undefined && result !== false) return result;
      lastError = undefined;
    } catch (error) {
      lastError = error;
    }
    if (Date.now() >= deadline) {
      const seen = options.describe?.() ?? (lastError instanceof Error ? lastError.message : '');
      throw new WaitTimeout(`timed out after ${Math.round(options.timeoutMs / 1000)} s waiting for ${what}${seen ? `; last seen: ${seen}` : ''}`);
    }
    await sleep(options.intervalMs ?? 500);
  }
}

/** Runs `work` on every item with at most `limit` running at once; results in order. */
export async function inParallel<T, R>(items: readonly T[], limit: number, work: (item: T, index: number) => Promise<R>): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  const worker = async () => {
    for (let i = next++; i < items.length; i = next++) results[i] = await work(items[i]!, i);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}
