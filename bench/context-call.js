#!/usr/bin/env node
// Per-call overhead of a KrunContext configuration method, against the libkrun RECORDING ABI
// TEST DOUBLE with recording switched off (so the number is the binding's cost, not file I/O).
// Prints a table; the baseline (a plain JS method call doing the same validation) is measured in
// the same run.  Usage: node bench/context-call.js [iterations]   (after `npm run compile`)
'use strict';
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const { root, main, measured } = require('./common');
const m = require(root);
const { addon } = require(path.join(root, 'dist', 'native.js'));

const iterations = Number(process.argv[2] || 200000);
if (!(iterations >= 1)) throw new Error(`iterations must be a positive number, not ${process.argv[2]}`);
const doubleDir = path.join(root, '.test-artifacts', 'libkrun-recording-double');
const doublePath = path.join(doubleDir, 'libkrun.so.1');
if (!fs.existsSync(doublePath)) {
  fs.mkdirSync(doubleDir, { recursive: true });
  execFileSync('cc', [
    '-shared',
    '-fPIC',
    '-O2',
    '-fvisibility=hidden',
    '-Wl,-soname,libkrun.so.1',
    '-o',
    doublePath,
    path.join(root, 'test/fixtures/libkrun-recording-double/libkrun_recording_double.c'),
    '-ldl',
    '-lpthread',
  ]);
}
delete process.env.KRUN_DOUBLE_LOG;
delete process.env.KRUN_DOUBLE_CONTROL_DIR;
const fwDir = execFileSync('bash', [path.join(root, 'scripts/fetch-libkrunfw.sh')], { encoding: 'utf8' }).trim();

function time(label, fn) {
  for (let i = 0; i < 10000; i++) fn(i); // warm up
  const runs = [];
  for (let r = 0; r < 5; r++) {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < iterations; i++) fn(i);
    runs.push(Number(process.hrtime.bigint() - t0) / iterations);
  }
  measured(runs, label).sort((a, b) => a - b);
  return { label, ns: runs[2] };
}

main(async () => {
  const ctx = await m.KrunContext.create({ libkrunPath: doublePath, firmwarePath: path.join(fwDir, 'libkrunfw.so.5') });
  const nativeCtx = await addon().createContext(doublePath, '');
  // Baseline: a JS object whose method does the same validation and stores the result.
  const plan = require(path.join(root, 'dist', 'backends', 'libkrun', 'plan.js'));
  const baselineObj = {
    cfg: null,
    setVmConfig(c) {
      this.cfg = plan.normalizeVmConfig(c.cpus, c.memoryMiB);
      return this;
    },
  };

  const rows = [
    time('JS method, same validation (baseline)', (i) =>
      baselineObj.setVmConfig({ cpus: 1 + (i & 7), memoryMiB: 512 }),
    ),
    time('addon method only (no TS validation)', (i) => nativeCtx.setVmConfig(1 + (i & 7), 512)),
    time('KrunContext.setVmConfig (TS + addon + libkrun ABI)', (i) =>
      ctx.setVmConfig({ cpus: 1 + (i & 7), memoryMiB: 512 }),
    ),
    time('KrunContext.setPortMap([2 forwards])', () => ctx.setPortMap(['8080:80', '2222:22'])),
  ];
  ctx.free();
  nativeCtx.free();
  const base = rows[0].ns;
  console.log(`KrunContext per-call overhead, ${iterations} calls x 5 runs (median run), Node ${process.version}`);
  console.log('| call | ns/call | vs baseline |');
  console.log('|---|---:|---:|');
  for (const r of rows) console.log(`| ${r.label} | ${r.ns.toFixed(0)} | ${(r.ns / base).toFixed(2)}x |`);
});
