/** The PVH ELF wrapper around libkrunfw's raw kernel, read back with readelf (binutils). */
import { execFile, execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { buildPvhElf, findPvhEntry, readFirmwareKernel, resolveFirmware, resolveQemuRuntime } from '../../lib';
import { pvhKernelFor } from '../../lib/backends/qemu/kernel';
import { firmwareDir, firmwarePath, scratch } from '../helpers';
import { makeHost } from '../host/fake-host';

describe('PVH kernel', () => {
  test('finds the Xen PVH entry note in the real libkrunfw kernel', async () => {
    const { kernel, loadAddress } = await readFirmwareKernel(firmwarePath());
    const entry = findPvhEntry(kernel);
    expect(entry).toBeDefined();
    expect(entry as number).toBeGreaterThanOrEqual(loadAddress);
    expect(entry as number).toBeLessThan(loadAddress + kernel.length);
  });

  test('a synthetic image: the note (descsz 8) is found; none means undefined', () => {
    const img = Buffer.alloc(4096);
    const at = 1000;
    img.writeUInt32LE(4, at);
    img.writeUInt32LE(8, at + 4);
    img.writeUInt32LE(18, at + 8);
    img.write('Xen\0', at + 12, 'latin1');
    img.writeBigUInt64LE(0x1234567n, at + 16);
    expect(findPvhEntry(img)).toBe(0x1234567);
    img.writeUInt32LE(17, at + 8); // another note type
    expect(findPvhEntry(img)).toBeUndefined();
  });

  test('the ELF has one PT_LOAD at the load address with the kernel bytes, and the PVH note', () => {
    const s = scratch();
    try {
      const kernel = Buffer.alloc(10000, 0xab);
      const elf = buildPvhElf(kernel, 0x1000000, 0x1000123);
      const file = path.join(s.dir, 'k.elf');
      fs.writeFileSync(file, elf);
      const headers = execFileSync('readelf', ['-lnW', file], { encoding: 'utf8' });
      expect(headers).toMatch(/Entry point 0x1000123/);
      expect(headers).toMatch(/LOAD\s+0x001000 0x0000000001000000 0x0000000001000000 0x002710 0x002710 RWE/);
      // The note's name and size from readelf (how it names type 18 depends on the binutils
      // version), its type and entry from our own reader.
      expect(headers).toMatch(/Xen\s+0x00000004\s+\S/);
      expect(findPvhEntry(elf)).toBe(0x1000123);
      expect(elf.subarray(0x1000).equals(kernel)).toBe(true);
    } finally {
      s.cleanup();
    }
  });

  test('pvhKernelFor caches one file per firmware', async () => {
    const s = scratch();
    try {
      const fw = await resolveFirmware({ dir: firmwareDir(), systemDirs: [], loaderSearch: false });
      const a = await pvhKernelFor(fw, s.dir);
      const mtime = fs.statSync(a).mtimeMs;
      const b = await pvhKernelFor(fw, s.dir);
      expect(b).toBe(a);
      expect(fs.statSync(b).mtimeMs).toBe(mtime);
      expect(fs.readdirSync(s.dir)).toEqual([path.basename(a)]);
      expect(fs.statSync(a).size).toBeGreaterThan(fw.kernelSize);
    } finally {
      s.cleanup();
    }
  });

  test('concurrent first starts: 8 calls here and 3 other processes at once get one whole kernel, nothing left over', async () => {
    const s = scratch();
    try {
      const fw = await resolveFirmware({ dir: firmwareDir(), systemDirs: [], loaderSearch: false });
      // Other processes racing this one for the same file (through the compiled module).
      const script = `const { pvhKernelFor } = require(${JSON.stringify(path.join(__dirname, '..', '..', 'dist', 'backends', 'qemu', 'kernel.js'))});
        pvhKernelFor(JSON.parse(process.argv[1]), process.argv[2]).then((f) => process.stdout.write(f), (e) => { console.error(e); process.exit(1); });`;
      const others = [0, 1, 2].map(
        () =>
          new Promise<string>((resolve, reject) =>
            execFile(process.execPath, ['-e', script, JSON.stringify(fw), s.dir], (err, stdout, stderr) =>
              err ? reject(new Error(`${err.message}: ${stderr}`)) : resolve(stdout),
            ),
          ),
      );
      const here = await Promise.all(Array.from({ length: 8 }, () => pvhKernelFor(fw, s.dir)));
      const all = [...here, ...(await Promise.all(others))];
      expect(new Set(all).size).toBe(1);
      // One kernel, no temporary file or lock left behind, and a whole one (its size and entry).
      expect(fs.readdirSync(s.dir)).toEqual([path.basename(all[0])]);
      const elf = fs.readFileSync(all[0]);
      expect(elf.length).toBeGreaterThan(fw.kernelSize);
      expect(findPvhEntry(elf)).toBeDefined();
    } finally {
      s.cleanup();
    }
  }, 120_000);
});

describe('QEMU runtime resolution', () => {
  test('a missing QEMU or virtiofsd names the package to install', () => {
    expect(() => resolveQemuRuntime({ qemuPath: '/nonexistent/qemu' })).toThrow(
      expect.objectContaining({
        code: 'ERR_MICROVM_QEMU_NOT_FOUND',
        message: expect.stringContaining('apt-get install qemu-system-x86'),
      }),
    );
    expect(() => resolveQemuRuntime({ virtiofsdPath: '/nonexistent/virtiofsd', qemuPath: '/bin/true' })).toThrow(
      expect.objectContaining({ code: 'ERR_MICROVM_VIRTIOFSD_NOT_FOUND' }),
    );
  });

  test('accel can be forced; auto is KVM only on hardware KVM (never a PVM /dev/kvm); kvm on a host without /dev/kvm is a coded error', () => {
    const s = scratch();
    try {
      const tools = { qemuPath: '/bin/true', virtiofsdPath: '/bin/true' };
      const pvm = makeHost(path.join(s.dir, 'pvm'), { flags: 'fpu sse2 hypervisor', modules: ['kvm', 'kvm_pvm'] });
      const hw = makeHost(path.join(s.dir, 'hw'), { flags: 'fpu vmx', modules: ['kvm', 'kvm_intel'] });
      const none = makeHost(path.join(s.dir, 'none'), {
        flags: 'fpu vmx',
        modules: ['kvm', 'kvm_intel'],
        device: 'none',
      });
      expect(resolveQemuRuntime({ ...tools, hostProbe: hw, accel: 'tcg' })).toMatchObject({
        accel: 'tcg',
        automatic: false,
      });
      expect(resolveQemuRuntime({ ...tools, hostProbe: pvm })).toMatchObject({
        accel: 'tcg',
        automatic: true,
        reason: expect.stringContaining('PVM'),
      });
      expect(resolveQemuRuntime({ ...tools, hostProbe: hw })).toMatchObject({ accel: 'kvm', automatic: true });
      expect(resolveQemuRuntime({ ...tools, hostProbe: pvm, accel: 'kvm' })).toMatchObject({
        accel: 'kvm',
        automatic: false,
      });
      expect(() => resolveQemuRuntime({ ...tools, hostProbe: none, accel: 'kvm' })).toThrow(
        expect.objectContaining({ code: 'ERR_MICROVM_KVM_UNAVAILABLE' }),
      );
      expect(() => resolveQemuRuntime({ ...tools, accel: 'fast' as 'kvm' })).toThrow(
        expect.objectContaining({ code: 'ERR_MICROVM_INVALID_ACCEL', message: expect.stringContaining('accel') }),
      );
      const env = process.env.MICROVM_ACCEL;
      process.env.MICROVM_ACCEL = 'tcg';
      try {
        expect(resolveQemuRuntime({ ...tools, hostProbe: hw })).toMatchObject({
          accel: 'tcg',
          reason: 'TCG requested',
        });
      } finally {
        if (env === undefined) delete process.env.MICROVM_ACCEL;
        else process.env.MICROVM_ACCEL = env;
      }
    } finally {
      s.cleanup();
    }
  });
});
