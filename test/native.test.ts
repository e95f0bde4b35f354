import { execFileSync } from 'node:child_process';
import * as os from 'node:os';
import * as path from 'node:path';
import { errnoName, MicrovmError, native } from '../lib';
import { addon, addonPath, packageRoot } from '../lib/native';

describe('native addon', () => {
  test('loads on a machine without libkrun, from this package', () => {
    const a = addon();
    expect(a.abiVersion).toBe(5);
    const loaded = addonPath();
    expect(loaded).toBeDefined();
    expect(path.relative(packageRoot, loaded as string).startsWith('..')).toBe(false);
    expect(native.addonPath()).toBe(loaded);
  });

  test('in a fresh process: loads with no libkrun mapped; the loader searches report none', () => {
    // A fresh process, because this one may have loaded the libkrun double in another test file.
    const script = `
      const m = require(${JSON.stringify(packageRoot)});
      const settle = (p) => p.then(() => ({ found: true }), (e) => ({ code: e.code, message: e.message }));
      Promise.all([
        settle(m.native.resolveRuntime({ pkgConfig: false, systemDirs: [], env: {} })),
        settle(m.native.resolveFirmware({ systemDirs: [], env: {} })),
      ]).then(([rt, fw]) => {
        const maps = require('fs').readFileSync('/proc/self/maps', 'utf8');
        console.log(JSON.stringify({ rt, fw, addon: m.native.addonPath(), libkrunMapped: maps.includes('libkrun') }));
      });`;
    const env = { ...process.env };
    delete env.LD_LIBRARY_PATH;
    const out = execFileSync(process.execPath, ['-e', script], { env, encoding: 'utf8' });
    type Settled = { code: string; message: string };
    const r = JSON.parse(out) as { rt: Settled; fw: Settled; addon: string; libkrunMapped: boolean };
    expect(r.rt.code).toBe('ERR_MICROVM_LIBKRUN_NOT_FOUND');
    expect(r.rt.message).toContain('libkrun.so.1 (dynamic loader search)');
    expect(r.fw.code).toBe('ERR_MICROVM_LIBKRUNFW_NOT_FOUND');
    expect(r.fw.message).toContain('libkrunfw.so.5 (dynamic loader search)');
    expect(r.addon).toMatch(/\.node$/);
    expect(r.libkrunMapped).toBe(false);
  });

  test('errno names match the errno numbers of this platform', () => {
    const table = os.constants.errno as Record<string, number>;
    const names = [
      'EPERM',
      'ENOENT',
      'EINTR',
      'EIO',
      'EBADF',
      'EAGAIN',
      'ENOMEM',
      'EACCES',
      'EBUSY',
      'EEXIST',
      'ENODEV',
      'ENOTDIR',
      'EINVAL',
      'ENOSPC',
      'ENOSYS',
      'ELOOP',
      'ENOTSUP',
      'EADDRINUSE',
      'ECONNREFUSED',
      'ETIMEDOUT',
      'ECANCELED',
    ];
    for (const name of names) {
      expect([name, errnoName(table[name])]).toEqual([name, name]);
      expect(errnoName(-table[name])).toBe(name);
    }
    expect(errnoName(4000)).toBe('EUNKNOWN');
  });

  test('errnoName validates its input', () => {
    expect(() => errnoName(1.5)).toThrow(RangeError);
    expect(() => errnoName('22' as unknown as number)).toThrow(TypeError);
  });

  test('MicrovmError carries a code and a cause', () => {
    const cause = new Error('inner');
    const e = new MicrovmError('ERR_MICROVM_X', 'outer', { cause });
    expect(e.code).toBe('ERR_MICROVM_X');
    expect(e.cause).toBe(cause);
    expect(e).toBeInstanceOf(Error);
  });
});
