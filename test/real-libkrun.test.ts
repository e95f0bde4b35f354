/**
 * Against the real libkrun: configuration calls need only the library (none of them opens
 * /dev/kvm); a boot needs hardware KVM too (a PVM /dev/kvm cannot boot the libkrunfw kernel).
 * Elsewhere the tests are skipped and their titles say which capability is missing (no machine of
 * this project's CI has libkrun: it is not packaged for Debian; their /dev/kvm is PVM).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  buildLaunchPlan,
  KrunContext,
  probeKvm,
  resolveFirmware,
  resolveRuntime,
  type RuntimeInfo,
  startRunner,
} from '../lib';
import { systemLibraryDirs } from '../lib/resolve/search';
import { scratch } from './helpers';

function missingLibrary(): string | undefined {
  const dirs = [...(process.env.MICROVM_LIBKRUN_DIR ?? '').split(':').filter(Boolean), ...systemLibraryDirs()];
  if (!dirs.some((d) => fs.existsSync(path.join(d, 'libkrun.so.1')))) return 'libkrun is not installed';
  return undefined;
}

function missingForBoot(): string | undefined {
  const kvm = probeKvm();
  if (!kvm.hardware) return `no hardware KVM: ${kvm.reason.split(':')[0]}`;
  if (!fs.existsSync('/bin/busybox')) return 'no /bin/busybox to build a guest root';
  return missingLibrary();
}

const missing = missingLibrary();
const missingBoot = missingForBoot();
let runtime: RuntimeInfo | undefined;
let runtimeError = '';

beforeAll(async () => {
  if (missing) return;
  runtime = await resolveRuntime().catch((e: Error) => {
    runtimeError = e.message;
    return undefined;
  });
});

describe('real libkrun', () => {
  (missing ? test.skip : test)(
    `a context on the real libkrun accepts a full configuration${missing ? ` [skipped: ${missing}]` : ''}`,
    async () => {
      if (!runtime) throw new Error(`libkrun is installed but unusable: ${runtimeError}`);
      const fw = await resolveFirmware({ runtimeLibDir: runtime.libDir });
      const ctx = await KrunContext.create({ libkrunPath: runtime.libkrunPath, firmwarePath: fw.path });
      try {
        ctx.setVmConfig({ cpus: 1, memoryMiB: 256 }).setRoot('/').setPortMap('none').setExec({ path: '/bin/true' });
      } finally {
        ctx.free();
      }
    },
  );

  (missingBoot ? test.skip : test)(
    `boots a guest that exits with code 3${missingBoot ? ` [skipped: ${missingBoot}]` : ''}`,
    async () => {
      if (!runtime) throw new Error(`libkrun is installed but unusable: ${runtimeError}`);
      const s = scratch();
      try {
        fs.mkdirSync(path.join(s.dir, 'bin'));
        fs.copyFileSync('/bin/busybox', path.join(s.dir, 'bin', 'busybox'));
        fs.chmodSync(path.join(s.dir, 'bin', 'busybox'), 0o755);
        const fw = await resolveFirmware({ runtimeLibDir: runtime.libDir });
        const plan = buildLaunchPlan({
          libkrunPath: runtime.libkrunPath,
          firmwarePath: fw.path,
          cpus: 1,
          memoryMiB: 256,
          root: s.dir,
          exec: { path: '/bin/busybox', args: ['sh', '-c', 'exit 3'] },
        });
        const vm = await startRunner({ runnerPath: runtime.runnerPath, plan, logPath: path.join(s.dir, 'vm.log') });
        await expect(vm.exited).resolves.toMatchObject({ code: 3 });
        // Two validations and contexts in this process: the log level is never set twice here.
        await import('../lib').then((m) => m.validateLaunchPlan({ ...plan, logLevel: 1 }));
        await import('../lib').then((m) => m.validateLaunchPlan({ ...plan, logLevel: 1 }));
      } finally {
        s.cleanup();
      }
    },
  );
});
