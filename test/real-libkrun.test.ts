/**
 * Against the real libkrun with KVM. These run only where both exist; elsewhere the suite is
 * skipped and its title says which capability is missing (no machine of this project's CI has
 * either: libkrun is not packaged for Debian, and there is no /dev/kvm).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { buildLaunchPlan, KrunContext, resolveFirmware, resolveRuntime, type RuntimeInfo, startRunner } from '../lib';
import { systemLibraryDirs } from '../lib/resolve/search';
import { scratch } from './helpers';

function missingCapability(): string | undefined {
  try {
    fs.accessSync('/dev/kvm', fs.constants.R_OK | fs.constants.W_OK);
  } catch {
    return 'no usable /dev/kvm';
  }
  const dirs = [...(process.env.MICROVM_LIBKRUN_DIR ?? '').split(':').filter(Boolean), ...systemLibraryDirs()];
  if (!dirs.some((d) => fs.existsSync(path.join(d, 'libkrun.so.1')))) return 'libkrun is not installed';
  if (!fs.existsSync('/bin/busybox')) return 'no /bin/busybox to build a guest root';
  return undefined;
}

const missing = missingCapability();
let runtime: RuntimeInfo | undefined;
let runtimeError = '';

beforeAll(async () => {
  if (missing) return;
  runtime = await resolveRuntime().catch((e: Error) => {
    runtimeError = e.message;
    return undefined;
  });
});

const suite = missing ? describe.skip : describe;
suite(`real libkrun + KVM${missing ? ` [skipped: ${missing}]` : ''}`, () => {
  test('a context on the real libkrun accepts a full configuration', async () => {
    if (!runtime) throw new Error(`libkrun is installed but unusable: ${runtimeError}`);
    const fw = await resolveFirmware({ runtimeLibDir: runtime.libDir });
    const ctx = await KrunContext.create({ libkrunPath: runtime.libkrunPath, firmwarePath: fw.path });
    try {
      ctx.setVmConfig({ cpus: 1, memoryMiB: 256 }).setRoot('/').setPortMap('none').setExec({ path: '/bin/true' });
    } finally {
      ctx.free();
    }
  });

  test('boots a guest that exits with code 3', async () => {
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
    } finally {
      s.cleanup();
    }
  });
});
