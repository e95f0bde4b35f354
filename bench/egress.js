#!/usr/bin/env node
// What egress policies cost (QEMU backend; TCG when there is no KVM), against 'allow', in the same
// run: an allow-list of a relayed name, and a rule the filter in QEMU enforces (a CIDR,
// native/preload/net_guard.cc). Prints a table; asserts nothing.
//   1. run() start -> resolved (the agent's hello), N boots each, alternating;
//   2. a 32 MB download from a server this script runs on the host (127.0.0.1), read by busybox nc
//      in the guest: 'allow' reaches it as 10.0.2.2 (QEMU's NAT), the allow-list as svc.test
//      (the relay, lib/network/relay.ts), the CIDR rule as 10.0.2.2 with 127.0.0.1/32 allowed (the
//      filter decides the connect; the bytes then flow as with 'allow'), N runs each, alternating.
//
// Usage: node bench/egress.js [runs=5]     (after scripts/setup.sh)
'use strict';
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { setup, median, main, small } = require('./common');

const runs = Number(process.argv[2] || 5);
const { m, work, image, done } = setup('egress');
const MB = small ? 4 : 32;

main(async () => {
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
    'cidr (filter)': { egress: { allow: [{ cidr: '127.0.0.1/32', port }] }, target: '10.0.2.2' },
  };
  const boot = Object.fromEntries(Object.keys(policies).map((k) => [k, []]));
  const rate = Object.fromEntries(Object.keys(policies).map((k) => [k, []]));
  for (let i = 0; i < runs; i++) {
    for (const [k, p] of Object.entries(policies)) {
      const t0 = performance.now();
      const vm = await m.run('bench', {
        rootfsPath: image,
        backend: 'qemu',
        dataDir: path.join(work, 'data'),
        name: `${k.replace(/[^a-z-]/g, '')}-${i}`,
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

  // 3. A guest that opens many connections to an allowed name and holds them: what the host runs
  // for them (the VM's one relay, a copier per open connection, the cap's refusals).
  const HELD = small ? 80 : 1000;
  const holder = net.createServer((c) => c.on('error', () => undefined));
  await new Promise((r) => holder.listen(0, '127.0.0.1', r));
  const hport = holder.address().port;
  const vm = await m.run('bench', {
    rootfsPath: image,
    backend: 'qemu',
    dataDir: path.join(work, 'data'),
    name: 'held',
    initOverride: ['/bin/sleep', '3600'],
    egress: { allow: [{ host: 'svc.test', port: hport, address: '127.0.0.1' }] },
  });
  await vm.exec([
    '/bin/sh',
    '-c',
    `i=0; while [ $i -lt ${HELD} ]; do (sleep 600 | nc svc.test ${hport} > /dev/null 2>&1 &); i=$((i+1)); done; sleep 2`,
  ]);
  const logFile = path.join(vm.dataDir, 'egress.log');
  const lines = () => (fs.existsSync(logFile) ? fs.readFileSync(logFile, 'utf8').split('\n').filter(Boolean) : []);
  for (let t = 0; t < 600 && lines().length < HELD - 64; t++) await new Promise((r) => setTimeout(r, 100));
  const helpers = fs
    .readdirSync('/proc')
    .filter((d) => /^\d+$/.test(d))
    .map((pid) => {
      try {
        const cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
        if (!cmd.includes(vm.dataDir)) return undefined;
        const rss = Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0) / 1024;
        // PSS: shared pages (the C++ runtime every copier maps) divided among the processes that map them.
        const pss =
          Number(/^Pss:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'))?.[1] ?? 0) / 1024;
        const kind = cmd.includes('relay.js')
          ? 'relay'
          : cmd.startsWith(`${path.sep}`) && cmd.includes('microvm-runner\0--relay-connect')
            ? 'copier'
            : undefined;
        return kind ? { kind, rss, pss } : undefined;
      } catch {
        return undefined;
      }
    })
    .filter(Boolean);
  const refused = lines().filter((l) => JSON.parse(l).ok === false).length;
  await vm.remove();
  holder.close();
  const sum = (k, f = 'rss') => helpers.filter((h) => h.kind === k).reduce((n, h) => n + h[f], 0);
  const count = (k) => helpers.filter((h) => h.kind === k).length;
  if (count('relay') !== 1) throw new Error(`expected one relay process, found ${count('relay')}`);
  const mode = execFileSync(
    'bash',
    ['-c', 'test -w /dev/kvm && grep -qE "vmx|svm" /proc/cpuinfo && echo kvm || echo tcg'],
    {
      encoding: 'utf8',
    },
  ).trim();
  console.log(`egress policies vs allow, QEMU backend (${mode}), ${os.cpus().length} CPUs, ${runs} runs each\n`);
  const names = Object.keys(policies);
  console.log(
    `| measure | ${names.join(' | ')} | ${names
      .slice(1)
      .map((n) => `${n} vs allow`)
      .join(' | ')} |`,
  );
  console.log(
    `|---|${names.map(() => '---:').join('|')}|${names
      .slice(1)
      .map(() => '---:')
      .join('|')}|`,
  );
  const b = names.map((n) => median(boot[n]));
  console.log(
    `| run() start -> resolved (median) | ${b.map((x) => `${x.toFixed(0)} ms`).join(' | ')} | ${b
      .slice(1)
      .map((x) => `${(x - b[0]).toFixed(0)} ms`)
      .join(' | ')} |`,
  );
  const r = names.map((n) => median(rate[n]));
  console.log(
    `| ${MB} MB from the host, read in the guest (median) | ${r.map((x) => `${x.toFixed(1)} MB/s`).join(' | ')} | ${r
      .slice(1)
      .map((x) => `${(((x - r[0]) / r[0]) * 100).toFixed(1)}%`)
      .join(' | ')} |`,
  );
  console.log(
    `\n${HELD} connections opened and held by the guest (allow-list, default cap): ${count('relay')} relay process (${sum('relay').toFixed(0)} MiB RSS), ${count('copier')} copier processes (${sum('copier').toFixed(0)} MiB RSS, ${sum('copier', 'pss').toFixed(0)} MiB PSS in all), ${refused} refused and logged`,
  );
}, done);
