#!/usr/bin/env node
// Boot -> SSH-ready with the QEMU backend (TCG when there is no KVM), N boots of the test image
// (busybox-static + dropbear): median and p90 of run() start -> SSH ready, the per-stage breakdown
// from the spans, and QEMU's peak RSS (VmHWM). Prints tables; asserts nothing.
//
// Usage: node bench/boot.js [boots=10]     (after scripts/setup.sh)
'use strict';
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } = require('@opentelemetry/sdk-trace-base');

const { root, main, pct } = require('./common');
const m = require(root);
const boots = Number(process.argv[2] || 10);
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'microvm-boot-bench-'));
const image = path.join(work, 'image');
execFileSync('bash', [path.join(root, 'scripts', 'make-test-image.sh'), image], { stdio: 'ignore' });
const t = (hr) => hr[0] * 1e3 + hr[1] / 1e6;

main(
  async () => {
    const totals = [];
    const rss = [];
    const stages = [
      'microvm.Preflight',
      'microvm.ImagePull',
      'microvm.RootfsClone',
      'microvm.RootfsHooks',
      'microvm.BackendPrepare',
      'microvm.NetworkStart',
      'microvm.VMSpawn',
      'microvm.PostBoot',
      'microvm.SSHWaitReady',
    ];
    const per = Object.fromEntries(stages.map((s) => [s, []]));
    const probes = [];
    let accel = '';
    for (let i = 0; i < boots; i++) {
      const exporter = new InMemorySpanExporter();
      const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
      const vm = await m.run('bench', {
        rootfsPath: image,
        backend: 'qemu',
        dataDir: path.join(work, 'data'),
        name: `b${i}`,
        tracerProvider: provider,
        initOverride: ['/usr/sbin/dropbear', '-F', '-E', '-r', '/etc/dropbear/dropbear_ed25519_host_key', '-p', '22'],
        ssh: { timeoutMs: 120000 },
      });
      const status = fs.readFileSync(`/proc/${vm.pid}/status`, 'utf8');
      rss.push(Number(/VmHWM:\s+(\d+)/.exec(status)[1]) / 1024);
      await vm.remove();
      const spans = exporter.getFinishedSpans();
      const rootSpan = spans.find((s) => s.name === 'microvm.Run');
      totals.push(t(rootSpan.endTime) - t(rootSpan.startTime));
      for (const s of stages) {
        const sp = spans.find((x) => x.name === s);
        per[s].push(t(sp.endTime) - t(sp.startTime));
      }
      probes.push(spans.find((x) => x.name === 'microvm.SSHWaitReady').attributes['ssh.probes_total']);
      accel = spans.find((x) => x.name === 'microvm.backend.ResolveRuntime').attributes['microvm.qemu.accel'];
    }
    console.log(
      `Boot -> SSH ready, QEMU backend (accel ${accel}), ${boots} boots, ${os.cpus().length} CPUs, ${os.cpus()[0].model}`,
    );
    console.log('| measure | median | p90 |');
    console.log('|---|---:|---:|');
    console.log(
      `| run() start -> SSH ready | ${(pct(totals, 0.5) / 1000).toFixed(2)} s | ${(pct(totals, 0.9) / 1000).toFixed(2)} s |`,
    );
    console.log(`| QEMU peak RSS (VmHWM) | ${pct(rss, 0.5).toFixed(0)} MiB | ${pct(rss, 0.9).toFixed(0)} MiB |`);
    console.log(`| SSH probes | ${pct(probes, 0.5)} | ${pct(probes, 0.9)} |`);
    console.log('\nPer stage (from the spans):');
    console.log('| span | median ms | p90 ms |');
    console.log('|---|---:|---:|');
    for (const s of stages)
      console.log(`| ${s} | ${pct(per[s], 0.5, s).toFixed(1)} | ${pct(per[s], 0.9, s).toFixed(1)} |`);
  },
  () => fs.rmSync(work, { recursive: true, force: true }),
);
