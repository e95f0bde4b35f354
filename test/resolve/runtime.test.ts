import * as fs from 'node:fs';
import * as path from 'node:path';
import { KrunFeature, resolveRunner, resolveRuntime } from '../../lib';
import { doubleDir, doublePath, scratch } from '../helpers';

describe('resolveRuntime (libkrun RECORDING ABI TEST DOUBLE)', () => {
  test('libDir first: returns the library, its dir, the runner and the built-in features', async () => {
    const rt = await resolveRuntime({ libDir: doubleDir(), pkgConfig: false, systemDirs: [], loaderSearch: false });
    expect(rt.libkrunPath).toBe(doublePath());
    expect(rt.libDir).toBe(doubleDir());
    expect(fs.statSync(rt.runnerPath).mode & 0o111).not.toBe(0);
    expect(rt.features).toEqual([KrunFeature.NET, KrunFeature.BLK, KrunFeature.INIT_BLOB]); // as libkrun 1.19.0 built with net,blk
  });

  test('MICROVM_LIBKRUN_DIR is honoured after libDir', async () => {
    const s = scratch();
    try {
      const rt = await resolveRuntime({
        libDir: s.dir,
        env: { MICROVM_LIBKRUN_DIR: doubleDir() },
        pkgConfig: false,
        systemDirs: [],
        loaderSearch: false,
      });
      expect(rt.libkrunPath).toBe(doublePath());
    } finally {
      s.cleanup();
    }
  });

  // (The loader search itself is tested in a fresh process in native.test.ts: once this process
  // has loaded the double, a dlopen of the soname finds that copy.)
  test('not found: lists every place searched', async () => {
    const s = scratch();
    try {
      const err = await resolveRuntime({
        libDir: s.dir,
        env: {},
        pkgConfig: true,
        systemDirs: ['/nonexistent'],
        loaderSearch: false,
      }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'ERR_MICROVM_LIBKRUN_NOT_FOUND' });
      expect((err as Error).message).toContain(path.join(s.dir, 'libkrun.so.1'));
      expect((err as Error).message).toContain('/nonexistent/libkrun.so.1');
    } finally {
      s.cleanup();
    }
  });

  test('a library without the libkrun symbols is rejected with the missing symbol named', async () => {
    const s = scratch();
    try {
      // libkrunfw is a real shared object but not libkrun.
      fs.copyFileSync(
        path.join(process.env.MICROVM_TEST_WRONG_ABI_FW_DIR as string, 'libkrunfw.so.5'),
        path.join(s.dir, 'libkrun.so.1'),
      );
      const err = await resolveRuntime({
        libDir: s.dir,
        env: {},
        pkgConfig: false,
        systemDirs: [],
        loaderSearch: false,
      }).catch((e: unknown) => e);
      expect((err as Error).message).toMatch(/does not export krun_set_log_level/);
    } finally {
      s.cleanup();
    }
  });

  test('runner: explicit path, then MICROVM_RUNNER, then the build', () => {
    const built = resolveRunner({ env: {} });
    expect(path.basename(built)).toBe('microvm-runner');
    expect(resolveRunner({ runnerPath: built, env: {} })).toBe(built);
    expect(resolveRunner({ env: { MICROVM_RUNNER: built } })).toBe(built);
    // A missing explicit runner falls through to the next place, as the search order says.
    expect(resolveRunner({ runnerPath: '/nonexistent/microvm-runner', env: {} })).toBe(built);
    expect(() => resolveRunner({ runnerPath: 'relative', env: {} })).toThrow(/absolute path for runnerPath/);
  });
});
