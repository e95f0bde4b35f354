/**
 * What the QEMU backend needs on the host: its options, finding QEMU, virtiofsd and the guest init,
 * the accelerator decision, and the file-server check `microvm doctor` runs.
 */
import { fsGuardPath } from './shipped';

import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { MicrovmError } from '../../errors';
import { type AccelChoice, type AccelDecision, decideAccel, type HostProbePaths, requestedAccel } from '../../host/kvm';

import { resolveRunner } from '../../resolve/runtime';
import { type ResolveFirmwareOptions } from '../../resolve/firmware';

import { guestInitPath } from '../guest-init';

/** Options of {@link qemuBackend}. */
export interface QemuBackendOptions {
  /** qemu-system-x86_64 to use. Default: found on PATH. */
  qemuPath?: string;
  /** virtiofsd to use. Default: /usr/libexec/virtiofsd, /usr/lib/qemu/virtiofsd, then PATH. */
  virtiofsdPath?: string;
  /**
   * 'kvm', 'tcg', or 'auto': hardware KVM when /dev/kvm opens read-write and the CPU has vmx/svm (a
   * PVM /dev/kvm does not count) and KVM has not failed on this host boot; else TCG. Default:
   * `$MICROVM_ACCEL`, else 'auto'.
   */
  accel?: AccelChoice;
  /** Where the KVM probe reads /dev/kvm, /proc/cpuinfo, /sys/module and the boot id (tests). */
  hostProbe?: HostProbePaths;
  /** Extra QEMU arguments, appended after the backend's own. */
  extraArgs?: readonly string[];
  firmware?: ResolveFirmwareOptions;
  /** Where bootable kernels are cached. Default: `<dataDir>/kernels`. */
  kernelCacheDir?: string;
  /**
   * Seconds QEMU may take to come up (its control socket answering) before start() fails with
   * ERR_MICROVM_BOOT_TIMEOUT. Default: the run's boot deadline (`timeouts.boot`).
   */
  startTimeoutSeconds?: number;
  /**
   * QEMU dies with this Node process (parent-death signal), even on kill -9. Default true; false
   * lets the VM outlive it (`microvm run --detach`); virtiofsd always dies with QEMU.
   */
  dieWithParent?: boolean;
}

/** The first executable `name` on $PATH. */
function onPath(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(':')) {
    const file = path.join(dir, name);
    try {
      fs.accessSync(file, fs.constants.X_OK);
      return file;
    } catch {
      /* next */
    }
  }
  return undefined;
}

/** Host TSC frequency in kHz (the microvm guest cannot calibrate it under TCG without a hint). */
export function hostTscKhz(): number | undefined {
  try {
    const m = /cpu MHz\s*:\s*([\d.]+)/.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'));
    return m ? Math.round(Number(m[1]) * 1000) : undefined;
  } catch {
    return undefined;
  }
}

/** What the QEMU backend needs on the host, and the accelerator it will use (with the reason). */
export interface QemuRuntime extends AccelDecision {
  qemuPath: string;
  virtiofsdPath: string;
  guestInit: string;
  /** microvm-fsguard.so, preloaded into every virtiofsd. */
  fsGuard: string;
}

/**
 * Finds QEMU, virtiofsd and the guest init (errors name the package to install) and decides the
 * accelerator. `dataRoot` is where KVM verdicts for this host boot are recorded.
 */
export function resolveQemuRuntime(options: QemuBackendOptions = {}, dataRoot?: string): QemuRuntime {
  const qemuPath = options.qemuPath ?? onPath('qemu-system-x86_64');
  if (!qemuPath || !fs.existsSync(qemuPath)) {
    throw new MicrovmError(
      'ERR_MICROVM_QEMU_NOT_FOUND',
      'qemu-system-x86_64 was not found. Install it: `apt-get install qemu-system-x86` (Debian/Ubuntu) or `dnf install qemu-system-x86-core` (Fedora).',
    );
  }
  const virtiofsdPath =
    options.virtiofsdPath ??
    ['/usr/libexec/virtiofsd', '/usr/lib/qemu/virtiofsd'].find((p) => fs.existsSync(p)) ??
    onPath('virtiofsd');
  if (!virtiofsdPath || !fs.existsSync(virtiofsdPath)) {
    throw new MicrovmError(
      'ERR_MICROVM_VIRTIOFSD_NOT_FOUND',
      'virtiofsd was not found. Debian 12 ships it in qemu-system-common (/usr/lib/qemu/virtiofsd); newer distributions: `apt-get install virtiofsd` / `dnf install virtiofsd`.',
    );
  }
  const requested = requestedAccel(options.accel);
  const { probe, ...decision } = decideAccel(requested, { dataRoot, paths: options.hostProbe });
  if (
    decision.accel === 'kvm' &&
    !decision.automatic &&
    (probe.kind === 'absent' || probe.kind === 'no-access' || probe.kind === 'not-a-device')
  ) {
    throw new MicrovmError(
      'ERR_MICROVM_KVM_UNAVAILABLE',
      `accel 'kvm' was requested but ${probe.reason.split(':')[0]}. ${probe.remediation ?? ''} Or use accel 'tcg'/'auto'.`,
    );
  }
  return { qemuPath, virtiofsdPath, guestInit: guestInitPath(), fsGuard: fsGuardPath(), ...decision };
}

/**
 * Starts the file server the way a boot does — virtiofsd with the guard preloaded, on a socket made
 * beforehand, in the namespaces the launcher uses (a user namespace when this process is not root)
 * — on an empty directory, and resolves once it waits for QEMU; rejects with its own last line when
 * it exits first, or after `timeoutMs`. What `microvm doctor` runs as the `file-server` check.
 */
export async function checkFileServer(timeoutMs = 5000): Promise<void> {
  const rt = resolveQemuRuntime({ accel: 'tcg' });
  if (!onPath('unshare'))
    throw new MicrovmError('ERR_MICROVM_QEMU_NOT_FOUND', 'unshare (util-linux) was not found; install util-linux.');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'microvm-fscheck-'));
  const root = process.getuid?.() === 0;
  try {
    fs.mkdirSync(path.join(dir, 'share'));
    const child = spawn(
      'unshare',
      [
        ...(root ? ['-m'] : ['-U', '-r', '-m']),
        '--propagation',
        'private',
        '--',
        resolveRunner(),
        '--listen-unix',
        path.join(dir, 'fs.sock'),
        '--',
        rt.virtiofsdPath,
        '--fd=3',
        '-o',
        `source=${path.join(dir, 'share')}`,
      ],
      { stdio: ['ignore', 'ignore', 'pipe'], env: { PATH: process.env.PATH, LD_PRELOAD: rt.fsGuard } },
    );
    let err = '';
    const outcome = await new Promise<string | undefined>((resolve) => {
      const timer = setTimeout(() => resolve(`it did not start within ${timeoutMs} ms`), timeoutMs);
      child.stderr.on('data', (d: Buffer) => {
        err = (err + d.toString()).slice(-4000);
        if (err.includes('Waiting for vhost-user socket connection')) {
          clearTimeout(timer);
          resolve(undefined);
        }
      });
      child.once('exit', (code, signal) => {
        clearTimeout(timer);
        const last = err.trim().split('\n').pop() ?? '';
        resolve(`it exited (${signal ?? `code ${String(code)}`})${last ? `: ${last}` : ''}`);
      });
    });
    child.kill('SIGKILL');
    if (outcome)
      throw new MicrovmError('ERR_MICROVM_QEMU_VIRTIOFS', `virtiofsd cannot serve a VM's files here: ${outcome}`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
