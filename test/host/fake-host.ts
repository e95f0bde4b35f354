/**
 * A FAKE HOST TREE for the KVM probe: dev/kvm (a real character device with /dev/null's numbers,
 * so it opens read-write without being KVM), proc/cpuinfo with given flags, sys/module/<name>
 * directories and a boot id. Point `probeKvm(paths)` or `MICROVM_HOST_PROBE_ROOT` at it.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { HostProbePaths } from '../../lib/host/kvm';

export interface FakeHostSpec {
  flags: string;
  modules: string[];
  /** 'chardev' (default): an openable character device; 'none': no dev/kvm. */
  device?: 'chardev' | 'none';
  bootId?: string;
}

export function makeHost(root: string, spec: FakeHostSpec): Required<HostProbePaths> {
  const paths = {
    kvmDevice: path.join(root, 'dev', 'kvm'),
    cpuinfo: path.join(root, 'proc', 'cpuinfo'),
    sysModule: path.join(root, 'sys', 'module'),
    bootId: path.join(root, 'proc', 'sys', 'kernel', 'random', 'boot_id'),
  };
  fs.mkdirSync(path.dirname(paths.kvmDevice), { recursive: true });
  fs.mkdirSync(path.dirname(paths.bootId), { recursive: true });
  fs.writeFileSync(paths.cpuinfo, `processor\t: 0\nvendor_id\t: FakeCPU\nflags\t\t: ${spec.flags}\n\n`);
  for (const m of spec.modules) fs.mkdirSync(path.join(paths.sysModule, m), { recursive: true });
  fs.mkdirSync(paths.sysModule, { recursive: true });
  fs.writeFileSync(paths.bootId, `${spec.bootId ?? '0f0f0f0f-1111-2222-3333-444444444444'}\n`);
  if ((spec.device ?? 'chardev') === 'chardev') {
    // mknod needs root; otherwise a symlink to /dev/null is the same for stat() and open().
    try {
      execFileSync('mknod', ['-m', '666', paths.kvmDevice, 'c', '1', '3'], { stdio: 'ignore' });
    } catch {
      fs.symlinkSync('/dev/null', paths.kvmDevice);
    }
  }
  return paths;
}
