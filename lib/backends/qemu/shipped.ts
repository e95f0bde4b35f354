/**
 * The files the QEMU backend takes from the package: the file-server guard, the egress filter and
 * the relay's script. In a module of their own so that tests can stand in for a broken install.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { packageRoot, shippedFile } from '../../native';

/**
 * The allow-list relay's script (lib/network/relay.ts, compiled): beside this module's own
 * compiled tree when it runs from dist/, else the package's dist/ (running from source).
 */
export function relayScript(): string {
  const sibling = path.join(__dirname, '..', '..', 'network', 'relay.js');
  return fs.existsSync(sibling) ? sibling : path.join(packageRoot, 'dist', 'network', 'relay.js');
}

/**
 * The file-server guard (native/preload/fs_guard.cc), preloaded into virtiofsd so a guest's chmod/mknod can
 * never give a host user a privilege.
 */
export function fsGuardPath(): string {
  return shippedFile('microvm-fsguard.so', 'ERR_MICROVM_FSGUARD_NOT_FOUND');
}

/**
 * The egress filter (native/preload/net_guard.cc), preloaded into QEMU when a policy has rules beyond
 * relayed names.
 */
export function netGuardPath(): string {
  return shippedFile('microvm-netguard.so', 'ERR_MICROVM_EGRESS_GUARD');
}
