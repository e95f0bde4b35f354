/**
 * Preflight checks run by microvm.preflight.RunAll (one microvm.preflight.Check span each).
 * A required check that fails stops run() with ERR_MICROVM_PREFLIGHT, listing every failure and
 * its remediation; an advisory one is recorded on its span and logged.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { type HostProbePaths, probeKvm } from '../host/kvm';
import { userNamespacesAvailable } from '../rootfs/clone';

/** A check's outcome: `ok: false` with what is wrong and how to fix it. */
export interface CheckResult {
  ok: boolean;
  message?: string;
  remediation?: string;
}

/** One preflight check. */
export interface PreflightCheck {
  name: string;
  description: string;
  /** Required checks stop the run when they fail; others are advisory. */
  required: boolean;
  run(signal?: AbortSignal): Promise<CheckResult> | CheckResult;
}

/**
 * Hardware KVM: /dev/kvm opens read-write AND the CPU has vmx/svm (a PVM or other software
 * /dev/kvm fails it, with the reason). `probe` is a device path or the probe's paths (tests).
 */
export function kvmCheck(probe: string | HostProbePaths = {}): PreflightCheck {
  const paths = typeof probe === 'string' ? { kvmDevice: probe } : probe;
  return {
    name: 'kvm',
    description: 'hardware KVM is usable',
    required: true,
    run() {
      const r = probeKvm(paths);
      return r.hardware
        ? { ok: true, message: r.reason }
        : {
            ok: false,
            message: r.reason,
            remediation: `${r.remediation ?? ''} Or use backend 'qemu' (runs without KVM).`.trim(),
          };
    },
  };
}

/** Free disk space in a directory (advisory). */
export function diskSpaceCheck(dir: string, minBytes = 1024 ** 3): PreflightCheck {
  return {
    name: 'disk-space',
    description: `at least ${Math.round(minBytes / 1024 ** 2)} MiB free in ${dir}`,
    required: false,
    run() {
      try {
        // The data dir may not exist yet: measure the filesystem it will be created on.
        let at = dir;
        while (!fs.existsSync(at) && at !== '/') at = path.dirname(at);
        const s = fs.statfsSync(at);
        const free = s.bavail * s.bsize;
        return free >= minBytes
          ? { ok: true }
          : {
              ok: false,
              message: `only ${Math.round(free / 1024 ** 2)} MiB free in ${dir}`,
              remediation: 'Free space or choose another dataDir.',
            };
      } catch (err) {
        return { ok: false, message: `cannot stat ${dir}: ${(err as Error).message}` };
      }
    },
  };
}

/**
 * Requested memory is at most the host's physical memory (required: QEMU would otherwise allocate
 * a memfd of that size and stall). Override by passing your own `preflight` list.
 */
export function memoryCheck(memoryMiB: number, hostBytes = os.totalmem()): PreflightCheck {
  const hostMiB = Math.floor(hostBytes / 1024 ** 2);
  return {
    name: 'memory',
    description: `${memoryMiB} MiB of guest memory fit the host's ${hostMiB} MiB`,
    required: true,
    run() {
      return memoryMiB <= hostMiB
        ? { ok: true }
        : {
            ok: false,
            message: `${memoryMiB} MiB of guest memory requested, the host has ${hostMiB} MiB of physical memory`,
            remediation: `Lower memoryMiB (--memory) to at most ${hostMiB}; to start it anyway, pass your own preflight checks.`,
          };
    },
  };
}

/** Requested CPUs and memory fit the host (advisory). */
export function resourcesCheck(cpus: number, memoryMiB: number): PreflightCheck {
  return {
    name: 'resources',
    description: `${cpus} vCPU(s) and ${memoryMiB} MiB fit this host`,
    required: false,
    run() {
      const hostCpus = os.availableParallelism?.() ?? os.cpus().length;
      const freeMiB = Math.floor(os.freemem() / 1024 ** 2);
      const problems: string[] = [];
      if (cpus > hostCpus) problems.push(`${cpus} vCPUs requested, host has ${hostCpus}`);
      if (memoryMiB > freeMiB) problems.push(`${memoryMiB} MiB requested, ${freeMiB} MiB free`);
      return problems.length
        ? { ok: false, message: problems.join('; '), remediation: 'Lower cpus or memoryMiB.' }
        : { ok: true };
    },
  };
}

function holderOf(port: number): string | undefined {
  // /proc/net/tcp lists listening sockets with inode numbers; map them to a process via /proc/*/fd.
  try {
    const hex = port.toString(16).toUpperCase().padStart(4, '0');
    const inodes = new Set<string>();
    for (const file of ['/proc/net/tcp', '/proc/net/tcp6']) {
      for (const line of fs.readFileSync(file, 'utf8').split('\n').slice(1)) {
        const f = line.trim().split(/\s+/);
        if (f.length > 9 && f[1].endsWith(`:${hex}`) && f[3] === '0A') inodes.add(f[9]);
      }
    }
    for (const pid of fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
      try {
        for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
          const link = fs.readlinkSync(`/proc/${pid}/fd/${fd}`);
          const m = /^socket:\[(\d+)\]$/.exec(link);
          if (m && inodes.has(m[1])) return `${fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim()} (pid ${pid})`;
        }
      } catch {
        /* not ours to read */
      }
    }
  } catch {
    /* no /proc */
  }
  return undefined;
}

/** The host ports to forward are free on 127.0.0.1. */
export function portsCheck(ports: readonly number[]): PreflightCheck {
  return {
    name: 'ports',
    description: `host ports ${ports.join(', ') || '(none)'} are free`,
    required: true,
    async run() {
      const busy: string[] = [];
      for (const port of ports) {
        const free = await new Promise<boolean>((resolve) => {
          const srv = net.createServer();
          srv.once('error', () => resolve(false));
          srv.listen({ port, host: '127.0.0.1', exclusive: true }, () => srv.close(() => resolve(true)));
        });
        if (!free) {
          const who = holderOf(port);
          busy.push(`${port}${who ? ` (held by ${who})` : ''}`);
        }
      }
      return busy.length
        ? {
            ok: false,
            message: `host port(s) in use: ${busy.join(', ')}`,
            remediation: 'Stop what holds them or forward other host ports.',
          }
        : { ok: true };
    },
  };
}

/** User namespaces can be created (needed by the unprivileged overlay clone). */
export function userNamespacesCheck(): PreflightCheck {
  return {
    name: 'user-namespaces',
    description: 'unprivileged user namespaces are available (overlay rootfs clone)',
    required: false,
    run() {
      return userNamespacesAvailable()
        ? { ok: true }
        : {
            ok: false,
            message: 'user namespaces are disabled',
            remediation: 'sysctl -w kernel.unprivileged_userns_clone=1 (the rootfs will be copied instead: slower)',
          };
    },
  };
}

/** A check that runs an async probe and turns a thrown error into a failure with remediation. */
export function probeCheck(
  name: string,
  description: string,
  remediation: string,
  probe: () => Promise<unknown>,
): PreflightCheck {
  return {
    name,
    description,
    required: true,
    async run() {
      try {
        await probe();
        return { ok: true };
      } catch (err) {
        return { ok: false, message: (err as Error).message.split('\n')[0], remediation };
      }
    },
  };
}
