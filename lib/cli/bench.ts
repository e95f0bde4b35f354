/** `microvm bench`: boots N VMs and prints where the time went. */

import * as fs from 'node:fs';
import { CollectingTracerProvider } from '../telemetry/collector';
import { run, type RunOptions } from '../run';
import { describeExit } from '../vm';
import { ATTR, SPAN } from '../telemetry/attributes';
import { type CommandContext, UsageError, parseStrict } from './common';

export async function cmdBench(c: CommandContext): Promise<number> {
  const { args: argv, dataDir, out } = c;
  const dash = argv.indexOf('--');
  const cmd = dash >= 0 ? argv.slice(dash + 1) : ['/bin/sh', '-c', 'echo ready'];
  const { values, positionals } = parseStrict({
    args: dash >= 0 ? argv.slice(0, dash) : argv,
    allowPositionals: true,
    options: {
      n: { type: 'string', short: 'n' },
      backend: { type: 'string' },
      'data-dir': { type: 'string' },
      json: { type: 'boolean' },
    },
  });
  if (positionals.length !== 1) throw new UsageError('bench takes one IMAGE');
  const n = values.n === undefined ? 5 : Number(values.n);
  if (!Number.isInteger(n) || n < 1 || n > 1000) throw new UsageError('-n takes a whole number 1-1000');
  const samples = new Map<string, number[]>();
  const ms = (h: [number, number]): number => h[0] * 1e3 + h[1] / 1e6;
  let used = '';
  for (let i = 0; i < n; i++) {
    const tracerProvider = new CollectingTracerProvider();
    const t0 = performance.now();
    const vm = await run(positionals[0], {
      dataDir,
      name: `bench-${process.pid}-${i}`,
      initOverride: cmd,
      backend: (values.backend ?? 'auto') as RunOptions['backend'],
      tracerProvider,
    });
    // The command's first output byte (where the backend keeps its stdout apart: QEMU), watched
    // while it runs; the wait ends with the VM.
    let firstOutput: number | undefined;
    const stdoutPath = vm.stdoutPath;
    const watch = stdoutPath
      ? setInterval(() => {
          if (firstOutput === undefined && (fs.statSync(stdoutPath, { throwIfNoEntry: false })?.size ?? 0) > 0)
            firstOutput = performance.now() - t0;
        }, 2)
      : undefined;
    const exit = await vm.wait();
    const toExit = performance.now() - t0;
    clearInterval(watch);
    if (firstOutput === undefined && stdoutPath && (fs.statSync(stdoutPath, { throwIfNoEntry: false })?.size ?? 0) > 0)
      firstOutput = toExit; // printed in the last moment before the exit
    await vm.remove();
    if (exit.reason !== 'exited' || exit.exitCode !== 0) {
      throw Object.assign(
        new Error(`bench run ${i + 1}: ${describeExit(exit)}; a benchmark of failing boots measures nothing`),
        { code: exit.error?.code ?? 'ERR_MICROVM_BENCH_RUN_FAILED' },
      );
    }
    // run() called -> the command's first output, and -> its exit (microvm.Run ends when run()
    // resolves: the agent's or SSH's readiness; the command's life goes on after).
    const add = (row: string, v: number): void => {
      samples.set(row, [...(samples.get(row) ?? []), v]);
    };
    if (firstOutput !== undefined) add("(run() to the command's first output)", firstOutput);
    add("(run() to the command's exit)", toExit);
    for (const sp of tracerProvider.finishedSpans()) {
      if (sp.name === SPAN.BACKEND_START) {
        const accel = sp.attributes[ATTR.QEMU_ACCEL];
        used = `${vm.backend}${accel ? ` (accel ${String(accel)})` : ''}`;
      }
      if (sp.name === 'microvm.preflight.Check') continue;
      const list = samples.get(sp.name) ?? [];
      list.push(ms(sp.endTime) - ms(sp.startTime));
      samples.set(sp.name, list);
    }
  }
  const pct = (xs: number[], p: number): number =>
    [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((xs.length - 1) * p))];
  const rows = [...samples.entries()].map(([name, xs]) => ({
    span: name,
    runs: xs.length,
    p50: pct(xs, 0.5),
    p90: pct(xs, 0.9),
  }));
  const text = [
    `${positionals[0]}, ${n} runs, backend ${used || (values.backend ?? 'auto')}`,
    '| span | p50 ms | p90 ms |',
    '|---|---:|---:|',
    ...rows.map((r) => `| ${r.span} | ${r.p50.toFixed(1)} | ${r.p90.toFixed(1)} |`),
  ].join('\n');
  out(rows, text);
  return 0;
}
