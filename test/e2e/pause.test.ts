/**
 * Pause and resume (lib/pause.ts) on real QEMU boots under TCG: the guest's vCPUs stop and its
 * state is kept (a counter the command prints carries on without a gap), new agent requests on a
 * paused VM fail at once with a code, the backend's watcher leaves a requested pause alone (it ends
 * a guest that stops unasked), the CLI pauses a VM another process started, and stop works on a
 * paused VM. On libkrun (the recording double) pause is refused with a code, before anything changes.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { libkrunBackend, run } from '../../lib';
import { QmpClient } from '../../lib/backends/qemu/qmp';
import { doubleDir, firmwareDir, qemuRunArgs, qemuSkipReason, runCli, scratch } from '../helpers';

process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;
const layout = process.env.MICROVM_TEST_LAYOUT;
const skip = qemuSkipReason();
const cliSkip = skip ?? (layout ? undefined : 'no test layout (MICROVM_TEST_LAYOUT)');

/** A command that prints 1, 2, 3, ... every 50 ms. */
const COUNTER = ['/bin/sh', '-c', 'i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done'];

async function until(what: string, check: () => boolean, ms = 60000): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A VM on the QEMU backend whose command sleeps. */
const sleeper = () =>
  run('test-image', {
    rootfsPath: process.env.MICROVM_TEST_IMAGE,
    dataDir: path.join(s.dir, 'data'),
    backend: 'qemu',
    initOverride: ['/bin/sleep', '600'],
  });

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The numbers a counter printed so far (the last line may be cut). */
function counted(file: string): number[] {
  const lines = fs.readFileSync(file, 'utf8').split('\n');
  lines.pop();
  return lines.map(Number);
}

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-pause-');
});
afterEach(() => s.cleanup());

(skip ? describe.skip : describe)(`pause and resume on QEMU${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  test('the guest stops and carries on where it was; exec while paused is ERR_MICROVM_VM_PAUSED; spans', async () => {
    const exporter = new InMemorySpanExporter();
    const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
    const vm = await run('test-image', {
      name: 'p1',
      rootfsPath: process.env.MICROVM_TEST_IMAGE,
      dataDir: path.join(s.dir, 'data'),
      backend: 'qemu',
      initOverride: COUNTER,
      tracerProvider: provider,
    });
    try {
      const out = vm.stdoutPath as string;
      await until('the counter', () => counted(out).length >= 5);
      await vm.pause();
      expect(vm.status().state).toBe('paused');
      await vm.pause(); // pausing a paused VM does nothing
      // What was in flight lands; then nothing more while paused (the watcher did not end it either).
      await sleep(500);
      const frozen = counted(out);
      await sleep(1500);
      expect(counted(out)).toEqual(frozen);
      expect(vm.status().state).toBe('paused');
      await expect(vm.exec(['true'])).rejects.toMatchObject({ code: 'ERR_MICROVM_VM_PAUSED' });
      await expect(vm.readFile('/etc/hostname')).rejects.toMatchObject({ code: 'ERR_MICROVM_VM_PAUSED' });

      await vm.resume();
      expect(vm.status().state).toBe('running');
      await until('the counter to carry on', () => counted(out).length >= frozen.length + 5);
      const all = counted(out);
      expect(all).toEqual(all.map((_, i) => i + 1)); // no gap, no restart: the guest's state was kept
      expect((await vm.exec(['echo', 'after'])).stdout).toBe('after\n');
    } finally {
      await vm.remove();
    }
    const spans = exporter.getFinishedSpans().filter((x) => x.name === 'microvm.Pause' || x.name === 'microvm.Resume');
    expect(spans.map((x) => x.name)).toEqual(['microvm.Pause', 'microvm.Pause', 'microvm.Resume']);
    for (const sp of spans) expect(sp.attributes).toMatchObject({ 'microvm.name': 'p1', 'microvm.backend': 'qemu' });
  }, 180_000);

  test('stop on a paused VM ends it; pause on an ended VM is ERR_MICROVM_VM_NOT_RUNNING', async () => {
    const vm = await sleeper();
    try {
      await vm.pause();
      const started = Date.now();
      await vm.stop();
      expect(await vm.wait()).toMatchObject({ reason: 'stopped' });
      expect(Date.now() - started).toBeLessThan(30_000);
      expect(vm.status().state).toBe('exited');
      await expect(vm.pause()).rejects.toMatchObject({ code: 'ERR_MICROVM_VM_NOT_RUNNING' });
      await expect(vm.resume()).rejects.toMatchObject({ code: 'ERR_MICROVM_VM_NOT_RUNNING' });
    } finally {
      await vm.remove();
    }
  }, 180_000);

  test('a guest stopped by someone else (QMP stop, no pause asked for) is still ended as a failure', async () => {
    const vm = await sleeper();
    try {
      const qmp = await QmpClient.connect(path.join(vm.dataDir, 'control.sock'));
      await qmp.execute('stop');
      qmp.close();
      const exit = await vm.wait();
      expect(exit).toMatchObject({ reason: 'failed', error: { code: 'ERR_MICROVM_HYPERVISOR_FAILED' } });
    } finally {
      await vm.remove();
    }
  }, 180_000);
});

(cliSkip ? describe.skip : describe)(`microvm pause / unpause${cliSkip ? ` [skipped: ${cliSkip}]` : ''}`, () => {
  test('a detached VM: pause, ps and inspect say paused, exec is refused with the code, unpause, exec works', () => {
    const started = runCli([...qemuRunArgs(layout, s.dir), '--name', 'cp1', '--detach', '--', ...COUNTER]);
    expect(started).toMatchObject({ code: 0 });
    try {
      expect(runCli(['pause', 'cp1', '--data-dir', s.dir])).toMatchObject({ code: 0, stdout: 'cp1\n' });
      expect(runCli(['ps', '--data-dir', s.dir]).stdout).toMatch(/^cp1\s+paused\s/m);
      const info = JSON.parse(runCli(['inspect', 'cp1', '--data-dir', s.dir]).stdout) as { paused: boolean }[];
      expect(info[0].paused).toBe(true);
      const refused = runCli(['exec', 'cp1', '--data-dir', s.dir, '--', 'true']);
      expect(refused.code).toBe(1);
      expect(refused.stderr).toContain('ERR_MICROVM_VM_PAUSED');
      expect(runCli(['unpause', 'cp1', '--data-dir', s.dir, '--json'])).toMatchObject({
        code: 0,
        stdout: '[{"name":"cp1","paused":false}]\n',
      });
      expect(runCli(['ps', '--data-dir', s.dir]).stdout).toMatch(/^cp1\s+running\s/m);
      expect(runCli(['exec', 'cp1', '--data-dir', s.dir, '--', 'echo', 'back'])).toMatchObject({
        code: 0,
        stdout: 'back\n',
      });
      const missing = runCli(['pause', 'nope', '--data-dir', s.dir]);
      expect(missing.code).toBe(1);
      expect(missing.stderr).toContain('ERR_MICROVM_VM_NOT_FOUND');
    } finally {
      runCli(['rm', '-f', 'cp1', '--data-dir', s.dir]);
    }
  }, 240_000);
});

describe('pause on libkrun (recording double)', () => {
  const noImage = !process.env.MICROVM_TEST_IMAGE || !fs.existsSync(process.env.MICROVM_TEST_IMAGE);
  (noImage ? test.skip : test)(
    `ERR_MICROVM_SNAPSHOT_UNSUPPORTED naming the reason; the VM keeps running${noImage ? ' [skipped: no test image]' : ''}`,
    async () => {
      const vm = await run('krun-pause', {
        rootfsPath: process.env.MICROVM_TEST_IMAGE,
        dataDir: path.join(s.dir, 'data'),
        initOverride: ['/bin/sleep', '600'],
        preflight: [],
        agent: false,
        backend: libkrunBackend({
          runtime: { libDir: doubleDir(), pkgConfig: false, systemDirs: [], loaderSearch: false },
          firmware: { dir: firmwareDir(), systemDirs: [], loaderSearch: false },
          env: { PATH: process.env.PATH as string },
        }),
      });
      try {
        const err = (await vm.pause().catch((e: unknown) => e)) as Error & { code?: string };
        expect(err.code).toBe('ERR_MICROVM_SNAPSHOT_UNSUPPORTED');
        expect(err.message).toMatch(/libkrun/);
        await expect(vm.resume()).rejects.toMatchObject({ code: 'ERR_MICROVM_SNAPSHOT_UNSUPPORTED' });
        expect(vm.status().state).toBe('running');
        expect(fs.existsSync(path.join(vm.dataDir, 'paused'))).toBe(false);
      } finally {
        await vm.remove();
      }
    },
    60_000,
  );
});
