#!/usr/bin/env node
// How fast a failing VM becomes a coded error (or, for the automatic fallback, the command's
// output), for each failure form the QEMU backend watches, next to a plain TCG boot measured in
// the same run as the baseline. N runs per form; prints a table. Each form must end the way it
// should (its code): a form that ends otherwise fails the bench (exit 1), as the numbers would
// then measure something else.
//
//   node bench/failures.js [runs=3]       (after scripts/setup.sh)
//
// Forms: a KVM start that dies at once and one that pauses the guest (the QEMU wrappers in
// test/fixtures/qemu-wrappers, on a fake host tree that looks like hardware KVM, so on any host;
// and the real thing on a PVM /dev/kvm, else skipped), a guest never started (-S) against a 3 s
// boot deadline, a pause through QMP after run() resolved, and 'auto' on a host that looks like
// hardware KVM whose KVM start dies (-> TCG).
'use strict';
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const { root, main, median } = require('./common');

const m = require(root);
const runs = Number(process.argv[2] || 3);
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'microvm-fail-bench-'));
const image = path.join(work, 'image');
execFileSync('bash', [path.join(root, 'scripts', 'make-test-image.sh'), image], { stdio: 'ignore' });
process.env.MICROVM_LIBKRUNFW_DIR ??= execFileSync('bash', [path.join(root, 'scripts', 'fetch-libkrunfw.sh')], {
  encoding: 'utf8',
}).trim();
const wrappers = path.join(root, 'test', 'fixtures', 'qemu-wrappers');
const dying = path.join(wrappers, 'kvm-dies');
const pausing = path.join(wrappers, 'kvm-pauses');
const host = path.join(work, 'host');
for (const d of ['dev', 'proc/sys/kernel/random', 'sys/module/kvm_intel'])
  fs.mkdirSync(path.join(host, d), { recursive: true });
fs.writeFileSync(path.join(host, 'proc/cpuinfo'), 'processor\t: 0\nflags\t\t: fpu vmx sse2\n');
fs.symlinkSync('/dev/null', path.join(host, 'dev/kvm'));
const hostProbe = {
  kvmDevice: path.join(host, 'dev/kvm'),
  cpuinfo: path.join(host, 'proc/cpuinfo'),
  sysModule: path.join(host, 'sys/module'),
  bootId: path.join(host, 'proc/sys/kernel/random/boot_id'),
};
let n = 0;
const base = (extra) => ({
  rootfsPath: image,
  dataDir: path.join(work, 'data'),
  name: `f${n++}`,
  initOverride: ['/bin/sh', '-c', 'echo out; exit 0'],
  ...extra,
});

/** ms from run() to the coded error (a resolved run counts as a miss). */
async function toError(options) {
  const t0 = performance.now();
  try {
    const vm = await m.run('bench', base(options));
    await vm.remove();
    return { ms: NaN, code: 'resolved (no error)' };
  } catch (e) {
    return { ms: performance.now() - t0, code: e.code };
  }
}

/** ms from run() to the end of the guest command (wait() resolved). */
async function toOutput(options) {
  const t0 = performance.now();
  const vm = await m.run('bench', base(options));
  const exit = await vm.wait();
  const ms = performance.now() - t0;
  await vm.remove();
  return { ms, code: exit.reason === 'exited' ? `exit ${exit.exitCode}` : (exit.error?.code ?? exit.reason) };
}

/** ms from a QMP `stop` sent after run() resolved to wait() saying so. */
async function pausedAfterStart() {
  const sock = path.join(work, `qmp-${n}.sock`);
  const vm = await m.run(
    'bench',
    base({
      backend: m.qemuBackend({ extraArgs: ['-qmp', `unix:${sock},server=on,wait=off`] }),
      initOverride: ['/bin/sh', '-c', 'sleep 600'],
    }),
  );
  const c = net.createConnection(sock);
  c.on('error', () => undefined);
  const t0 = performance.now();
  c.write('{"execute":"qmp_capabilities"}\n{"execute":"stop"}\n');
  const exit = await vm.wait();
  const ms = performance.now() - t0;
  c.destroy();
  await vm.remove();
  return { ms, code: exit.error?.code ?? exit.reason };
}

main(
  async () => {
    const pvm = m.probeKvm().kind === 'pvm';
    // [form, expected outcome, run] (run undefined: skipped on this host)
    const forms = [
      ['baseline: TCG boot, command output', 'exit 0', () => toOutput({ backend: 'qemu', accel: 'tcg' })],
      [
        'KVM start dies at once (wrapper: MSR + SIGABRT)',
        'ERR_MICROVM_BOOT_FAILED',
        () => toError({ backend: m.qemuBackend({ qemuPath: dying, accel: 'kvm', hostProbe }) }),
      ],
      [
        'KVM start pauses the guest (wrapper: an early QMP stop)',
        'ERR_MICROVM_BOOT_FAILED',
        () => toError({ backend: m.qemuBackend({ qemuPath: pausing, accel: 'kvm', hostProbe }) }),
      ],
      [
        "this host's PVM, accel kvm (dies or pauses, by host)",
        'ERR_MICROVM_BOOT_FAILED',
        pvm ? () => toError({ backend: 'qemu', accel: 'kvm' }) : undefined,
      ],
      [
        'guest never started (-S), boot deadline 3000 ms',
        'ERR_MICROVM_BOOT_TIMEOUT',
        () => toError({ backend: m.qemuBackend({ extraArgs: ['-S'] }), timeouts: { boot: 3000 } }),
      ],
      ['paused through QMP after run() resolved (stop -> wait())', 'ERR_MICROVM_HYPERVISOR_FAILED', pausedAfterStart],
      [
        "'auto' fallback: KVM dies -> TCG, command output",
        'exit 0',
        () => {
          fs.writeFileSync(hostProbe.bootId, `${require('node:crypto').randomUUID()}\n`); // a fresh "host boot": no verdict yet
          return toOutput({ backend: m.qemuBackend({ qemuPath: dying, hostProbe }) });
        },
      ],
    ];
    const rows = [];
    for (const [name, expected, fn] of forms) {
      if (!fn) {
        rows.push([name, 'skipped (/dev/kvm here is not PVM)', '', '']);
        continue;
      }
      const samples = [];
      let code = '';
      for (let i = 0; i < runs; i++) {
        const r = await fn();
        if (r.code !== expected) throw new Error(`${name}: expected ${expected}, got ${r.code}`);
        samples.push(r.ms);
        code = r.code;
      }
      rows.push([
        name,
        code,
        median(samples, name).toFixed(0),
        `${Math.min(...samples).toFixed(0)}-${Math.max(...samples).toFixed(0)}`,
      ]);
    }
    const baseline = Number(rows[0][2]);
    console.log(
      `Failure -> coded error (QEMU backend), ${runs} runs per form, ${os.cpus().length} CPUs, /dev/kvm: ${m.probeKvm().kind}`,
    );
    console.log('| form | outcome | median ms | range ms | vs TCG boot |');
    console.log('|---|---|---:|---:|---:|');
    for (const [name, code, med, range] of rows)
      console.log(
        `| ${name} | ${code} | ${med} | ${range} | ${med ? `${(Number(med) / baseline).toFixed(2)}x` : ''} |`,
      );
  },
  () => fs.rmSync(work, { recursive: true, force: true }),
);
