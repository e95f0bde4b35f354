/**
 * The MicroVM handle on its own, over a scripted BackendHandle (a TEST DOUBLE of a backend: the
 * handle's logic is what is under test; real backends are in the pipeline and e2e tests).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MicrovmError } from '../lib/errors';
import type { BackendHandle, VmExit } from '../lib/backends/types';
import { describeExit, MicroVM } from '../lib/vm';
import { scratch } from './helpers';

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-vm-');
});
afterEach(() => s.cleanup());

/** A backend handle whose process ends when told (or on the signals it does not ignore). */
function fakeHandle(ignore: NodeJS.Signals[] = []) {
  let end!: (e: VmExit) => void;
  const exited = new Promise<VmExit>((r) => (end = r));
  const sent: NodeJS.Signals[] = [];
  const handle: BackendHandle = {
    pid: 4242,
    executable: '/x',
    exited,
    kill: (sig) => {
      sent.push(sig);
      if (!ignore.includes(sig)) end({ reason: 'stopped', exitCode: null, signal: sig });
      return true;
    },
  };
  return { handle, sent, end };
}

function vmWith(handle: BackendHandle, onExit: Array<() => Promise<void>> = []): MicroVM {
  const dir = path.join(s.dir, 'vm');
  fs.mkdirSync(dir, { recursive: true });
  return new MicroVM(
    {
      id: 'id1',
      name: 'vm1',
      backend: 'fake',
      dataDir: dir,
      rootfsPath: '/r',
      cloneStrategy: 'copy',
      ports: [{ host: 8080, guest: 80 }],
      consoleLogPath: path.join(dir, 'console.log'),
      logPath: path.join(dir, 'vm.log'),
    },
    handle,
    onExit,
  );
}

describe('describeExit', () => {
  test('describeExit: one line per reason', () => {
    expect(describeExit({ reason: 'exited', exitCode: 7, signal: null })).toBe('the guest command exited with code 7');
    expect(describeExit({ reason: 'stopped', exitCode: null, signal: 'SIGINT' })).toBe('the VM was stopped by SIGINT');
    expect(
      describeExit({
        reason: 'failed',
        exitCode: null,
        signal: null,
        error: new MicrovmError('ERR_MICROVM_BOOT_FAILED', 'QEMU died'),
      }),
    ).toBe('the hypervisor failed: [ERR_MICROVM_BOOT_FAILED] QEMU died');
  });
});

describe('MicroVM', () => {
  test("status while running and after; the 'exit' event once, after the onExit clean-ups ran", async () => {
    const { handle, end } = fakeHandle();
    const order: string[] = [];
    const vm = vmWith(handle, [async () => void order.push('cleanup')]);
    vm.on('exit', (e) => order.push(`exit ${e.reason}`));
    expect(vm.status()).toEqual({
      state: 'running',
      backend: 'fake',
      pid: 4242,
      reason: undefined,
      exitCode: null,
      signal: null,
      error: undefined,
    });
    end({ reason: 'exited', exitCode: 0, signal: null });
    expect(await vm.wait()).toEqual({ reason: 'exited', exitCode: 0, signal: null });
    expect(order).toEqual(['cleanup', 'exit exited']);
    expect(vm.status()).toMatchObject({ state: 'exited', reason: 'exited', exitCode: 0, signal: null });
  });

  test('stop(): SIGTERM, and SIGKILL only when the VM outlives timeoutMs; once; not at all after the VM ended', async () => {
    const a = fakeHandle();
    const vmA = vmWith(a.handle);
    await Promise.all([vmA.stop(), vmA.stop({ timeoutMs: 10 })]);
    expect(a.sent).toEqual(['SIGTERM']);
    await vmA.stop();
    expect(a.sent).toEqual(['SIGTERM']);

    const b = fakeHandle(['SIGTERM']);
    const vmB = vmWith(b.handle);
    await vmB.stop({ timeoutMs: 50 });
    expect(b.sent).toEqual(['SIGTERM', 'SIGKILL']);
    expect(await vmB.wait()).toEqual({ reason: 'stopped', exitCode: null, signal: 'SIGKILL' });

    const c = fakeHandle();
    const vmC = vmWith(c.handle);
    c.end({ reason: 'exited', exitCode: 1, signal: null });
    await vmC.wait();
    await vmC.stop();
    expect(c.sent).toEqual([]);
  });

  test('stop() options are checked, naming the option', () => {
    const vm = vmWith(fakeHandle().handle);
    expect(() => vm.stop({ timeoutMs: -1 })).toThrow(
      'Expected an integer 0–3600000 for options.timeoutMs but received -1',
    );
    expect(() => vm.stop({ grace: 1 } as never)).toThrow(/grace/);
    expect(() => vm.stop(5 as never)).toThrow(/options/);
  });

  test('remove(): stops and deletes the data directory, even a read-only tree in it; twice is fine', async () => {
    const { handle, sent } = fakeHandle();
    const vm = vmWith(handle);
    fs.mkdirSync(path.join(vm.dataDir, 'rootfs', 'ro'), { recursive: true });
    fs.writeFileSync(path.join(vm.dataDir, 'rootfs', 'ro', 'f'), 'x');
    await vm.remove();
    expect(sent).toEqual(['SIGTERM']);
    expect(fs.existsSync(vm.dataDir)).toBe(false);
    await vm.remove();
  });

  test('exec() with neither agent nor ssh: ERR_MICROVM_AGENT_UNAVAILABLE saying why; port() for a forwarded guest port', async () => {
    const vm = vmWith(fakeHandle().handle);
    await expect(vm.exec('true')).rejects.toMatchObject({
      code: 'ERR_MICROVM_AGENT_UNAVAILABLE',
      message:
        'This VM has no guest agent (its backend, fake, provides none, or run() was given agent: false) and no SSH',
    });
    await expect(vm.spawn(['true'])).rejects.toMatchObject({ code: 'ERR_MICROVM_AGENT_UNAVAILABLE' });
    await expect(vm.readFile('/etc/hostname')).rejects.toMatchObject({ code: 'ERR_MICROVM_AGENT_UNAVAILABLE' });
    await expect(vm.readFile('etc/hostname')).rejects.toThrow('Expected an absolute guest path for guestPath');
    expect(vm.port(80)).toBe(8080);
    expect(() => vm.port(81)).toThrow(
      new MicrovmError('ERR_MICROVM_PORT_NOT_FORWARDED', 'vm1 forwards no host port to guest port 81 (forwarded: 80)'),
    );
    expect(() => vm.port(0)).toThrow('Expected an integer 1–65535 for guestPort but received 0');
  });
});
