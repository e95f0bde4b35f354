/**
 * Context lifetime: contexts are freed by free(), by garbage collection, and when the Node
 * environment that created them ends (worker exit); the addon loads and unloads in worker threads.
 */
import { execFileSync } from 'node:child_process';
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import { packageRoot } from '../lib/native';
import { doublePath, firmwarePath, readCalls, recordCalls, scratch } from './helpers';

function runWorker(code: string): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const w = new Worker(code, { eval: true });
    let message: unknown;
    w.on('message', (m) => (message = m));
    w.on('error', reject);
    w.on('exit', (exitCode) =>
      exitCode === 0 ? resolve(message) : reject(new Error(`worker exited with ${exitCode}`)),
    );
  });
}

const workerCode = (holdOpen: boolean): string => `
  const { parentPort } = require('node:worker_threads');
  const m = require(${JSON.stringify(packageRoot)});
  (async () => {
    const ctx = await m.KrunContext.create({ libkrunPath: ${JSON.stringify(doublePath())}, firmwarePath: ${JSON.stringify(firmwarePath())} });
    ctx.setRoot('/worker-root');
    globalThis.keep = ctx; // still referenced when the worker ends
    parentPort.postMessage(ctx.id);
    if (!${holdOpen}) ctx.free();
  })().catch((e) => { console.error(e); process.exit(1); });`;

describe('contexts and worker threads', () => {
  let rec: ReturnType<typeof recordCalls>;
  beforeEach(() => {
    rec = recordCalls();
  });
  afterEach(() => rec.done());

  test('a context still alive when its worker exits is freed by the environment cleanup hook', async () => {
    const id = (await runWorker(workerCode(true))) as number;
    const frees = rec.calls().filter((c) => c.fn === 'krun_free_ctx' && c.args.ctx === id);
    expect(frees).toHaveLength(1);
    expect(frees[0].ret).toBe(0);
  });

  test('the addon loads and unloads in several workers at once, and contexts are freed once each', async () => {
    const ids = (await Promise.all([
      runWorker(workerCode(false)),
      runWorker(workerCode(true)),
      runWorker(workerCode(false)),
    ])) as number[];
    // Run it again: the addon is loaded anew in new environments.
    ids.push((await runWorker(workerCode(true))) as number);
    const created = rec.calls().filter((c) => c.fn === 'krun_create_ctx');
    const freed = rec.calls().filter((c) => c.fn === 'krun_free_ctx');
    expect(created).toHaveLength(4);
    expect(freed).toHaveLength(4);
    expect(freed.every((c) => c.ret === 0)).toBe(true);
  });
});

describe('garbage collection', () => {
  test('an unreachable context is freed by its finalizer', () => {
    const s = scratch();
    try {
      const log = path.join(s.dir, 'calls.jsonl');
      const script = `
        const m = require(${JSON.stringify(packageRoot)});
        (async () => {
          let ctx = await m.KrunContext.create({ libkrunPath: ${JSON.stringify(doublePath())}, firmwarePath: ${JSON.stringify(firmwarePath())} });
          const id = ctx.id;
          ctx = null;
          for (let i = 0; i < 10; i++) { global.gc(); await new Promise((r) => setImmediate(r)); }
          console.log(id);
          // A marker call: a free recorded before it came from the finalizer, not from exit.
          const marker = await m.KrunContext.create({ libkrunPath: ${JSON.stringify(doublePath())} });
          marker.free();
        })();`;
      const out = execFileSync(process.execPath, ['--expose-gc', '-e', script], {
        env: { ...process.env, KRUN_DOUBLE_LOG: log },
        encoding: 'utf8',
      });
      const id = Number(out.trim());
      const calls = readCalls(log);
      const freeIndex = calls.findIndex((c) => c.fn === 'krun_free_ctx' && c.args.ctx === id);
      const markerIndex = calls.findIndex((c, i) => i > 0 && c.fn === 'krun_create_ctx');
      expect(freeIndex).toBeGreaterThan(0);
      expect(markerIndex).toBeGreaterThan(freeIndex);
    } finally {
      s.cleanup();
    }
  });
});
