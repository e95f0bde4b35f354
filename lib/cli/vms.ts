/** The commands about VMs by name: `ps`, `inspect`, `port`, `logs`, `stop`, `rm`, `pause`, `unpause`, `stats`. */
import { VM_FILE, vmDir as vmDirOf, vmFile } from '../vm-dir';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { copyAppended } from '../file-tail';
import {
  GUEST_CLOCK_FILE,
  OUTPUT_TIMES_FILE,
  jsonLinesOffsetSince,
  offsetsSince,
  parseSince,
  readGuestClock,
} from '../log-times';
import { isPaused, pauseVm, resumeVm } from '../pause';
import { askGuest, hostSide, type VmStats } from '../stats';
import { connectVmAgent } from './agent-commands';
import { isRecordedProcess, readState, sweepVms, terminateRecorded } from '../state';
import {
  type CommandContext,
  UsageError,
  coded,
  table,
  vmNames,
  tailOffset,
  reportedExit,
  vmDir,
  untilInterrupted,
  signalNumber,
} from './common';

/** `microvm ps [-a] [-q]`. */
export async function cmdPs(c: CommandContext): Promise<number> {
  const { values, positional, dataDir, out } = c;
  if (positional.length) throw new UsageError('ps takes no arguments');
  // A detached --rm VM that ended by itself (nobody watched it) goes now, as run() would.
  await sweepVms(dataDir);
  const rows = vmNames(dataDir)
    .map((name) => {
      const dir = vmDirOf(dataDir, name);
      const st = readState(dir);
      const running = st ? isRecordedProcess(st) : false;
      return {
        name,
        running,
        paused: running && isPaused(dir),
        backend: st?.backend ?? null,
        pid: st?.pid ?? null,
        image: st?.image ?? null,
        ports: st?.ports ?? [],
        createdAt: st?.createdAt ?? null,
        exitCode: running ? null : reportedExit(dir),
      };
    })
    .filter((r) => values.all || r.running);
  if (values.quiet) {
    out(
      rows.map((r) => r.name),
      rows.map((r) => r.name).join('\n'),
    );
    return 0;
  }
  out(
    rows,
    table(
      ['NAME', 'STATUS', 'BACKEND', 'PID', 'PORTS', 'IMAGE'],
      rows.map((r) => [
        r.name,
        r.paused ? 'paused' : r.running ? 'running' : r.exitCode !== null ? `exited (${r.exitCode})` : 'stopped',
        r.backend ?? '',
        r.running ? String(r.pid) : '',
        r.ports.map((p) => `${p.host}->${p.guest}`).join(','),
        r.image ?? '',
      ]),
    ),
  );
  return 0;
}

/** `microvm inspect NAME...`: JSON always. */
export async function cmdInspect(c: CommandContext): Promise<number> {
  const { positional, dataDir } = c;
  if (positional.length === 0) throw new UsageError('inspect takes one or more NAMEs');
  const found: unknown[] = [];
  const missing: string[] = [];
  for (const name of positional) {
    const dir = vmDir(dataDir, name);
    const st = readState(dir);
    if (!st) {
      missing.push(name);
      continue;
    }
    const file = (f: string): string | null => (fs.existsSync(path.join(dir, f)) ? path.join(dir, f) : null);
    found.push({
      ...st,
      running: isRecordedProcess(st),
      paused: isRecordedProcess(st) && isPaused(dir),
      dataDir: dir,
      files: {
        console: file(VM_FILE.console),
        stdout: file(VM_FILE.stdout),
        stderr: file(VM_FILE.stderr),
        log: file(VM_FILE.vmm),
        egress: file(VM_FILE.egressLog),
        egressPolicy: file('egress-policy'),
        outputTimes: file(OUTPUT_TIMES_FILE),
      },
    });
  }
  process.stdout.write(`${JSON.stringify(found, null, 2)}\n`);
  if (missing.length) throw coded('ERR_MICROVM_VM_NOT_FOUND', `no VM named ${missing.join(', ')}`);
  return 0;
}

/** `microvm port NAME [GUEST]`. */
export async function cmdPort(c: CommandContext): Promise<number> {
  const { positional, dataDir, out } = c;
  if (positional.length < 1 || positional.length > 2) throw new UsageError('port takes NAME [GUEST]');
  const st = readState(vmDir(dataDir, positional[0]));
  if (!st) throw coded('ERR_MICROVM_VM_NOT_FOUND', `no VM named ${positional[0]}`);
  let ports = st.ports;
  if (positional[1] !== undefined) {
    if (!/^\d+$/.test(positional[1])) throw new UsageError(`GUEST must be a port number, not ${positional[1]}`);
    ports = ports.filter((p) => p.guest === Number(positional[1]));
    if (!ports.length)
      throw coded(
        'ERR_MICROVM_PORT_NOT_FORWARDED',
        `${positional[0]} forwards no host port to guest port ${positional[1]}`,
      );
    out(ports, ports.map((p) => `127.0.0.1:${p.host}`).join('\n'));
    return 0;
  }
  out(ports, ports.map((p) => `${p.guest} -> 127.0.0.1:${p.host}`).join('\n'));
  return 0;
}

/** `microvm logs NAME` with -f, -n, --since, --console, --network. */
export async function cmdLogs(c: CommandContext): Promise<number> {
  const { values, positional, dataDir } = c;
  if (positional.length !== 1) throw new UsageError('logs takes one NAME');
  const dir = vmDir(dataDir, positional[0]);
  if (!fs.existsSync(vmFile(dir, 'console')) && !fs.existsSync(vmFile(dir, 'stdout')))
    throw coded('ERR_MICROVM_VM_NOT_FOUND', `no VM named ${positional[0]}`);
  let tail: number | undefined;
  if (values.tail !== undefined) {
    if (!/^\d+$/.test(String(values.tail)))
      throw new UsageError(`--tail takes a number of lines, not ${JSON.stringify(values.tail)}`);
    tail = Number(values.tail);
  }
  if (values.console && values.network) throw new UsageError('logs: --console or --network, not both');
  let since: number | undefined;
  if (values.since !== undefined) {
    since = parseSince(String(values.since));
    if (since === undefined)
      throw new UsageError(
        `--since takes a time (2026-12-03T14:00:00Z), Unix seconds or a duration back (10m, 1h30m), not ${JSON.stringify(values.since)}`,
      );
  }
  // The command's stdout and stderr where the backend kept them apart (QEMU), else the console.
  const separate = !values.console && fs.existsSync(vmFile(dir, 'stdout'));
  const streams: { file: string; offset: number; out: NodeJS.WritableStream }[] = values.network
    ? [{ file: vmFile(dir, 'egressLog'), offset: 0, out: process.stdout }]
    : separate
      ? [
          { file: vmFile(dir, 'stdout'), offset: 0, out: process.stdout },
          { file: vmFile(dir, 'stderr'), offset: 0, out: process.stderr },
        ]
      : [{ file: vmFile(dir, 'console'), offset: 0, out: process.stdout }];
  if (since !== undefined) {
    if (values.network) streams[0].offset = jsonLinesOffsetSince(streams[0].file, since);
    else {
      // Chunk times exist for the command's own stdout and stderr on the QEMU backend.
      const zero = readGuestClock(path.join(dir, GUEST_CLOCK_FILE));
      const times = path.join(dir, OUTPUT_TIMES_FILE);
      if (!separate || zero === undefined || !fs.existsSync(times))
        throw coded(
          'ERR_MICROVM_LOG_TIMES',
          `${positional[0]} has no arrival times for ${separate ? 'its output' : 'the console'}: --since works on the command's stdout and stderr of VMs the QEMU backend started`,
        );
      const size = (f: string): number => (fs.existsSync(f) ? fs.statSync(f).size : 0);
      const offsets = offsetsSince(times, zero, since, [size(streams[0].file), size(streams[1].file)]);
      streams[0].offset = offsets[0];
      streams[1].offset = offsets[1];
    }
  }
  // -n with --since: the last N lines of what is that recent.
  if (tail !== undefined) for (const st of streams) st.offset = Math.max(st.offset, tailOffset(st.file, tail));
  // Streamed in pieces, waiting for the terminal or pipe to take each: constant memory.
  const pump = async (): Promise<void> => {
    for (const st of streams) st.offset = await copyAppended(st.file, st.offset, st.out);
  };
  await pump();
  for (; values.follow; await new Promise((r) => setTimeout(r, 200))) await pump();
  return 0;
}

/** `microvm stop NAME...` and `microvm rm [-f] NAME...` (command says which). */
export async function cmdStopOrRm(c: CommandContext): Promise<number> {
  const { command, values, positional, dataDir, json, out } = c;
  if (positional.length === 0) throw new UsageError(`${command} takes one or more NAMEs`);
  let timeoutMs = 5000;
  if (values.time !== undefined) {
    if (!/^\d+$/.test(String(values.time)) || Number(values.time) > 3600)
      throw new UsageError(`-t takes whole seconds 0-3600, not ${JSON.stringify(values.time)}`);
    timeoutMs = Number(values.time) * 1000;
  }
  const results: { name: string; stopped: boolean; removed?: boolean }[] = [];
  const failed: string[] = [];
  for (const name of positional) {
    const dir = vmDir(dataDir, name);
    try {
      if (!fs.existsSync(dir)) throw coded('ERR_MICROVM_VM_NOT_FOUND', `no VM named ${name}`);
      if (command === 'rm') {
        const st = readState(dir);
        if (st && isRecordedProcess(st) && !values.force)
          throw coded('ERR_MICROVM_VM_RUNNING', `${name} is running; stop it first or use rm -f`);
      }
      const stopped = await terminateRecorded(dir, timeoutMs);
      if (command === 'rm') fs.rmSync(dir, { recursive: true, force: true });
      results.push(command === 'rm' ? { name, stopped, removed: true } : { name, stopped });
      if (!json) process.stdout.write(`${name}\n`);
    } catch (err) {
      const e = err as Error & { code?: string };
      failed.push(name);
      if (!json) process.stderr.write(`microvm: [${e.code ?? 'ERR_MICROVM_USAGE'}] ${e.message}\n`);
      else
        results.push({
          name,
          stopped: false,
          ...(command === 'rm' ? { removed: false } : {}),
          error: { code: e.code, message: e.message },
        } as never);
    }
  }
  if (json) out(results, '');
  return failed.length ? 1 : 0;
}

/** `microvm pause NAME...` and `microvm unpause NAME...`: through each VM's control socket (QEMU). */
export async function cmdPauseOrUnpause(c: CommandContext): Promise<number> {
  const { command, positional, dataDir, json, out } = c;
  if (positional.length === 0) throw new UsageError(`${command} takes one or more NAMEs`);
  const results: { name: string; paused: boolean; error?: { code?: string; message: string } }[] = [];
  for (const name of positional) {
    const dir = vmDir(dataDir, name);
    try {
      const st = readState(dir);
      if (!st || !isRecordedProcess(st)) throw coded('ERR_MICROVM_VM_NOT_FOUND', `no running VM named ${name}`);
      const vm = { name, backend: st.backend, dir, controlSocket: st.controlSocket };
      await (command === 'pause' ? pauseVm(vm) : resumeVm(vm));
      results.push({ name, paused: command === 'pause' });
      if (!json) process.stdout.write(`${name}\n`);
    } catch (err) {
      const e = err as Error & { code?: string };
      results.push({ name, paused: isPaused(dir), error: { code: e.code, message: e.message } });
      if (!json) process.stderr.write(`microvm: [${e.code ?? 'ERR_MICROVM_USAGE'}] ${e.message}\n`);
    }
  }
  if (json) out(results, '');
  return results.some((r) => r.error) ? 1 : 0;
}

/** One sample of a VM for `microvm stats`. */
interface StatsSample {
  name: string;
  at: number;
  stats: VmStats;
}

async function sampleVm(dataDir: string, name: string): Promise<StatsSample | undefined> {
  const dir = vmDir(dataDir, name);
  const st = readState(dir);
  if (!st || !isRecordedProcess(st)) return undefined;
  const stats: VmStats = hostSide(st.pid, dir);
  if (!isPaused(dir)) {
    const agent = await connectVmAgent(dir, st.agentAcceptsLate === true).catch(() => undefined);
    if (agent) {
      try {
        const guest = await askGuest(agent);
        if (guest) stats.guest = guest;
      } catch {
        /* no guest view this time */
      } finally {
        agent.close();
      }
    }
  }
  return { name, at: performance.now(), stats };
}

const bytes = (n: number): string =>
  n >= 2 ** 30
    ? `${(n / 2 ** 30).toFixed(2)} GiB`
    : n >= 2 ** 20
      ? `${(n / 2 ** 20).toFixed(1)} MiB`
      : `${(n / 1024).toFixed(0)} KiB`;

/** `microvm stats [NAME...] [--no-stream]`: like `docker stats`, every running VM by default. */
export async function cmdStats(c: CommandContext): Promise<number> {
  const { values, positional, dataDir, json, out } = c;
  const names = (): string[] => (positional.length ? positional : vmNames(dataDir));
  for (const name of positional)
    if (!fs.existsSync(vmDir(dataDir, name))) throw coded('ERR_MICROVM_VM_NOT_FOUND', `no VM named ${name}`);
  const sampleAll = async (): Promise<Map<string, StatsSample>> => {
    const all = await Promise.all(names().map((n) => sampleVm(dataDir, n)));
    return new Map(all.filter((x): x is StatsSample => x !== undefined).map((x) => [x.name, x]));
  };
  const rows = (before: Map<string, StatsSample>, now: Map<string, StatsSample>) =>
    [...now.values()].map((s) => {
      const prev = before.get(s.name);
      const cpuPercent =
        prev && s.at > prev.at
          ? ((s.stats.host.cpuSeconds - prev.stats.host.cpuSeconds) / ((s.at - prev.at) / 1000)) * 100
          : 0;
      return { name: s.name, cpuPercent: Math.max(0, Math.round(cpuPercent * 10) / 10), ...s.stats };
    });
  const render = (r: ReturnType<typeof rows>): string =>
    table(
      ['NAME', 'CPU %', 'MEM (HOST)', 'GUEST MEM', 'DISK', 'NET RX / TX', 'PIDS'],
      r.map((x) => [
        x.name,
        x.cpuPercent.toFixed(1),
        bytes(x.host.rssBytes),
        x.guest ? `${bytes(x.guest.memoryUsedBytes)} / ${bytes(x.guest.memoryTotalBytes)}` : '-',
        bytes(x.disk.usedBytes),
        x.guest ? `${bytes(x.guest.rxBytes)} / ${bytes(x.guest.txBytes)}` : '-',
        String(x.host.processes),
      ]),
    );
  let before = await sampleAll();
  if (values['no-stream'] || json) {
    await new Promise((r) => setTimeout(r, 1000)); // CPU % is a rate: two samples a second apart
    const r = rows(before, await sampleAll());
    out(r, render(r));
    return 0;
  }
  const ended = await untilInterrupted(async (signal) => {
    while (!signal.aborted) {
      await new Promise((r) => setTimeout(r, 1000));
      const now = await sampleAll();
      const text = render(rows(before, now));
      process.stdout.write(process.stdout.isTTY ? `\x1b[H\x1b[2J${text}\n` : `${text}\n\n`);
      before = now;
    }
  });
  return 'interrupted' in ended ? 128 + signalNumber(ended.interrupted) : 0;
}
