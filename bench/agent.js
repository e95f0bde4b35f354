#!/usr/bin/env node
// The guest agent against SSH, measured in the same run on the same image (QEMU backend; TCG when
// there is no KVM). Prints tables and ratios; asserts nothing.
//   1. run() start -> first output of an exec (`cat /proc/uptime`), N boots each, alternating: the
//      agent (no SSH server running) vs SSH (dropbear as the VM's command, run({ ssh })). The guest's
//      own uptime at the agent's hello and at the exec shows where the time goes.
//   2. exec(['true']) round trip on a running VM, 30 each; also on a VM with no SSH server running,
//      beside the guest's own cost of creating that process (its sh running /bin/true in a loop):
//      the floor under the agent's round trip.
//   3. copyIn of a 100 MB file: agent vs SFTP (ssh2 fastPut), 3 each.
//
// Usage: node bench/agent.js [boots=10]     (after scripts/setup.sh)
'use strict';
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const { setup, median, p90, main, small } = require('./common');

const boots = Number(process.argv[2] || 10);
// Fixed sizes (smaller in the smoke configuration, MICROVM_BENCH_SMALL=1).
const ROUND_TRIPS = small ? 5 : 30;
const LOOPS = small ? 20 : 200;
const COPY_MB = small ? 8 : 100;
const COPIES = small ? 1 : 3;
const { m, work, image, done } = setup('agent');
const DROPBEAR = ['/usr/sbin/dropbear', '-F', '-E', '-r', '/etc/dropbear/dropbear_ed25519_host_key', '-p', '22'];
const fmt = (ms) => `${ms.toFixed(ms < 10 ? 2 : 0)} ms`;
const base = (extra) => ({ rootfsPath: image, backend: 'qemu', dataDir: path.join(work, 'data'), ...extra });

/** An exec that must have succeeded: a failed one would measure the wrong thing. */
function ok(r, what) {
  if (r.exitCode !== 0) throw new Error(`${what} exited ${r.exitCode}: ${r.stderr}`);
  return r;
}

main(async () => {
  const agentFirst = [];
  const sshFirst = [];
  const helloUptime = [];
  const execUptime = [];
  let accel = '';
  for (let i = 0; i < boots; i++) {
    let t0 = performance.now();
    let vm = await m.run('bench', base({ name: `a${i}`, initOverride: ['/bin/sleep', '3600'] }));
    let r = ok(await vm.exec(['cat', '/proc/uptime']), 'cat /proc/uptime');
    agentFirst.push(performance.now() - t0);
    helloUptime.push(vm.agentHello.uptimeNs / 1e6);
    execUptime.push(Number(r.stdout.split(' ')[0]) * 1000);
    accel = fs.readFileSync(vm.logPath, 'utf8').includes('accel kvm') ? 'kvm' : accel;
    await vm.remove();
    t0 = performance.now();
    vm = await m.run(
      'bench',
      base({ name: `s${i}`, initOverride: DROPBEAR, ssh: { timeoutMs: 120000 }, agent: false }),
    );
    r = ok(await vm.exec('cat /proc/uptime'), 'cat /proc/uptime over SSH');
    sshFirst.push(performance.now() - t0);
    await vm.remove();
  }

  // The agent alone (no SSH server running), and what the guest itself needs per /bin/true.
  const quiet = await m.run('bench', base({ name: 'quiet', initOverride: ['/bin/sleep', '3600'] }));
  const rtQuiet = [];
  for (let i = 0; i < ROUND_TRIPS; i++) {
    const t = performance.now();
    ok(await quiet.exec(['true']), 'true');
    rtQuiet.push(performance.now() - t);
  }
  const loops = LOOPS;
  const inGuest = [];
  for (let i = 0; i < 3; i++) {
    const r = ok(
      await quiet.exec([
        'sh',
        '-c',
        `a=$(cut -d' ' -f1 /proc/uptime); i=0; while [ $i -lt ${loops} ]; do /bin/true; i=$((i+1)); done; b=$(cut -d' ' -f1 /proc/uptime); echo "$a $b"`,
      ]),
      'the /bin/true loop',
    );
    const [a, b] = r.stdout.trim().split(' ').map(Number);
    inGuest.push(((b - a) * 1000) / loops);
  }
  await quiet.remove();

  // One VM with both: round trips and copies in the same guest.
  const vm = await m.run('bench', base({ name: 'both', initOverride: DROPBEAR, ssh: { timeoutMs: 120000 } }));
  const viaSsh = (cmd) => vm.ssh.exec(cmd);
  const rtAgent = [];
  const rtSsh = [];
  for (let i = 0; i < ROUND_TRIPS; i++) {
    let t = performance.now();
    ok(await vm.exec(['true']), 'true');
    rtAgent.push(performance.now() - t);
    t = performance.now();
    ok(await viaSsh('true'), 'true over SSH');
    rtSsh.push(performance.now() - t);
  }
  const file = path.join(work, 'big');
  fs.writeFileSync(file, Buffer.alloc(COPY_MB * 2 ** 20, 0x5a));
  const cpAgent = [];
  const cpSsh = [];
  for (let i = 0; i < COPIES; i++) {
    let t = performance.now();
    await vm.copyIn(file, `/tmp/a${i}`);
    cpAgent.push(performance.now() - t);
    await vm.exec(['rm', `/tmp/a${i}`]);
    t = performance.now();
    await vm.ssh.copyTo(file, `/tmp/s${i}`);
    cpSsh.push(performance.now() - t);
    await vm.exec(['rm', `/tmp/s${i}`]);
  }
  await vm.remove();

  const mbps = (ms) => `${(COPY_MB / (ms / 1000)).toFixed(1)} MB/s`;
  const rows = [
    [
      'run() start -> first exec output (median)',
      fmt(median(agentFirst)),
      fmt(median(sshFirst)),
      median(sshFirst) / median(agentFirst),
    ],
    [
      'run() start -> first exec output (p90)',
      fmt(p90(agentFirst)),
      fmt(p90(sshFirst)),
      p90(sshFirst) / p90(agentFirst),
    ],
    [
      `exec(['true']) round trip (median of ${ROUND_TRIPS})`,
      fmt(median(rtAgent)),
      fmt(median(rtSsh)),
      median(rtSsh) / median(rtAgent),
    ],
    [
      `copyIn ${COPY_MB} MB (median of ${COPIES})`,
      mbps(median(cpAgent)),
      mbps(median(cpSsh)),
      median(cpSsh) / median(cpAgent),
    ],
  ];
  const floor = [
    [`exec(['true']), VM with no SSH (median of ${ROUND_TRIPS})`, fmt(median(rtQuiet))],
    [`the guest's sh running /bin/true (per run, ${loops} x 3)`, fmt(median(inGuest))],
  ];
  console.log(`guest agent vs SSH, QEMU backend (${accel || 'tcg'}), ${os.cpus().length} CPUs, ${boots} boots each\n`);
  console.log(`${'measure'.padEnd(44)}${'agent'.padStart(14)}${'SSH'.padStart(14)}${'SSH/agent'.padStart(11)}`);
  for (const [name, a, s, ratio] of rows)
    console.log(`${name.padEnd(44)}${a.padStart(14)}${s.padStart(14)}${`${ratio.toFixed(2)}x`.padStart(11)}`);
  console.log(`\nthe exec round trip's floor: what creating the process costs the guest itself\n`);
  for (const [name, v] of floor) console.log(`${name.padEnd(58)}${v.padStart(14)}`);
  console.log(
    `\nwhere the agent's first output goes (median): guest uptime at the agent's hello ${fmt(median(helloUptime))} (kernel + init), at the exec ${fmt(median(execUptime))}; host before the kernel and after: ${fmt(median(agentFirst) - median(execUptime))}`,
  );
}, done);
