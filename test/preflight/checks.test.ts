/** The built-in preflight checks one by one: each passes where it should and fails, saying why and what to do. */
import { spawnSync } from 'node:child_process';
import * as net from 'node:net';
import * as path from 'node:path';
import { diskSpaceCheck, kvmCheck, memoryCheck, portsCheck, resourcesCheck, userNamespacesCheck } from '../../lib';
import { probeCheck } from '../../lib/preflight/checks';
import { makeHost } from '../host/fake-host';
import { scratch } from '../helpers';

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-checks-');
});
afterEach(() => s.cleanup());

test('kvm: passes on hardware KVM; fails on a PVM /dev/kvm and without /dev/kvm, naming the reason and the QEMU way out', async () => {
  const hw = makeHost(path.join(s.dir, 'hw'), { flags: 'fpu vmx sse2', modules: ['kvm', 'kvm_intel'] });
  const pvm = makeHost(path.join(s.dir, 'pvm'), { flags: 'fpu sse2 hypervisor', modules: ['kvm', 'kvm_pvm'] });
  const none = makeHost(path.join(s.dir, 'none'), { flags: 'fpu vmx', modules: [], device: 'none' });
  expect(kvmCheck(hw)).toMatchObject({ name: 'kvm', required: true });
  expect(await kvmCheck(hw).run()).toMatchObject({ ok: true });
  expect(await kvmCheck(pvm).run()).toMatchObject({
    ok: false,
    message: expect.stringContaining('PVM'),
    remediation: expect.stringContaining("backend 'qemu'"),
  });
  expect(await kvmCheck(none).run()).toMatchObject({ ok: false, message: expect.stringContaining('does not exist') });
});

test('memory (required): at most the host memory passes; more fails with the limit in the fix', async () => {
  const host = 1024 * 1024 ** 2;
  expect(memoryCheck(512, host)).toMatchObject({ name: 'memory', required: true });
  expect(await memoryCheck(1024, host).run()).toEqual({ ok: true });
  expect(await memoryCheck(1025, host).run()).toMatchObject({
    ok: false,
    message: '1025 MiB of guest memory requested, the host has 1024 MiB of physical memory',
    remediation: expect.stringContaining('at most 1024'),
  });
});

test('disk-space (advisory): measures the nearest existing ancestor; fails below the minimum with what is free', async () => {
  const future = path.join(s.dir, 'not', 'yet', 'made');
  expect(diskSpaceCheck(future, 1)).toMatchObject({ name: 'disk-space', required: false });
  expect(await diskSpaceCheck(future, 1).run()).toEqual({ ok: true });
  expect(await diskSpaceCheck(future, Number.MAX_SAFE_INTEGER).run()).toMatchObject({
    ok: false,
    message: expect.stringMatching(/^only \d+ MiB free in /),
    remediation: expect.stringContaining('dataDir'),
  });
});

test('resources (advisory): more vCPUs than the host has fails, naming both numbers', async () => {
  expect(await resourcesCheck(1, 1).run()).toEqual({ ok: true });
  const r = await resourcesCheck(100000, 1).run();
  expect(r).toMatchObject({ ok: false, message: expect.stringMatching(/^100000 vCPUs requested, host has \d+$/) });
});

test('ports (required): a port someone listens on fails, naming the holder; free ports pass', async () => {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
  const busy = (srv.address() as net.AddressInfo).port;
  try {
    const r = await portsCheck([busy]).run();
    expect(r).toMatchObject({ ok: false, message: expect.stringContaining(`${busy} (held by `) });
    expect(r.message).toContain(`pid ${process.pid}`);
  } finally {
    await new Promise((r) => srv.close(r));
  }
  expect(await portsCheck([busy]).run()).toEqual({ ok: true });
  expect(await portsCheck([]).run()).toEqual({ ok: true });
});

test('user-namespaces (advisory): agrees with what unshare(1) can do on this host', async () => {
  const can = spawnSync('unshare', ['-U', 'true']).status === 0;
  const r = await userNamespacesCheck().run();
  expect(r.ok).toBe(can);
});

test('probeCheck: a probe that throws is a failure with its first line and the remediation', async () => {
  const bad = probeCheck('thing', 'a thing', 'install the thing', async () => {
    throw new Error('thing missing\nstack-ish detail');
  });
  expect(await bad.run()).toEqual({ ok: false, message: 'thing missing', remediation: 'install the thing' });
  expect(await probeCheck('ok', 'ok', 'x', async () => 1).run()).toEqual({ ok: true });
});
