/**
 * What a VM costs and uses right now (`vm.stats()`, `microvm stats`): the host side from /proc
 * (every process of the VM's process group: the hypervisor and its helpers), the VM directory's
 * disk usage, and the guest's own view (memory, load, network) read through the agent. The guest's
 * answer is hostile input: it is read with a size cap and parsed field by field, never trusted to
 * have any line or to be a number.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { AgentClient } from './agent/client';
import { execBuffered } from './agent/exec';

/** x86-64 Linux: /proc counts CPU time in USER_HZ (100 per second) and memory in 4 KiB pages. */
const USER_HZ = 100;
const PAGE_BYTES = 4096;
/** At most this many entries are counted under a VM directory (a guest can make many files). */
const MAX_DIR_ENTRIES = 1_000_000;

export interface HostStats {
  /** CPU time (user + system) of the VM's processes so far, in seconds. */
  cpuSeconds: number;
  /** Their resident memory together, in bytes (guest memory QEMU touched counts here). */
  rssBytes: number;
  /** How many processes: the hypervisor and its helpers (file servers, relays). */
  processes: number;
}

export interface GuestStats {
  memoryTotalBytes: number;
  memoryUsedBytes: number;
  memoryAvailableBytes: number;
  /** The guest's 1-minute load average. */
  load1: number;
  /** The guest's network counters, all interfaces but loopback together. */
  rxBytes: number;
  txBytes: number;
}

export interface VmStats {
  host: HostStats;
  disk: {
    /** Bytes the VM's directory takes on the host (its root's changes, logs, sockets). */
    usedBytes: number;
    /** The bound on what the guest may write, when there is one (none yet: null). */
    limitBytes: number | null;
  };
  /** The guest's view; undefined when the VM has no agent to ask (or it did not answer). */
  guest?: GuestStats;
}

/**
 * The processes of process group `pgid` from /proc (the hypervisor leads its VM's group).
 * `procRoot` is for tests.
 */
export function hostStats(pgid: number, procRoot = '/proc'): HostStats {
  const out: HostStats = { cpuSeconds: 0, rssBytes: 0, processes: 0 };
  for (const name of fs.readdirSync(procRoot)) {
    if (!/^\d+$/.test(name)) continue;
    let stat: string;
    try {
      stat = fs.readFileSync(path.join(procRoot, name, 'stat'), 'utf8');
    } catch {
      continue; // gone meanwhile
    }
    // pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses, so count after the last ')'.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (Number(f[2]) !== pgid) continue;
    out.processes += 1;
    out.cpuSeconds += (Number(f[11]) + Number(f[12])) / USER_HZ; // utime, stime
    out.rssBytes += Number(f[21]) * PAGE_BYTES;
  }
  return out;
}

/** Bytes allocated under `dir` (st_blocks, links not followed), counting at most `maxEntries` entries. */
export function dirUsage(dir: string, maxEntries = MAX_DIR_ENTRIES): number {
  let bytes = 0;
  let seen = 0;
  const stack = [dir];
  while (stack.length > 0 && seen < maxEntries) {
    const d = stack.pop() as string;
    let entries: fs.Dirent[];
    try {
      entries = fs.readdirSync(d, { withFileTypes: true });
    } catch {
      continue; // unreadable (a guest-owned directory as non-root) or gone
    }
    for (const e of entries) {
      if (++seen > maxEntries) break;
      const p = path.join(d, e.name);
      try {
        bytes += fs.lstatSync(p).blocks * 512;
      } catch {
        continue;
      }
      if (e.isDirectory()) stack.push(p);
    }
  }
  return bytes;
}

/** The guest command that prints what {@link parseGuestStats} reads. */
export const GUEST_STATS_COMMAND = ['cat', '/proc/meminfo', '/proc/loadavg', '/proc/net/dev'];
/** The most of its output that is read. */
export const GUEST_STATS_MAX_BYTES = 64 * 1024;

function count(text: string | undefined): number | undefined {
  if (text === undefined || !/^\d{1,19}$/.test(text)) return undefined;
  const n = Number(text);
  return Number.isSafeInteger(n) ? n : undefined;
}

/**
 * The guest's stats from its /proc/meminfo, /proc/loadavg and /proc/net/dev printed one after
 * another; undefined when a field it needs is missing or not a plain number.
 */
export function parseGuestStats(text: string): GuestStats | undefined {
  const kib = (key: string): number | undefined => {
    const m = new RegExp(`^${key}:\\s+(\\d{1,16}) kB$`, 'm').exec(text);
    const n = count(m?.[1]);
    return n === undefined ? undefined : n * 1024;
  };
  const total = kib('MemTotal');
  const available = kib('MemAvailable');
  const load = /^(\d{1,6}\.\d{2}) \d{1,6}\.\d{2} \d{1,6}\.\d{2} \d+\/\d+ \d+$/m.exec(text);
  if (total === undefined || available === undefined || !load || available > total) return undefined;
  let rx = 0;
  let tx = 0;
  // "  eth0: rxbytes rxpackets ... (8 fields) txbytes ..."
  for (const m of text.matchAll(/^\s*([A-Za-z0-9_.-]{1,15}):\s*((?:\d{1,19}\s+){15}\d{1,19})\s*$/gm)) {
    if (m[1] === 'lo') continue;
    const f = m[2].trim().split(/\s+/);
    rx += count(f[0]) ?? 0;
    tx += count(f[8]) ?? 0;
  }
  return {
    memoryTotalBytes: total,
    memoryAvailableBytes: available,
    memoryUsedBytes: total - available,
    load1: Number(load[1]),
    rxBytes: rx,
    txBytes: tx,
  };
}

/** The host side of a VM's stats: its process group `pgid` and its directory `dir`. */
export function hostSide(pgid: number, dir: string): Pick<VmStats, 'host' | 'disk'> {
  return { host: hostStats(pgid), disk: { usedBytes: dirUsage(dir), limitBytes: null } };
}

/** Asks the guest through its agent; undefined when the command fails or its answer does not parse. */
export async function askGuest(agent: AgentClient): Promise<GuestStats | undefined> {
  const r = await execBuffered(agent, GUEST_STATS_COMMAND, { maxBuffer: GUEST_STATS_MAX_BYTES, timeoutMs: 5000 });
  return r.exitCode === 0 ? parseGuestStats(r.stdout) : undefined;
}
