import * as fs from 'node:fs';
import * as path from 'node:path';
import { LIBKRUNFW_ABI_VERSION, native, readFirmwareKernel, resolveFirmware } from '../../lib';
import { firmwareDir, firmwarePath, scratch, wrongAbiFirmwareDir } from '../helpers';

describe('resolveFirmware (real Debian libkrunfw5)', () => {
  test('finds the real libkrunfw through the dir option: ABI 5, a kernel over 10 MB', async () => {
    const fw = await native.resolveFirmware({ dir: firmwareDir(), systemDirs: [], loaderSearch: false });
    expect(fw.path).toBe(firmwarePath());
    expect(fw.abiVersion).toBe(LIBKRUNFW_ABI_VERSION);
    expect(fw.kernelSize).toBeGreaterThan(10 * 1024 * 1024);
    expect(fw.loadAddress).toBeGreaterThan(0);
    expect(fw.entryAddress).toBeGreaterThanOrEqual(fw.loadAddress);
    expect(fw.entryAddress - fw.loadAddress).toBeLessThan(fw.kernelSize);
  });

  test('dirs are searched in order; MICROVM_LIBKRUNFW_DIR after them; runtime lib dir after that', async () => {
    const empty = scratch();
    try {
      const viaDirs = await resolveFirmware({ dirs: [empty.dir, firmwareDir()], systemDirs: [], loaderSearch: false });
      expect(viaDirs.path).toBe(firmwarePath());
      const viaEnv = await resolveFirmware({
        env: { MICROVM_LIBKRUNFW_DIR: `${empty.dir}:${firmwareDir()}` },
        systemDirs: [],
        loaderSearch: false,
      });
      expect(viaEnv.path).toBe(firmwarePath());
      const viaRuntime = await resolveFirmware({
        runtimeLibDir: firmwareDir(),
        env: {},
        systemDirs: [],
        loaderSearch: false,
      });
      expect(viaRuntime.path).toBe(firmwarePath());
      // The explicit dir wins over the environment.
      const wrongFirst = await resolveFirmware({
        dir: firmwareDir(),
        env: { MICROVM_LIBKRUNFW_DIR: wrongAbiFirmwareDir() },
        systemDirs: [],
        loaderSearch: false,
      });
      expect(wrongFirst.abiVersion).toBe(5);
    } finally {
      empty.cleanup();
    }
  });

  // (The loader search is tested in a fresh process in native.test.ts: once this process has
  // loaded libkrunfw.so.5, a dlopen of the soname finds that copy.)
  test('not found: the error lists every place searched and how to install it', async () => {
    const a = scratch();
    const b = scratch();
    try {
      const err = await resolveFirmware({
        dir: a.dir,
        env: { MICROVM_LIBKRUNFW_DIR: b.dir },
        systemDirs: ['/nonexistent/lib'],
        loaderSearch: false,
      }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'ERR_MICROVM_LIBKRUNFW_NOT_FOUND' });
      const message = (err as Error).message;
      expect(message).toContain(path.join(a.dir, 'libkrunfw.so.5'));
      expect(message).toContain(path.join(b.dir, 'libkrunfw.so.5'));
      expect(message).toContain('/nonexistent/lib/libkrunfw.so.5');
      expect(message).toContain('apt-get install libkrunfw5');
    } finally {
      a.cleanup();
      b.cleanup();
    }
  });

  test('ABI mismatch: found vs expected version', async () => {
    const err = await resolveFirmware({ dir: wrongAbiFirmwareDir(), systemDirs: [], loaderSearch: false }).catch(
      (e: unknown) => e,
    );
    expect(err).toMatchObject({ code: 'ERR_MICROVM_LIBKRUNFW_ABI' });
    expect((err as Error).message).toMatch(/ABI version 4, but version 5 is required/);
  });

  test('a file that is not a libkrunfw is reported, and the search goes on', async () => {
    const s = scratch();
    try {
      fs.writeFileSync(path.join(s.dir, 'libkrunfw.so.5'), 'not an ELF file');
      const fw = await resolveFirmware({ dirs: [s.dir, firmwareDir()], systemDirs: [], loaderSearch: false });
      expect(fw.path).toBe(firmwarePath());
      const err = await resolveFirmware({ dir: s.dir, systemDirs: [], loaderSearch: false }).catch((e: unknown) => e);
      expect((err as Error).message).toMatch(/invalid ELF header|file too short/);
    } finally {
      s.cleanup();
    }
  });

  test('options are validated', async () => {
    await expect(resolveFirmware({ dir: 'relative/dir' })).rejects.toThrow(/absolute path for dir/);
    await expect(resolveFirmware({ dirz: [] } as never)).rejects.toThrow(/Unknown option options.dirz/);
  });

  test('readFirmwareKernel copies the raw kernel out of libkrunfw', async () => {
    const fw = await readFirmwareKernel(firmwarePath());
    expect(fw.kernel.length).toBe(fw.kernelSize);
    // A raw x86 kernel image carries the Xen PVH entry ELF note ("Xen" name, type 18).
    expect(fw.kernel.indexOf(Buffer.from('Xen\0'))).toBeGreaterThan(0);
  });
});
