#!/usr/bin/env node
// What an egress allow-list costs (QEMU backend; TCG when there is no KVM), against 'allow', in the
// same run. Prints a table; asserts nothing.
//   1. run() start -> resolved (the agent's hello), N boots each, alternating;
//   2. a 32 MB download from a server this script runs on the host (127.0.0.1), read by busybox nc
//      in the guest: 'allow' reaches it as 10.0.2.2 (QEMU's NAT), the allow-list as svc.test
//      (the relay, lib/network/relay.ts), N runs each, alternating.
//
// Usage: node bench/egress.js [runs=5]     (after scripts/setup.sh)
'use strict';
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const m = require(root);
const runs = Number(process.argv[2] || 5);
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'microvm-egress-bench-'));
const image = path.join(work, 'image');
execFileSync('bash', [path.join(root, 'scripts', 'make-test-image.sh'), image], { stdio: 'ignore' });
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];
const MB = 32;

(async () => {
  const payload = Buffer.alloc(MB * 1024 * 1024, 7);
  const server = net.createServer((c) => {
    c.on('error', () => undefined);
    c.end(payload);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const port = server.address().port;
  const policies = {
    allow: { egress: 'allow', target: '10.0.2.2' },
    'allow-list': { egress: { allow: [{ host: 'svc.test', port, address: '127.0.0.1' }] }, target: 'svc.test' },
  };
  const boot = { allow: [], 'allow-list': [] };
  const rate = { allow: [], 'allow-list': [] };
  for (let i = 0; i < runs; i++) {
    for (const [k, p] of Object.entries(policies)) {
      const t0 = performance.now();
      const vm = await m.run('bench', {
        rootfsPath: image,
        backend: 'qemu',
        dataDir: path.join(work, 'data'),
        name: `${k}-${i}`,
        initOverride: ['/bin/sleep', '3600'],
        egress: p.egress,
      });
      boot[k].push(performance.now() - t0);
      const t1 = performance.now();
      // busybox nc ends when its stdin does: give it one that stays open (a FIFO nobody writes).
      const r = await vm.exec([
        '/bin/sh',
        '-c',
        `mkfifo /tmp/in; sleep 600 > /tmp/in & timeout 120 nc ${p.target} ${port} < /tmp/in | wc -c; kill $!`,
      ]);
      const ms = performance.now() - t1;
      if (r.stdout.trim() !== String(payload.length)) throw new Error(`${k}: got ${r.stdout.trim()} bytes`);
      rate[k].push((MB / ms) * 1000);
      await vm.remove();
    }
  }
  server.close();
  const mode = execFileSync(
    'bash',
    ['-c', 'test -w /dev/kvm && grep -qE "vmx|svm" /proc/cpuinfo && echo kvm || echo tcg'],
    {
      encoding: 'utf8',
    },
  ).trim();
  console.log(`egress allow-list vs allow, QEMU backend (${mode}), ${os.cpus().length} CPUs, ${runs} runs each\n`);
  console.log('| measure | allow | allow-list | allow-list vs allow |');
  console.log('|---|---:|---:|---:|');
  const b0 = median(boot.allow);
  const b1 = median(boot['allow-list']);
  console.log(
    `| run() start -> resolved (median) | ${b0.toFixed(0)} ms | ${b1.toFixed(0)} ms | ${(b1 - b0).toFixed(0)} ms |`,
  );
  const r0 = median(rate.allow);
  const r1 = median(rate['allow-list']);
  console.log(
    `| ${MB} MB from the host, read in the guest (median) | ${r0.toFixed(1)} MB/s | ${r1.toFixed(1)} MB/s | ${(((r1 - r0) / r0) * 100).toFixed(1)}% |`,
  );
  fs.rmSync(work, { recursive: true, force: true });
})().catch((e) => {
  console.error(e);
  fs.rmSync(work, { recursive: true, force: true });
  process.exit(1);
});
