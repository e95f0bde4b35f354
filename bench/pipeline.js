#!/usr/bin/env node
// Startup pipeline benchmark over the libkrun RECORDING ABI TEST DOUBLE (no KVM here), on a
// generated rootfs tree. Prints tables; a failed run or nothing measured fails it (exit 1).
//
//   1. run() start -> VMSpawn done (runner configured), warm (image already unpacked), N runs,
//      per clone strategy, with the per-stage breakdown from the spans;
//   2. RootfsClone vs `cp -a` of the same tree, measured in the same run (interleaved with the copy
//      strategy's clones, each on a synced disk; the copy strategy uses the native engine), and
//      `cp -a` into a directory with FS_TOPDIR_FL, as the native copy makes its own;
//   3. tracing cost: SDK + in-memory exporter, and the CLI's own collector, vs no provider (runs
//      interleaved in rotating order), and the no-op cost per span.
//
// Usage: node bench/pipeline.js [runs=20] [files=20000] [fileKiB=15]     (after `npm run compile`
// and a test run, which builds the double)
'use strict';
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { trace } = require('@opentelemetry/api');
const {
  BasicTracerProvider,
  BatchSpanProcessor,
  InMemorySpanExporter,
  SimpleSpanProcessor,
} = require('@opentelemetry/sdk-trace-base');

const { root, main, pct } = require('./common');

const m = require(root);
const { CollectingTracerProvider } = require(path.join(root, 'dist', 'telemetry', 'collector.js'));
const native = require(path.join(root, 'dist', 'native.js'));
const runs = Number(process.argv[2] || 20);
const files = Number(process.argv[3] || 20000);
const fileKiB = Number(process.argv[4] || 15);

const doubleDir = path.join(root, '.test-artifacts', 'libkrun-recording-double');
if (!fs.existsSync(path.join(doubleDir, 'libkrun.so.1'))) {
  console.error('Build the libkrun double first: bash scripts/test.sh (or npx jest)');
  process.exit(1);
}
const fwDir = execFileSync('bash', [path.join(root, 'scripts/fetch-libkrunfw.sh')], { encoding: 'utf8' }).trim();
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'microvm-bench-'));
const ms = (t) => Number(t) / 1e6;

function makeTree(dir) {
  const chunk = Buffer.alloc(fileKiB * 1024, 7);
  for (let i = 0; i < files; i++) {
    const d = path.join(dir, `d${i % 200}`, `e${i % 7}`);
    if (i < 1400) fs.mkdirSync(d, { recursive: true });
    fs.writeFileSync(path.join(d, `f${i}`), chunk);
  }
  fs.mkdirSync(path.join(dir, 'etc'), { recursive: true });
  fs.writeFileSync(path.join(dir, 'etc', 'passwd'), 'root:x:0:0:root:/root:/bin/sh\n');
}

function backend() {
  return m.libkrunBackend({
    runtime: { libDir: doubleDir, pkgConfig: false, systemDirs: [], loaderSearch: false },
    firmware: { dir: fwDir, systemDirs: [], loaderSearch: false },
    env: { PATH: process.env.PATH },
  });
}

async function timedRun(image, strategy, provider) {
  const exporter = provider ? provider._exporter : undefined;
  const t0 = process.hrtime.bigint();
  const vm = await m.run('bench', {
    rootfsPath: image,
    dataDir: path.join(work, 'data'),
    initOverride: ['/bin/true'],
    preflight: [],
    // The double runs no guest here: measure up to VMSpawn (the runner configured), no agent wait.
    agent: false,
    cloneStrategies: [strategy],
    backend: backend(),
    tracerProvider: provider ? provider.p : undefined,
  });
  const total = ms(process.hrtime.bigint() - t0);
  const spans = exporter ? exporter.getFinishedSpans() : [];
  exporter?.reset();
  await vm.remove();
  return { total, spans };
}

main(
  async () => {
    const image = path.join(work, 'image');
    console.log(`Generating ${files} files x ${fileKiB} KiB ...`);
    makeTree(image);
    execFileSync('sync'); // start every measurement with no dirty pages from the generator
    const bytes = Number(execFileSync('du', ['-sb', image], { encoding: 'utf8' }).split('\t')[0]);

    // 2. cp -a baseline, interleaved with the copy strategy's clones below (a copy's time on this
    // kind of disk depends on what the filesystem has cached and still has to write: each side gets
    // the same state, a synced disk and no copy left over).
    const cpRuns = [];
    const cpTopRuns = [];
    const cpOnce = () => {
      const cpDest = path.join(work, 'cp-a');
      execFileSync('sync');
      const tcp = process.hrtime.bigint();
      execFileSync('cp', ['-a', image, cpDest]);
      cpRuns.push(ms(process.hrtime.bigint() - tcp));
      fs.rmSync(cpDest, { recursive: true, force: true });
      execFileSync('sync');
      // The same into a directory with FS_TOPDIR_FL, as the native copy makes its top directory:
      // what the threads add beyond where the inodes go.
      const t1 = process.hrtime.bigint();
      fs.mkdirSync(cpDest);
      native.addon().markTopDirectory(cpDest);
      execFileSync('cp', ['-a', `${image}/.`, cpDest]);
      cpTopRuns.push(ms(process.hrtime.bigint() - t1));
      fs.rmSync(cpDest, { recursive: true, force: true });
      execFileSync('sync');
    };

    const exporter = new InMemorySpanExporter();
    const p = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
    const sdk = { p, _exporter: exporter };
    const stages = [
      'microvm.Preflight',
      'microvm.ImagePull',
      'microvm.RootfsClone',
      'microvm.RootfsHooks',
      'microvm.BackendPrepare',
      'microvm.NetworkStart',
      'microvm.VMSpawn',
    ];
    const results = {};
    for (const strategy of ['overlay', 'copy']) {
      const n = strategy === 'copy' ? Math.min(3, runs) : runs;
      const totals = [];
      const perStage = Object.fromEntries(stages.map((s) => [s, []]));
      for (let i = 0; i < n; i++) {
        if (strategy === 'copy') cpOnce();
        const { spans } = await timedRun(image, strategy, sdk);
        if (strategy === 'copy') execFileSync('sync');
        const rootSpan = spans.find((s) => s.name === 'microvm.Run');
        const spawn = spans.find((s) => s.name === 'microvm.VMSpawn');
        const t = (hr) => hr[0] * 1e3 + hr[1] / 1e6;
        totals.push(t(spawn.endTime) - t(rootSpan.startTime));
        for (const s of stages)
          perStage[s].push(t(spans.find((x) => x.name === s).endTime) - t(spans.find((x) => x.name === s).startTime));
      }
      results[strategy] = { n, totals, perStage };
    }

    console.log(
      `\nTree: ${files} files, ${(bytes / 1e6).toFixed(0)} MB. Node ${process.version}, ${os.cpus().length} CPUs.`,
    );
    console.log('\n1. run() start -> VMSpawn done (runner configured), warm image');
    console.log('| strategy | runs | median ms | p90 ms |');
    console.log('|---|---:|---:|---:|');
    for (const [k, r] of Object.entries(results))
      console.log(`| ${k} | ${r.n} | ${pct(r.totals, 0.5).toFixed(1)} | ${pct(r.totals, 0.9).toFixed(1)} |`);
    console.log('\n   per stage, median ms (overlay):');
    console.log('| stage | ms |');
    console.log('|---|---:|');
    for (const s of stages) console.log(`| ${s} | ${pct(results.overlay.perStage[s], 0.5).toFixed(2)} |`);

    console.log('\n2. RootfsClone vs cp -a (same tree, same run)');
    console.log('| method | ms | vs cp -a |');
    console.log('|---|---:|---:|');
    const cpMs = pct(cpRuns, 0.5);
    console.log(
      `| cp -a (baseline, median of ${cpRuns.length}, interleaved with the copy clones) | ${cpMs.toFixed(0)} | 1.000 |`,
    );
    const cpTop = pct(cpTopRuns, 0.5);
    console.log(
      `| cp -a into a directory with FS_TOPDIR_FL (chattr +T) | ${cpTop.toFixed(0)} | ${(cpTop / cpMs).toFixed(4)} |`,
    );
    for (const k of ['overlay', 'copy']) {
      const c = pct(results[k].perStage['microvm.RootfsClone'], 0.5);
      console.log(`| RootfsClone ${k} | ${c.toFixed(1)} | ${(c / cpMs).toFixed(4)} |`);
    }

    // 3. Tracing cost on the overlay pipeline (interleaved runs), and per span.
    const batchExporter = new InMemorySpanExporter();
    const batch = {
      p: new BasicTracerProvider({ spanProcessors: [new BatchSpanProcessor(batchExporter)] }),
      _exporter: batchExporter,
    };
    const collector = { p: new CollectingTracerProvider() };
    const modes = { none: [], simple: [], batch: [], collector: [] };
    const providers = { none: undefined, simple: sdk, batch, collector };
    const order = Object.keys(modes);
    for (let i = 0; i < runs * 2; i++) {
      // Each mode goes first, second, ... in turn: what one run leaves behind (a timer, garbage)
      // weighs on each mode alike.
      for (let j = 0; j < order.length; j++) {
        const k = order[(i + j) % order.length];
        modes[k].push((await timedRun(image, 'overlay', providers[k])).total);
        if (k === 'collector') collector.p.reset();
      }
    }
    const perSpan = (proc) => {
      const e = new InMemorySpanExporter();
      const t = new BasicTracerProvider({ spanProcessors: [proc(e)] }).getTracer('x');
      for (let i = 0; i < 2000; i++) t.startSpan('w').end();
      const n = 20000;
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < n; i++) {
        t.startSpan('s', { attributes: { a: 1 } }).end();
        if (i % 1000 === 0) e.reset();
      }
      return Number(process.hrtime.bigint() - t0) / n;
    };
    trace.disable();
    const tracer = trace.getTracer('bench');
    const N = 1e6;
    const t3 = process.hrtime.bigint();
    for (let i = 0; i < N; i++) tracer.startSpan('x').end();
    const noopNs = Number(process.hrtime.bigint() - t3) / N;
    const a = pct(modes.none, 0.5);
    const spansPerRun = 13; // microvm.Run and its stages on this path (no preflight checks, no PostBoot hooks)
    console.log(`\n3. Tracing cost (overlay pipeline, run() total, ${runs * 2} interleaved runs each)`);
    console.log('| mode | median ms | vs none | SDK cost per span |');
    console.log('|---|---:|---:|---:|');
    console.log(`| no provider (baseline) | ${a.toFixed(2)} | - | ${noopNs.toFixed(0)} ns (no-op) |`);
    for (const [label, key, proc] of [
      ['SDK, SimpleSpanProcessor + in-memory', 'simple', (e) => new SimpleSpanProcessor(e)],
      ['SDK, BatchSpanProcessor + in-memory', 'batch', (e) => new BatchSpanProcessor(e)],
      ["the CLI's collector (lib/telemetry/collector.ts)", 'collector', undefined],
    ]) {
      const b = pct(modes[key], 0.5);
      const each = proc ? `${(perSpan(proc) / 1000).toFixed(1)} µs x ${spansPerRun} spans` : '-';
      console.log(`| ${label} | ${b.toFixed(2)} | ${(((b - a) / a) * 100).toFixed(1)}% | ${each} |`);
    }
  },
  () => fs.rmSync(work, { recursive: true, force: true }),
);
