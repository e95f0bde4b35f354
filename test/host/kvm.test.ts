/**
 * The KVM probe over fake host trees (cpuinfo, /sys/module, a device node), for the four host types
 * we must tell apart: hardware KVM, a PVM /dev/kvm, no /dev/kvm, and /dev/kvm without permission.
 * Device nodes are real (mknod of /dev/null's numbers): "opens read-write" is tested, not assumed.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { cpuFlags, decideAccel, probeKvm, readKvmVerdict, recordKvmVerdict } from '../../lib/host/kvm';
import { kvmCheck } from '../../lib/preflight/checks';
import { makeHost } from './fake-host';
import { scratch } from '../helpers';

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-kvm-');
});
afterEach(() => s.cleanup());

describe('probeKvm', () => {
  test('hardware KVM: device opens, CPU has vmx, kvm_intel loaded', () => {
    const host = makeHost(s.dir, { flags: 'fpu vme vmx sse2', modules: ['kvm', 'kvm_intel'] });
    expect(probeKvm(host)).toMatchObject({ kind: 'hardware', hardware: true, reason: expect.stringContaining('vmx') });
    const amd = makeHost(path.join(s.dir, 'amd'), { flags: 'fpu svm', modules: ['kvm', 'kvm_amd'] });
    expect(probeKvm(amd)).toMatchObject({ kind: 'hardware', hardware: true, reason: expect.stringContaining('svm') });
  });

  test('PVM: the device opens read-write, but kvm_pvm owns it and the CPU has no vmx/svm', () => {
    const host = makeHost(s.dir, { flags: 'fpu sse2 hypervisor', modules: ['kvm', 'kvm_pvm'] });
    const r = probeKvm(host);
    expect(r).toMatchObject({ kind: 'pvm', hardware: false });
    expect(r.reason).toBe(
      `${host.kvmDevice} is PVM software virtualization: hardware KVM unavailable; QEMU will use TCG (software emulation: slower, but it boots)`,
    );
  });

  test('a software /dev/kvm without the PVM module: no vmx/svm is still no hardware KVM', () => {
    const host = makeHost(s.dir, { flags: 'fpu sse2', modules: ['kvm'] });
    expect(probeKvm(host)).toMatchObject({
      kind: 'software',
      hardware: false,
      reason: expect.stringContaining('neither vmx nor svm'),
    });
  });

  test('no /dev/kvm, or a regular file in its place', () => {
    const host = makeHost(s.dir, { flags: 'vmx', modules: ['kvm_intel'], device: 'none' });
    expect(probeKvm(host)).toMatchObject({
      kind: 'absent',
      hardware: false,
      reason: expect.stringContaining('does not exist'),
    });
    fs.writeFileSync(host.kvmDevice, '');
    expect(probeKvm(host)).toMatchObject({ kind: 'not-a-device', hardware: false });
  });

  test('/dev/kvm without permission (probed as an unprivileged user)', () => {
    const host = makeHost(s.dir, { flags: 'vmx', modules: ['kvm_intel'] });
    fs.chmodSync(host.kvmDevice, 0o600);
    fs.chmodSync(s.dir, 0o755);
    if (process.getuid?.() !== 0) {
      // Not root: our own node; take the permission away from ourselves.
      fs.chmodSync(host.kvmDevice, 0o000);
      expect(probeKvm(host)).toMatchObject({ kind: 'no-access', hardware: false });
      return;
    }
    const script = `const { probeKvm } = require(${JSON.stringify(path.resolve(__dirname, '../../dist/host/kvm.js'))});
      process.stdout.write(JSON.stringify(probeKvm(${JSON.stringify(host)})));`;
    const r = spawnSync(process.execPath, ['-e', script], { uid: 65534, gid: 65534, encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(JSON.parse(r.stdout)).toMatchObject({
      kind: 'no-access',
      hardware: false,
      reason: expect.stringContaining('EACCES'),
      remediation: expect.stringContaining('group that owns'),
    });
  });

  test('cpuFlags reads the first flags line only', () => {
    expect([...cpuFlags('processor : 0\nflags\t\t: a vmx b\n\nprocessor : 1\nflags : svm\n')]).toEqual([
      'a',
      'vmx',
      'b',
    ]);
    expect(cpuFlags('no flags here').size).toBe(0);
  });
});

describe('decideAccel and the recorded verdict', () => {
  test('auto: KVM only for hardware; forced choices win; a verdict for this boot means TCG', () => {
    const hw = makeHost(s.dir, {
      flags: 'vmx',
      modules: ['kvm_intel'],
      bootId: '11111111-2222-3333-4444-555555555555',
    });
    const data = path.join(s.dir, 'data');
    expect(decideAccel('auto', { dataRoot: data, paths: hw })).toMatchObject({ accel: 'kvm', automatic: true });
    expect(decideAccel('tcg', { dataRoot: data, paths: hw })).toMatchObject({ accel: 'tcg', automatic: false });
    recordKvmVerdict(data, 'QEMU (accel kvm) was killed by SIGABRT', hw);
    expect(readKvmVerdict(data, hw)).toMatchObject({
      bootId: '11111111-2222-3333-4444-555555555555',
      reason: 'QEMU (accel kvm) was killed by SIGABRT',
    });
    expect((fs.statSync(path.join(data, 'kvm-verdict.json')).mode & 0o777).toString(8)).toBe('600');
    const after = decideAccel('auto', { dataRoot: data, paths: hw });
    expect(after).toMatchObject({
      accel: 'tcg',
      automatic: true,
      reason: expect.stringContaining('KVM failed to boot a VM on this host boot'),
    });
    expect(decideAccel('kvm', { dataRoot: data, paths: hw })).toMatchObject({ accel: 'kvm', automatic: false });
    // After a host reboot (another boot id) KVM is tried again.
    fs.writeFileSync(hw.bootId, '99999999-2222-3333-4444-555555555555\n');
    expect(readKvmVerdict(data, hw)).toBeUndefined();
    expect(decideAccel('auto', { dataRoot: data, paths: hw })).toMatchObject({ accel: 'kvm' });
  });

  test('auto on PVM or no /dev/kvm: TCG with the reason', () => {
    const pvm = makeHost(s.dir, { flags: 'sse2', modules: ['kvm_pvm'] });
    expect(decideAccel('auto', { paths: pvm })).toMatchObject({ accel: 'tcg', reason: expect.stringContaining('PVM') });
    const none = makeHost(path.join(s.dir, 'none'), { flags: 'vmx', modules: ['kvm_intel'], device: 'none' });
    expect(decideAccel('auto', { paths: none })).toMatchObject({
      accel: 'tcg',
      reason: expect.stringContaining('does not exist'),
    });
  });
});

describe('kvm preflight check', () => {
  test('passes only for hardware KVM and names the reason when it fails', () => {
    const pvm = makeHost(s.dir, { flags: 'sse2', modules: ['kvm_pvm'] });
    expect(kvmCheck(pvm).run()).toMatchObject({
      ok: false,
      message: expect.stringContaining('PVM software virtualization'),
      remediation: expect.stringContaining("backend 'qemu'"),
    });
    const hw = makeHost(path.join(s.dir, 'hw'), { flags: 'vmx', modules: ['kvm_intel'] });
    expect(kvmCheck(hw).run()).toMatchObject({ ok: true });
    expect(kvmCheck(path.join(s.dir, 'nope')).run()).toMatchObject({
      ok: false,
      message: expect.stringContaining('does not exist'),
    });
  });
});
