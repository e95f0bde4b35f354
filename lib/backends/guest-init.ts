/**
 * Our guest init (native/guest/init.cc), which both backends put into the VM's root: PID 1 under
 * QEMU; under libkrun the command libkrun's init runs first, to start the guest agent. Where it
 * goes, the names it answers to, and the one place that writes it.
 */
import { VM_FILE } from '../vm-dir';
import * as fs from 'node:fs';
import { shippedFile } from '../native';
import type { RootfsContext } from '../rootfs/hooks';
import { GUEST_INIT_PATH } from '../guest/protocol';

export { GUEST_INIT_PATH, IDLE_COMMAND } from '../guest/protocol';

/** The guest agent's socket, in the VM's directory. */
export const AGENT_SOCKET = VM_FILE.agentSocket;

/** The guest init binary (native/guest/init.cc). */
export function guestInitPath(): string {
  return shippedFile('microvm-guest-init', 'ERR_MICROVM_GUEST_INIT_NOT_FOUND');
}

/** Writes the guest init into the VM's root (root-owned, 0755, under a 0755 /.microvm). */
export function injectGuestInit(ctx: RootfsContext): void {
  ctx.writeFile(GUEST_INIT_PATH, fs.readFileSync(guestInitPath()), {
    mode: 0o755,
    uid: 0,
    gid: 0,
    parents: { mode: 0o755 },
  });
}
