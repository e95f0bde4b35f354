/**
 * VM stats (lib/stats.ts, `vm.stats()`, `microvm stats`): the guest's answer parsed as hostile
 * input, the host's view of a process group and a directory, then a real QEMU VM measured from
 * the library and from the CLI.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { run } from '../lib';
import { dirUsage, hostStats, parseGuestStats } from '../lib/stats';
import { qemuRunArgs, qemuSkipReason, runCli, scratch } from './helpers';

process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;
const layout = process.env.MICROVM_TEST_LAYOUT;
const skip = qemuSkipReason();
const cliSkip = skip ?? (layout ? undefined : 'no test layout (MICROVM_TEST_LAYOUT)');

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-stats-');
});
afterEach(() => s.cleanup());

const MEMINFO = 'MemTotal:         492000 kB\nMemFree:          400000 kB\nMemAvailable:     450000 kB\n';
const LOADAVG = '0.25 0.10 0.03 1/45 123\n';
const NETDEV =
  'Inter-|   Receive                                                |  Transmit\n' +
  ' face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n' +
  '    lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0\n' +
  '  eth0:    5000      20    0    0    0     0          0         0     7000      30    0    0    0     0       0          0\n';

describe('the guest answer', () => {
  test('meminfo, loadavg and net/dev: memory, load and the counters of every interface but lo', () => {
    expect(parseGuestStats(MEMINFO + LOADAVG + NETDEV)).toEqual({
      memoryTotalBytes: 492000 * 1024,
      memoryAvailableBytes: 450000 * 1024,
      memoryUsedBytes: 42000 * 1024,
      load1: 0.25,
      rxBytes: 5000,
      txBytes: 7000,
    });
  });

  test('hostile answers: a missing or garbled field, impossible memory, huge numbers give nothing', () => {
    expect(parseGuestStats(LOADAVG + NETDEV)).toBeUndefined();
    expect(parseGuestStats(MEMINFO + NETDEV)).toBeUndefined();
    expect(parseGuestStats(MEMINFO.replace('450000', '-5') + LOADAVG)).toBeUndefined();
    expect(parseGuestStats(MEMINFO.replace('450000', '999999') + LOADAVG)).toBeUndefined(); // available > total
    expect(parseGuestStats(MEMINFO.replace('492000', '1'.repeat(40)) + LOADAVG)).toBeUndefined();
    expect(parseGuestStats(MEMINFO + 'NaN 0.1 0.1 1/1 1\n')).toBeUndefined();
    // A counter too large to be exact is left out, not guessed.
    const big = NETDEV.replace('  eth0:    5000', `  eth0:    ${'9'.repeat(19)}`);
    expect(parseGuestStats(MEMINFO + LOADAVG + big)?.rxBytes).toBe(0);
    expect(parseGuestStats('')).toBeUndefined();
    // Anchored, whole fields only: a prefix, a suffix or a longer number does not count.
    expect(parseGuestStats(MEMINFO.replace('MemTotal', 'XMemTotal') + LOADAVG)).toBeUndefined();
    expect(parseGuestStats(MEMINFO.replace('450000 kB', '450000 kBx') + LOADAVG)).toBeUndefined();
    expect(parseGuestStats(MEMINFO + 'x' + LOADAVG)).toBeUndefined();
    expect(parseGuestStats(MEMINFO + LOADAVG.replace('\n', ' x\n'))).toBeUndefined();
    expect(parseGuestStats(MEMINFO + '1234567.00 0.10 0.03 1/45 123\n')).toBeUndefined();
    expect(parseGuestStats(MEMINFO + '0.25 1234567.00 0.03 1/45 123\n')).toBeUndefined();
    expect(parseGuestStats(MEMINFO + '0.25 0.10 1234567.00 1/45 123\n')).toBeUndefined();
    expect(parseGuestStats(MEMINFO + '123456.25 12.10 0.03 1/45 123\n')?.load1).toBe(123456.25);
    // All memory available (an idle guest rounding): used 0, not refused.
    expect(parseGuestStats(MEMINFO.replace('450000', '492000') + LOADAVG)?.memoryUsedBytes).toBe(0);
    // A net/dev line needs all 16 counters, whole; a prefix before the name or a cut line is skipped.
    const short = NETDEV.replace(
      '  eth0:    5000      20    0    0    0     0          0         0     7000      30    0    0    0     0       0          0',
      '  eth0:    5000      20    0    0    0     0          0         0     7000      30    0    0    0     0       0',
    );
    expect(parseGuestStats(MEMINFO + LOADAVG + short)).toMatchObject({ rxBytes: 0, txBytes: 0 });
    expect(parseGuestStats(MEMINFO + LOADAVG + NETDEV.replace('  eth0:', 'x eth0:'))).toMatchObject({ rxBytes: 0 });
    expect(parseGuestStats(MEMINFO + LOADAVG + NETDEV.replace(/(eth0:.*)\n/, '$1x\n'))).toMatchObject({
      rxBytes: 0,
    });
    expect(parseGuestStats(MEMINFO + LOADAVG + NETDEV.replace('eth0:    5000', 'eth0:    5a00'))).toMatchObject({
      rxBytes: 0,
    });
    // Two interfaces add up.
    const two =
      NETDEV +
      '  eth1:      10       1    0    0    0     0          0         0       20       2    0    0    0     0       0          0\n';
    expect(parseGuestStats(MEMINFO + LOADAVG + two)).toMatchObject({ rxBytes: 5010, txBytes: 7020 });
  });
});

/** A /proc entry's stat line: pid (comm) state ppid pgrp ... utime(14) stime(15) ... rss(24). */
function statLine(pid: number, comm: string, pgrp: number, utime: number, stime: number, rssPages: number): string {
  const f = Array.from({ length: 50 }, () => '0');
  f[0] = 'S';
  f[1] = '1';
  f[2] = String(pgrp);
  f[11] = String(utime);
  f[12] = String(stime);
  f[21] = String(rssPages);
  return `${pid} (${comm}) ${f.join(' ')}\n`;
}

describe('the host side', () => {
  test('a fake /proc: only numeric entries of the group count; a comm with spaces and parentheses is read right', () => {
    const proc = path.join(s.dir, 'proc');
    const entry = (name: string, text: string): void => {
      fs.mkdirSync(path.join(proc, name), { recursive: true });
      fs.writeFileSync(path.join(proc, name, 'stat'), text);
    };
    entry('100', statLine(100, 'qemu-system-x86', 100, 250, 50, 1000));
    entry('101', statLine(101, 'virtiofsd ) (x', 100, 100, 0, 24));
    entry('102', statLine(102, 'other', 7, 9999, 9999, 9999)); // another group
    entry('self', statLine(100, 'qemu-system-x86', 100, 1, 1, 1)); // not a pid
    entry('1000x', statLine(100, 'qemu-system-x86', 100, 1, 1, 1));
    fs.mkdirSync(path.join(proc, '103')); // gone meanwhile: no stat
    expect(hostStats(100, proc)).toEqual({ cpuSeconds: 4, rssBytes: 1024 * 4096, processes: 2 });
    expect(hostStats(5, proc)).toEqual({ cpuSeconds: 0, rssBytes: 0, processes: 0 });
  });

  test('a directory: at most maxEntries entries are counted', () => {
    const d = path.join(s.dir, 'many');
    fs.mkdirSync(d);
    for (const n of ['a', 'b', 'c']) fs.writeFileSync(path.join(d, n), Buffer.alloc(64 * 1024, 1));
    const all = dirUsage(d);
    expect(all).toBeGreaterThanOrEqual(3 * 64 * 1024);
    expect(dirUsage(d, 3)).toBe(all);
    expect(dirUsage(d, 2)).toBe((all / 3) * 2);
    expect(dirUsage(path.join(s.dir, 'missing'))).toBe(0);
  });

  test("a process group's processes, CPU and memory; a directory's allocated bytes", async () => {
    const child = spawn('/bin/sh', ['-c', 'sleep 30 & sleep 30 & wait'], { detached: true, stdio: 'ignore' });
    try {
      await new Promise((r) => setTimeout(r, 300));
      const h = hostStats(child.pid as number);
      expect(h.processes).toBe(3);
      expect(h.rssBytes).toBeGreaterThan(0);
      expect(h.cpuSeconds).toBeGreaterThanOrEqual(0);
      expect(hostStats(2 ** 22 + 12345).processes).toBe(0);
    } finally {
      process.kill(-(child.pid as number), 'SIGKILL');
    }
    fs.mkdirSync(path.join(s.dir, 'a', 'b'), { recursive: true });
    fs.writeFileSync(path.join(s.dir, 'a', 'b', 'f'), Buffer.alloc(1 << 20, 1));
    fs.symlinkSync('/usr', path.join(s.dir, 'a', 'link')); // counted, never followed
    const used = dirUsage(s.dir);
    expect(used).toBeGreaterThanOrEqual(1 << 20);
    expect(used).toBeLessThan(4 << 20);
  });
});

(skip ? describe.skip : describe)(`vm.stats() on QEMU${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  test('host processes and memory, the guest memory it was given, disk growing with what the guest writes', async () => {
    const vm = await run('test-image', {
      rootfsPath: process.env.MICROVM_TEST_IMAGE,
      dataDir: path.join(s.dir, 'data'),
      backend: 'qemu',
      idle: true,
      memoryMiB: 256,
    });
    try {
      const a = await vm.stats();
      expect(a.host.processes).toBeGreaterThanOrEqual(2); // QEMU and the root's virtiofsd
      expect(a.host.rssBytes).toBeGreaterThan(16 << 20);
      expect(a.guest?.memoryTotalBytes).toBeGreaterThan(128 << 20);
      expect(a.guest?.memoryTotalBytes).toBeLessThanOrEqual(256 << 20);
      expect(a.disk.limitBytes).toBeNull();
      await vm.exec(['dd', 'if=/dev/zero', 'of=/var/fill', 'bs=1M', 'count=8']);
      const b = await vm.stats();
      expect(b.disk.usedBytes - a.disk.usedBytes).toBeGreaterThanOrEqual(8 << 20);
      expect(b.host.cpuSeconds).toBeGreaterThanOrEqual(a.host.cpuSeconds);
      await vm.pause();
      const c = await vm.stats();
      expect(c.guest).toBeUndefined(); // not asked while paused
      expect(c.host.processes).toBe(a.host.processes);
      await vm.resume();
      await vm.stop();
      await expect(vm.stats()).rejects.toMatchObject({ code: 'ERR_MICROVM_VM_NOT_RUNNING' });
    } finally {
      await vm.remove();
    }
  }, 120_000);
});

(cliSkip ? describe.skip : describe)(`microvm stats${cliSkip ? ` [skipped: ${cliSkip}]` : ''}`, () => {
  test('--no-stream --json lists every running VM with its numbers; an unknown name is refused', () => {
    expect(runCli([...qemuRunArgs(layout, s.dir), '--name', 'st1', '-d', '--idle'])).toMatchObject({ code: 0 });
    try {
      const r = runCli(['stats', '--no-stream', '--json', '--data-dir', s.dir]);
      expect(r.code).toBe(0);
      const rows = JSON.parse(r.stdout) as { name: string; cpuPercent: number; host: { processes: number } }[];
      expect(rows.map((x) => x.name)).toEqual(['st1']);
      expect(rows[0].host.processes).toBeGreaterThanOrEqual(2);
      expect(rows[0].cpuPercent).toBeGreaterThanOrEqual(0);
      const text = runCli(['stats', 'st1', '--no-stream', '--data-dir', s.dir]);
      expect(text.stdout).toMatch(/^NAME\s+CPU %\s+MEM \(HOST\)\s+GUEST MEM\s+DISK\s+NET RX \/ TX\s+PIDS\nst1\s/);
      expect(runCli(['stats', 'nope', '--no-stream', '--data-dir', s.dir]).stderr).toContain(
        'ERR_MICROVM_VM_NOT_FOUND',
      );
    } finally {
      runCli(['rm', '-f', 'st1', '--data-dir', s.dir]);
    }
  }, 180_000);
});
