/**
 * Pausing and resuming a running VM, from the process that started it or from any other (the CLI):
 * both go through the VM's control socket (QEMU's second QMP monitor, `control.sock` in the VM's
 * directory; the first is the backend's watcher). A marker file (`paused`) says the pause was asked
 * for: the watcher ends a VM whose guest stops without one (a KVM emulation failure does that),
 * and leaves one with the marker alone. New agent requests on a paused VM fail at once with
 * ERR_MICROVM_VM_PAUSED; requests already under way wait for the resume (or the VM's end).
 */
import * as fs from 'node:fs';
import { MicrovmError } from './errors';
import { QmpClient } from './backends/qemu/qmp';
import { vmFile } from './vm-dir';

/** How long a pause or resume may take to reach QEMU and be answered. */
const CONTROL_TIMEOUT_MS = 5000;

/** Whether the VM in `dir` is paused on purpose. */
export function isPaused(dir: string): boolean {
  return fs.existsSync(vmFile(dir, 'paused'));
}

/** The coded error for a request the paused VM `name` cannot serve. */
export function pausedError(name: string): MicrovmError {
  return new MicrovmError(
    'ERR_MICROVM_VM_PAUSED',
    `${name} is paused; resume it first (vm.resume(), microvm unpause ${name})`,
  );
}

function unsupported(name: string, backend: string): MicrovmError {
  return new MicrovmError(
    'ERR_MICROVM_SNAPSHOT_UNSUPPORTED',
    `${name} runs on the ${backend} backend, which cannot pause or resume a VM (libkrun 1.19 has no API for it); the QEMU backend can`,
  );
}

async function control(socket: string, command: 'stop' | 'cont'): Promise<void> {
  const qmp = await QmpClient.connect(socket, CONTROL_TIMEOUT_MS);
  try {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(new MicrovmError('ERR_MICROVM_QMP', `QEMU did not answer ${command} within ${CONTROL_TIMEOUT_MS} ms`)),
        CONTROL_TIMEOUT_MS,
      );
    });
    try {
      await Promise.race([qmp.execute(command), late]);
    } catch (err) {
      if (err instanceof MicrovmError) throw err;
      throw new MicrovmError('ERR_MICROVM_QMP', `QEMU refused ${command}: ${(err as Error).message}`, { cause: err });
    } finally {
      clearTimeout(timer);
    }
  } finally {
    qmp.close();
  }
}

/** What a pause or resume needs to know about a VM. */
export interface Controllable {
  name: string;
  backend: string;
  /** The VM's directory. */
  dir: string;
  /** Its control socket; undefined when the backend has none. */
  controlSocket: string | undefined;
}

/** Pauses the VM's vCPUs (its memory and devices stay as they are). Pausing a paused VM does nothing. */
export async function pauseVm(vm: Controllable): Promise<void> {
  if (!vm.controlSocket) throw unsupported(vm.name, vm.backend);
  const marker = vmFile(vm.dir, 'paused');
  if (fs.existsSync(marker)) return;
  // The marker first: the watcher that sees QEMU's STOP event must find it.
  fs.writeFileSync(marker, `${new Date().toISOString()}\n`, { mode: 0o600 });
  try {
    await control(vm.controlSocket, 'stop');
  } catch (err) {
    fs.rmSync(marker, { force: true });
    throw err;
  }
}

/** Lets a paused VM run again. Resuming a running VM does nothing. */
export async function resumeVm(vm: Controllable): Promise<void> {
  if (!vm.controlSocket) throw unsupported(vm.name, vm.backend);
  await control(vm.controlSocket, 'cont');
  fs.rmSync(vmFile(vm.dir, 'paused'), { force: true });
}
