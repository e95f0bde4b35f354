/** `microvm doctor` (what this host can run) and `microvm setup` (fetch libkrunfw). */

import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { chooseBackend } from '../run';
import { diskSpaceCheck, kvmCheck, type PreflightCheck, probeCheck, userNamespacesCheck } from '../preflight/checks';
import { checkFileServer, netGuardPath, resolveQemuRuntime } from '../backends/qemu';
import { probeKvm } from '../host/kvm';
import { resolveFirmware, FIRMWARE_INSTALL_HINT } from '../resolve/firmware';
import { LIBKRUN_INSTALL_HINT, resolveRuntime } from '../resolve/runtime';
import { packageRoot } from '../native';
import { type CommandContext, UsageError, coded } from './common';

export async function cmdDoctor(c: CommandContext): Promise<number> {
  const { dataDir, out } = c;
  const checks: PreflightCheck[] = [
    kvmCheck(),
    probeCheck('libkrun', 'libkrun 1.x can be loaded (backend libkrun)', LIBKRUN_INSTALL_HINT, () => resolveRuntime()),
    probeCheck('libkrunfw', 'libkrunfw 5 can be loaded (both backends)', FIRMWARE_INSTALL_HINT, () =>
      resolveFirmware(),
    ),
    probeCheck(
      'qemu',
      'QEMU, virtiofsd and the guest init are present (backend qemu)',
      'apt-get install qemu-system-x86',
      async () => resolveQemuRuntime(),
    ),
    // Not required to boot: only egress rules beyond relayed names need it.
    {
      ...probeCheck(
        'egress-filter',
        'the egress filter is present (egress rules by address or DNS)',
        'npm rebuild node-microvm (in a checkout: npm run build:native)',
        async () => netGuardPath(),
      ),
      required: false,
    },
    userNamespacesCheck(),
    // What a boot needs of virtiofsd on this host, as this user (setgroups, /run, its sandbox).
    probeCheck(
      'file-server',
      "virtiofsd serves a VM's files as this user (backend qemu)",
      process.getuid?.() === 0
        ? 'apt-get install qemu-system-x86'
        : 'enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu also kernel.apparmor_restrict_unprivileged_userns=0), or run as root',
      () => checkFileServer(),
    ),
    diskSpaceCheck(fs.existsSync(dataDir) ? dataDir : path.dirname(dataDir)),
  ];
  const results = [];
  for (const c of checks) results.push({ name: c.name, description: c.description, ...(await c.run()) });
  const backend = await chooseBackend({ dataRoot: dataDir }).then(
    (b) => b.name,
    () => 'none',
  );
  let accel: { accel: string; reason: string } | undefined;
  try {
    const rt = resolveQemuRuntime({}, dataDir);
    accel = { accel: rt.accel, reason: rt.reason };
  } catch {
    accel = undefined;
  }
  const lines = results.map(
    (r) =>
      `${r.ok ? 'ok  ' : 'MISS'} ${r.name.padEnd(16)} ${r.ok ? (r.message ?? r.description) : `${r.message ?? ''}${r.remediation ? `\n     fix: ${r.remediation}` : ''}`}`,
  );
  const usable =
    results.find((r) => r.name === 'libkrunfw')?.ok &&
    (results.find((r) => r.name === 'qemu')?.ok ||
      (results.find((r) => r.name === 'kvm')?.ok && results.find((r) => r.name === 'libkrun')?.ok));
  lines.push(
    '',
    `backend 'auto' will use: ${backend}${backend === 'qemu' && accel ? ` with ${accel.accel.toUpperCase()} (${accel.accel === 'tcg' ? `${accel.reason}` : accel.reason})` : ''}`,
  );
  out({ checks: results, backend, accel: accel ?? null, kvm: probeKvm(), ready: !!usable }, lines.join('\n'));
  return usable ? 0 : 1;
}
/** `microvm setup`: libkrunfw found, or fetched into the data dir. */
export async function cmdSetup(c: CommandContext): Promise<number> {
  const { positional, dataDir, json, out } = c;
  if (positional.length) throw new UsageError('setup takes no arguments');
  const env = { ...process.env, MICROVM_DATA_DIR: dataDir };
  const found = await resolveFirmware({ env }).catch(() => undefined);
  if (found) {
    out({ libkrunfw: found.path, fetched: false }, `libkrunfw found: ${found.path}`);
    return 0;
  }
  const script = path.join(packageRoot, 'scripts', 'fetch-libkrunfw.sh');
  const dest = path.join(dataDir, 'libkrunfw');
  if (!json) process.stderr.write(`microvm: fetching Debian's libkrunfw5 into ${dest}\n`);
  const r = spawnSync('bash', [script, dest], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', json ? 'pipe' : 'inherit'],
    timeout: 600_000,
  });
  if (r.status !== 0)
    throw coded(
      'ERR_MICROVM_LIBKRUNFW_NOT_FOUND',
      `fetching libkrunfw failed (${r.error ? r.error.message : `exit ${String(r.status)}`}). ${FIRMWARE_INSTALL_HINT}`,
    );
  const fw = await resolveFirmware({ env });
  out({ libkrunfw: fw.path, fetched: true }, `libkrunfw fetched: ${fw.path}`);
  return 0;
}
