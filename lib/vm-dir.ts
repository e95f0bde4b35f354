/**
 * The layout of a data root and of a VM's directory, in one place: where VMs live, what a VM's name
 * may be, and the files of its directory that more than one module reads or writes (run(), the
 * CLI, the flight recorder, the backends, the state records).
 */
import * as path from 'node:path';

/** A VM's name: what `run({ name })`, the CLI and `NAME:/path` in `microvm cp` accept. */
export const VM_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
/** The same, as a piece of a larger pattern. */
export const VM_NAME_PART = VM_NAME.source.slice(1, -1);

/** The files of a VM's directory. */
export const VM_FILE = {
  console: 'console.log',
  stdout: 'stdout.log',
  stderr: 'stderr.log',
  /** The VMM's own output (QEMU, the launcher, virtiofsd; the libkrun runner). */
  vmm: 'vm.log',
  state: 'state.json',
  owner: 'owner.json',
  agentSocket: 'agent.sock',
  egressLog: 'egress.log',
  /** QEMU's second QMP monitor, for control from any process (pause, resume); lib/pause.ts. */
  control: 'control.sock',
  /** Present while the VM is paused on purpose (lib/pause.ts): the watcher then leaves the pause alone. */
  paused: 'paused',
} as const;

/** Where a data root keeps its VMs. */
export function vmsDir(dataRoot: string): string {
  return path.join(dataRoot, 'vms');
}

/** A VM's directory. */
export function vmDir(dataRoot: string, name: string): string {
  return path.join(vmsDir(dataRoot), name);
}

/** The data root a VM directory belongs to (`<dataRoot>/vms/<name>`). */
export function dataRootOf(dir: string): string {
  return path.dirname(path.dirname(dir));
}

/** A VM directory's file. */
export function vmFile(dir: string, file: keyof typeof VM_FILE): string {
  return path.join(dir, VM_FILE[file]);
}
