#!/usr/bin/env node
// A host under load (QEMU backend; TCG when there is no KVM). Prints tables; asserts nothing.
//   1. N run() at once (idle VMs, the default admission limit), for each N given: how many became
//      ready, the time each took from the burst to ready (p50/p90/max), an exec round trip
//      (`true`) on each while all run (p50/p90), and the summed RSS of every VM's processes (QEMU,
//      virtiofsd, helpers: the VM's process group). N=1 first: the baseline of the same run.
//   2. Execs in one VM, one after another: the RSS of its processes after each batch, to show
//      whether host memory grows with the work a guest does.
//   3. vCPUs under TCG: four CPU-bound execs at once in a VM with cpus 1 and with cpus 2 (each
//      QEMU vCPU is a host thread), wall time of the four, alternating, medians.
//
// Usage: node bench/load.js [sizes=8,24,40] [execs=500]     (after scripts/setup.sh)
'use strict';
const path = require('node:path');

const { setup, median, p90, pct, main, small } = require('./common');

const sizes = (process.argv[2] || (small ? '2' : '8,24,40')).split(',').map(Number);
const EXECS = Number(process.argv[3] || (small ? 20 : 500));
const STEP = Math.max(1, Math.round(EXECS / 5));
const { m, root, work, image, done } = setup('load');
const base = (extra) => ({
  rootfsPath: image,
  backend: 'qemu',
  dataDir: path.join(work, 'data'),
  idle: true,
  ...extra,
});
const fmt = (ms) => `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
const mib = (bytes) => `${(bytes / 2 ** 20).toFixed(0)} MiB`;

// The RSS of every process in a VM's process group (QEMU and its helpers): what vm.stats() reports.
const { hostStats } = require(path.join(root, 'dist', 'stats.js'));
const groupRss = (pgid) => hostStats(pgid).rssBytes;

async function burst(n) {
  const t0 = performance.now();
  const ready = [];
  const errors = new Map();
  const vms = [];
  await Promise.all(
    Array.from({ length: n }, (_, i) =>
      m.run('bench', base({ name: `l${n}-${i}` })).then(
        (vm) => {
          vms.push(vm);
          ready.push(performance.now() - t0);
        },
        (err) => errors.set(err.code ?? err.message, (errors.get(err.code ?? err.message) ?? 0) + 1),
      ),
    ),
  );
  const execs = [];
  try {
    await Promise.all(
      vms.map(async (vm) => {
        for (let k = 0; k < 3; k++) {
          const e0 = performance.now();
          const r = await vm.exec(['true']);
          if (r.exitCode !== 0) throw new Error(`exec in ${vm.name} exited ${r.exitCode}`);
          execs.push(performance.now() - e0);
        }
      }),
    );
    const rss = vms.reduce((sum, vm) => sum + groupRss(vm.pid), 0);
    return { n, ready, errors, execs, rss };
  } finally {
    await Promise.all(vms.map((vm) => vm.remove().catch(() => undefined)));
  }
}

main(async () => {
  const rows = [];
  for (const n of [1, ...sizes]) rows.push(await burst(n));
  const baseline = median(rows[0].ready, 'the baseline boot');
  console.log(
    `## VMs started at once (idle, QEMU, admission limit ${process.env.MICROVM_MAX_BOOTS ?? 'default: the cores'})\n`,
  );
  console.log(
    '| VMs | ready | errors | ready p50 | ready p90 | ready max | p50 vs one VM | exec p50 | exec p90 | RSS, all | RSS per VM |',
  );
  console.log('|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|');
  for (const r of rows) {
    const errs = [...r.errors].map(([c, k]) => `${c} x${k}`).join(', ') || '-';
    const ready = r.ready.length ? r.ready : [NaN];
    const line = r.ready.length
      ? `${fmt(median(ready, 'ready'))} | ${fmt(p90(ready, 'ready'))} | ${fmt(pct(ready, 1, 'ready'))} | ${(median(ready) / baseline).toFixed(1)}x | ${fmt(median(r.execs, 'exec'))} | ${fmt(p90(r.execs, 'exec'))}`
      : '- | - | - | - | - | -';
    console.log(
      `| ${r.n} | ${r.ready.length}/${r.n} | ${errs} | ${line} | ${mib(r.rss)} | ${mib(r.rss / Math.max(1, r.ready.length))} |`,
    );
  }
  if (rows.some((r) => r.ready.length === 0)) throw new Error('a burst had no VM ready');

  // 3. vCPUs: the same parallel work with one and with two.
  const LOOP = ['sh', '-c', `i=0; while [ $i -lt ${small ? 2000 : 20000} ]; do i=$((i+1)); done`];
  const walls = { 1: [], 2: [] };
  const cpuVms = {
    1: await m.run('bench', base({ name: 'cpu1', cpus: 1 })),
    2: await m.run('bench', base({ name: 'cpu2', cpus: 2 })),
  };
  try {
    const guestCpus = {
      1: (await cpuVms[1].exec(['nproc'])).stdout.trim(),
      2: (await cpuVms[2].exec(['nproc'])).stdout.trim(),
    };
    for (let round = 0; round < (small ? 1 : 5); round++)
      for (const n of round % 2 ? [2, 1] : [1, 2]) {
        const t0 = performance.now();
        const rs = await Promise.all([0, 1, 2, 3].map(() => cpuVms[n].exec(LOOP)));
        if (rs.some((r) => r.exitCode !== 0)) throw new Error(`a loop in the cpus ${n} VM failed`);
        walls[n].push(performance.now() - t0);
      }
    console.log('\n## Four CPU-bound execs at once in one VM, by vCPUs (TCG: one host thread per vCPU)\n');
    console.log('| cpus | guest nproc | wall p50 | vs cpus 1 |');
    console.log('|---:|---:|---:|---:|');
    const one = median(walls[1], 'cpus 1');
    for (const n of [1, 2])
      console.log(
        `| ${n} | ${guestCpus[n]} | ${fmt(median(walls[n], `cpus ${n}`))} | ${(median(walls[n]) / one).toFixed(2)}x |`,
      );
  } finally {
    await cpuVms[1].remove();
    await cpuVms[2].remove();
  }

  // 2. Host memory against the guest's work.
  const vm = await m.run('bench', base({ name: 'grow' }));
  try {
    console.log(`\n## RSS of one VM's processes (QEMU, virtiofsd) by execs done (memoryMiB ${512})\n`);
    console.log('| execs | RSS | exec p50 in the batch |');
    console.log('|---:|---:|---:|');
    console.log(`| 0 | ${mib(groupRss(vm.pid))} | - |`);
    for (let done = 0; done < EXECS;) {
      const batch = [];
      for (let k = 0; k < STEP && done < EXECS; k++, done++) {
        const e0 = performance.now();
        const r = await vm.exec(['sh', '-c', 'echo hi; ls / >/dev/null']);
        if (r.exitCode !== 0) throw new Error(`exec exited ${r.exitCode}`);
        batch.push(performance.now() - e0);
      }
      console.log(`| ${done} | ${mib(groupRss(vm.pid))} | ${fmt(median(batch, 'exec'))} |`);
    }
  } finally {
    await vm.remove();
  }
}, done);
