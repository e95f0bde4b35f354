/**
 * What kind of KVM this host has. "/dev/kvm opens read-write" is not "KVM can boot Linux": a PVM
 * /dev/kvm (software virtualization through KVM's instruction emulator) opens fine and then fails
 * every libkrunfw boot, either at once (QEMU: "failed to set MSR 0x10a") or tens of seconds in
 * (an emulation failure that pauses the guest). Hardware KVM is assumed only when the device opens
 * read-write AND the CPU advertises VT-x (`vmx`) or AMD-V (`svm`), and no PVM module owns it.
 *
 * Every input is a path that tests (and `MICROVM_HOST_PROBE_ROOT`) can point elsewhere, so the four
 * host types — hardware KVM, PVM, no /dev/kvm, /dev/kvm without permission — are all testable on
 * any machine.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

/** Where the probe reads its facts. Defaults: the real host paths. */
export interface HostProbePaths {
  /** The KVM device (`/dev/kvm`). */
  kvmDevice?: string;
  /** CPU flags (`/proc/cpuinfo`). */
  cpuinfo?: string;
  /** Loaded modules (`/sys/module`): `kvm_pvm`, `kvm_intel`, `kvm_amd`. */
  sysModule?: string;
  /** This host boot's id (`/proc/sys/kernel/random/boot_id`), for recorded verdicts. */
  bootId?: string;
}

/** The verdict on /dev/kvm. */
export type KvmKind = 'hardware' | 'pvm' | 'software' | 'absent' | 'no-access' | 'not-a-device';

export interface KvmProbe {
  kind: KvmKind;
  /** True only for hardware KVM: the one kind that boots the libkrunfw kernel. */
  hardware: boolean;
  /** One sentence saying what was found and what follows for the backends. */
  reason: string;
  /** What to do about it (absent when nothing needs doing). */
  remediation?: string;
}

/**
 * The probe's paths: `paths` given, else under `$MICROVM_HOST_PROBE_ROOT` (tests of child
 * processes use it to simulate another host), else the real ones.
 */
export function probePaths(paths: HostProbePaths = {}, env: NodeJS.ProcessEnv = process.env): Required<HostProbePaths> {
  const root = env.MICROVM_HOST_PROBE_ROOT ?? '/';
  return {
    kvmDevice: paths.kvmDevice ?? path.join(root, 'dev/kvm'),
    cpuinfo: paths.cpuinfo ?? path.join(root, 'proc/cpuinfo'),
    sysModule: paths.sysModule ?? path.join(root, 'sys/module'),
    bootId: paths.bootId ?? path.join(root, 'proc/sys/kernel/random/boot_id'),
  };
}

/** The CPU flags of the first processor in a cpuinfo text. */
export function cpuFlags(cpuinfo: string): Set<string> {
  const m = /^flags\s*:(.*)$/m.exec(cpuinfo);
  return new Set(m ? m[1].trim().split(/\s+/) : []);
}

const NO_KVM = 'hardware KVM unavailable; QEMU will use TCG (software emulation: slower, but it boots)';

/** Probes the host's KVM. Never throws; reads a few small files and opens the device once. */
export function probeKvm(paths: HostProbePaths = {}): KvmProbe {
  const p = probePaths(paths);
  const dev = p.kvmDevice;
  let st: fs.Stats;
  try {
    st = fs.statSync(dev);
  } catch {
    return {
      kind: 'absent',
      hardware: false,
      reason: `${dev} does not exist: ${NO_KVM}`,
      remediation:
        'Enable virtualization (VT-x/AMD-V) in the firmware and load kvm_intel or kvm_amd; in a cloud VM, pick an instance type with nested virtualization.',
    };
  }
  if (!st.isCharacterDevice()) {
    return {
      kind: 'not-a-device',
      hardware: false,
      reason: `${dev} is not a character device: ${NO_KVM}`,
      remediation: 'Recreate the node (character device, major 10, minor 232).',
    };
  }
  try {
    fs.closeSync(fs.openSync(dev, fs.constants.O_RDWR));
  } catch (err) {
    return {
      kind: 'no-access',
      hardware: false,
      reason: `${dev} cannot be opened read-write (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}): ${NO_KVM}`,
      remediation: `Add your user to the group that owns ${dev} (usually 'kvm': sudo usermod -aG kvm $USER, then log in again).`,
    };
  }
  let flags = new Set<string>();
  try {
    flags = cpuFlags(fs.readFileSync(p.cpuinfo, 'utf8'));
  } catch {
    /* unreadable: no flags */
  }
  const hasModule = (name: string): boolean => fs.existsSync(path.join(p.sysModule, name));
  const vt = flags.has('vmx') || flags.has('svm');
  const vendorModule = hasModule('kvm_intel') || hasModule('kvm_amd');
  if (hasModule('kvm_pvm') && !(vt && vendorModule)) {
    return {
      kind: 'pvm',
      hardware: false,
      reason: `${dev} is PVM software virtualization: ${NO_KVM}`,
      remediation: 'Nothing to fix for QEMU; for libkrun or KVM speed, use a host with VT-x/AMD-V.',
    };
  }
  if (!vt) {
    return {
      kind: 'software',
      hardware: false,
      reason: `${dev} opens, but the CPU has neither vmx nor svm (software or emulated KVM): ${NO_KVM}`,
      remediation: 'Use a host (or a nested-virtualization instance) whose CPU flags show vmx or svm.',
    };
  }
  return {
    kind: 'hardware',
    hardware: true,
    reason: `${dev} is hardware KVM (CPU flag ${flags.has('vmx') ? 'vmx' : 'svm'})`,
  };
}

/** This host boot's id, or undefined where the kernel does not expose one. */
export function hostBootId(paths: HostProbePaths = {}): string | undefined {
  try {
    const id = fs.readFileSync(probePaths(paths).bootId, 'utf8').trim();
    return /^[0-9a-f-]{8,64}$/i.test(id) ? id : undefined;
  } catch {
    return undefined;
  }
}

/** A verdict recorded after KVM failed to boot a VM on this host boot. */
export interface KvmVerdict {
  bootId: string;
  reason: string;
  recordedAt: string;
}

function verdictFile(dataRoot: string): string {
  return path.join(dataRoot, 'kvm-verdict.json');
}

/** The recorded verdict for this host boot, if KVM already failed here since the host booted. */
export function readKvmVerdict(dataRoot: string, paths: HostProbePaths = {}): KvmVerdict | undefined {
  const boot = hostBootId(paths);
  if (!boot) return undefined;
  try {
    const v = JSON.parse(fs.readFileSync(verdictFile(dataRoot), 'utf8')) as Partial<KvmVerdict>;
    return v.bootId === boot && typeof v.reason === 'string' && typeof v.recordedAt === 'string'
      ? (v as KvmVerdict)
      : undefined;
  } catch {
    return undefined;
  }
}

/** Records that KVM failed on this host boot (atomically; a failure to record is not fatal). */
export function recordKvmVerdict(dataRoot: string, reason: string, paths: HostProbePaths = {}): void {
  const boot = hostBootId(paths);
  if (!boot) return;
  const file = verdictFile(dataRoot);
  const tmp = `${file}.${process.pid}.tmp`;
  try {
    fs.mkdirSync(dataRoot, { recursive: true, mode: 0o700 });
    const verdict: KvmVerdict = { bootId: boot, reason: reason.slice(0, 2000), recordedAt: new Date().toISOString() };
    fs.writeFileSync(tmp, `${JSON.stringify(verdict)}\n`, { mode: 0o600 });
    fs.renameSync(tmp, file);
  } catch {
    fs.rmSync(tmp, { force: true });
  }
}

/** An accelerator request: `'auto'` (hardware KVM when usable, else TCG), `'kvm'` or `'tcg'`. */
export type AccelChoice = 'auto' | 'kvm' | 'tcg';

/** The accelerator chosen for one start, and why. */
export interface AccelDecision {
  accel: 'kvm' | 'tcg';
  /** Chosen by 'auto' (a failing KVM start then falls back to TCG). */
  automatic: boolean;
  reason: string;
}

/**
 * The accelerator asked for: `option` when given, else `$MICROVM_ACCEL`, else 'auto'. The one
 * reader of MICROVM_ACCEL (run()'s 'auto' backend choice and the QEMU backend both ask here).
 */
export function requestedAccel(option: unknown, env: NodeJS.ProcessEnv = process.env): AccelChoice {
  if (option !== undefined) return parseAccel('accel', option);
  return env.MICROVM_ACCEL ? parseAccel('MICROVM_ACCEL', env.MICROVM_ACCEL) : 'auto';
}

/** Validates an accel value (option or `MICROVM_ACCEL`). */
export function parseAccel(name: string, value: unknown): AccelChoice {
  if (value === 'auto' || value === 'kvm' || value === 'tcg') return value;
  throw Object.assign(
    new RangeError(`Expected 'auto', 'kvm' or 'tcg' for ${name} but received ${JSON.stringify(value)}`),
    { code: 'ERR_MICROVM_INVALID_ACCEL' },
  );
}

/**
 * Decides the accelerator: a forced choice wins; 'auto' picks KVM only for hardware KVM that has not
 * already failed on this host boot (see {@link recordKvmVerdict}).
 */
export function decideAccel(
  requested: AccelChoice,
  options: { dataRoot?: string; paths?: HostProbePaths } = {},
): AccelDecision & { probe: KvmProbe } {
  const probe = probeKvm(options.paths);
  if (requested === 'tcg') return { accel: 'tcg', automatic: false, reason: 'TCG requested', probe };
  if (requested === 'kvm') return { accel: 'kvm', automatic: false, reason: `KVM requested (${probe.reason})`, probe };
  if (!probe.hardware) return { accel: 'tcg', automatic: true, reason: probe.reason, probe };
  const verdict = options.dataRoot ? readKvmVerdict(options.dataRoot, options.paths) : undefined;
  if (verdict) {
    return {
      accel: 'tcg',
      automatic: true,
      reason: `KVM failed to boot a VM on this host boot (recorded ${verdict.recordedAt}: ${verdict.reason.split('\n')[0]}); using TCG`,
      probe,
    };
  }
  return { accel: 'kvm', automatic: true, reason: probe.reason, probe };
}
