/**
 * Every script in bench/ runs against today's API in its smoke configuration (a few seconds each:
 * tiny counts, MICROVM_BENCH_SMALL=1), exits 0 and prints its table; a stale bench fails here the
 * day it breaks. The numbers are not checked (speed is the benches' business, not the tests').
 * And a bench that measured nothing, or whose run failed, exits 1 saying so.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { packageRoot } from '../lib/native';
import { qemuSkipReason, scratch } from './helpers';

const bench = path.join(packageRoot, 'bench');
// eslint-disable-next-line @typescript-eslint/no-require-imports -- the benches' own CommonJS helpers
const common = require(path.join(bench, 'common.js')) as {
  measured: (xs: unknown, label?: string) => number[];
  median: (xs: number[], label?: string) => number;
  p90: (xs: number[], label?: string) => number;
};

const qemu = qemuSkipReason();
const libkrunDouble = fs.existsSync(path.join(process.env.MICROVM_TEST_LIBKRUN_DOUBLE_DIR ?? '', 'libkrun.so.1'))
  ? undefined
  : 'the libkrun recording double was not built';

/** [script, smoke arguments, why it cannot run here (undefined: it can)] */
const BENCHES: [string, string[], string | undefined][] = [
  ['context-call.js', ['2000'], libkrunDouble],
  ['pipeline.js', ['2', '200', '1'], libkrunDouble],
  ['ssh-ready.js', ['2'], undefined],
  ['pull.js', ['1'], undefined],
  ['boot.js', ['1'], qemu],
  ['failures.js', ['1'], qemu],
  ['output.js', ['1'], qemu],
  ['egress.js', ['1'], qemu],
  ['agent.js', ['1'], qemu],
  ['load.js', ['2', '10'], qemu],
];

test('every bench script is covered here', () => {
  const scripts = fs.readdirSync(bench).filter((f) => f.endsWith('.js') && f !== 'common.js');
  expect(scripts.sort()).toEqual(BENCHES.map(([f]) => f).sort());
});

describe.each(BENCHES)('bench/%s', (file, args, skip) => {
  (skip ? test.skip : test)(
    `runs in its smoke configuration, exits 0 and prints a table${skip ? ` [skipped: ${skip}]` : ''}`,
    () => {
      const s = scratch('microvm-bench-test-');
      try {
        const r = spawnSync(process.execPath, [path.join(bench, file), ...args], {
          cwd: s.dir,
          encoding: 'utf8',
          timeout: 170_000,
          env: {
            ...process.env,
            MICROVM_BENCH_SMALL: '1',
            MICROVM_DATA_DIR: path.join(s.dir, 'data'),
            MICROVM_LIBKRUNFW_DIR: process.env.MICROVM_TEST_LIBKRUNFW_DIR,
          },
        });
        expect({ status: r.status, signal: r.signal, stderr: r.status === 0 ? '' : r.stderr }).toEqual({
          status: 0,
          signal: null,
          stderr: '',
        });
        // A table: markdown rows, or the padded columns some benches print.
        expect(r.stdout).toMatch(/^\|.*\|$|\s\d+(\.\d+)? (ms|MB\/s|s|MiB)\b/m);
        expect(r.stdout).not.toMatch(/\bNaN\b|\bundefined\b|Infinity/);
      } finally {
        s.cleanup();
      }
    },
    180_000,
  );
});

describe('a bench that measured nothing or failed', () => {
  test('has no statistic of no samples, or of a sample that is not a number', () => {
    expect(() => common.median([], 'boots')).toThrow('measured nothing for boots');
    expect(() => common.p90([1, Number.NaN], 'exec')).toThrow('a sample of exec is not a number: NaN');
    expect(common.median([3, 1, 2])).toBe(2);
    expect(common.p90([...Array(10).keys()].map((i) => i + 1))).toBe(9);
  });

  test('exits 1 with the reason (main)', () => {
    const r = spawnSync(
      process.execPath,
      [
        '-e',
        `const c = require(${JSON.stringify(path.join(bench, 'common.js'))}); let cleaned = false; process.on('exit', () => console.log('cleaned', cleaned)); c.main(async () => { c.median([], 'the boots'); }, () => { cleaned = true; });`,
      ],
      { encoding: 'utf8' },
    );
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('FAILED: Error: measured nothing for the boots');
    expect(r.stdout).toBe('cleaned true\n');
  });
});
