/** Which backend 'auto' picks, and the checks a start makes. */

import * as fs from 'node:fs';
import * as path from 'node:path';
import { libkrunBackend } from '../backends/libkrun';
import { qemuBackend } from '../backends/qemu';
import type { Backend, EgressPolicy } from '../backends/types';
import { type AccelChoice, decideAccel, requestedAccel } from '../host/kvm';
import {
  diskSpaceCheck,
  memoryCheck,
  portsCheck,
  type PreflightCheck,
  resourcesCheck,
  userNamespacesCheck,
} from '../preflight/checks';
import { resolveRuntime } from '../resolve/runtime';

/** The checks a start makes: the backend's own, then the host's (disk, memory, CPUs, ports, namespaces). */
export function defaultChecks(
  backend: Backend,
  dataRoot: string,
  cpus: number,
  memoryMiB: number,
  ports: number[],
  egress: EgressPolicy,
): PreflightCheck[] {
  return [
    ...(backend.preflightChecks?.({ egress }) ?? []),
    diskSpaceCheck(fs.existsSync(dataRoot) ? dataRoot : path.dirname(dataRoot)),
    memoryCheck(memoryMiB),
    resourcesCheck(cpus, memoryMiB),
    portsCheck(ports),
    ...(backend.supportsOverlay ? [userNamespacesCheck()] : []),
  ];
}

/**
 * 'auto': libkrun when the host has hardware KVM (a PVM or other software /dev/kvm does not count,
 * nor a KVM that already failed on this host boot) and libkrun loads; otherwise QEMU, which then
 * uses KVM or TCG by the same rule. `accel: 'tcg'` always means QEMU.
 */
export async function chooseBackend(options: { accel?: AccelChoice; dataRoot?: string } = {}): Promise<Backend> {
  const accel = requestedAccel(options.accel);
  if (accel !== 'tcg' && decideAccel('auto', { dataRoot: options.dataRoot }).accel === 'kvm') {
    try {
      await resolveRuntime();
      return libkrunBackend();
    } catch {
      /* no libkrun: QEMU (with KVM) */
    }
  }
  return qemuBackend({ accel: options.accel });
}
