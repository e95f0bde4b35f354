/**
 * Real VMs: the QEMU backend boots Debian's libkrunfw kernel (TCG here: no KVM) on a virtio-fs
 * root cloned from a busybox-static + dropbear image, with the guest init built by this project.
 * These must run in CI; they skip only when QEMU or the image tools are missing, and say which.
 */
import { spawn } from 'node:child_process';
import { getEventListeners } from 'node:events';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SpanStatusCode } from '@opentelemetry/api';
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  type ReadableSpan,
  SimpleSpanProcessor,
} from '@opentelemetry/sdk-trace-base';
import { hooks, type MicroVM, run, type RunOptions, SPAN } from '../../lib';
import { decideAccel } from '../../lib/host/kvm';
import { packageRoot } from '../../lib/native';
import { alive, firmwareDir, layoutSkipReason, qemuSkipReason, scratch } from '../helpers';

const skip = qemuSkipReason();

let s: ReturnType<typeof scratch>;
const vms: MicroVM[] = [];
beforeEach(() => {
  s = scratch('microvm-e2e-');
});
afterEach(async () => {
  for (const vm of vms.splice(0)) await vm.remove().catch(() => undefined);
  s.cleanup();
});

const DROPBEAR = ['/usr/sbin/dropbear', '-F', '-E', '-r', '/etc/dropbear/dropbear_ed25519_host_key', '-p', '22'];
const base = (extra: RunOptions = {}): RunOptions => ({
  rootfsPath: process.env.MICROVM_TEST_IMAGE,
  backend: 'qemu',
  dataDir: path.join(s.dir, 'data'),
  ...extra,
});
process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;

(skip ? describe.skip : describe)(`QEMU backend, real VMs${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  test('a command as the VM init: stdout and stderr apart from the console, byte for byte, and its exit code from wait()', async () => {
    const vm = await run(
      'test-image',
      base({ initOverride: ['/bin/sh', '-c', 'echo hi; echo oops >&2; printf "a\\r\\nb"; exit 3'] }),
    );
    vms.push(vm);
    expect(vm.backend).toBe('qemu');
    expect(await vm.wait()).toEqual({ reason: 'exited', exitCode: 3, signal: null });
    expect(fs.readFileSync(vm.stdoutPath as string, 'utf8')).toBe('hi\na\r\nb'); // no tty: no CR added, no kernel lines
    expect(fs.readFileSync(vm.stderrPath as string, 'utf8')).toBe('oops\n');
    expect(vm.status()).toMatchObject({ state: 'exited', reason: 'exited', exitCode: 3, backend: 'qemu' });
  });

  test('cpus: the guest gets the vCPUs asked for, under TCG as under KVM', async () => {
    const vm = await run('test-image', base({ cpus: 2, initOverride: ['/bin/sleep', '600'] }));
    vms.push(vm);
    expect((await vm.exec(['nproc'])).stdout).toBe('2\n');
  });

  test('SSH end to end with the complete span tree of a real boot', async () => {
    const caller = new AbortController();
    const exporter = new InMemorySpanExporter();
    const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
    const vm = await run(
      'test-image',
      base({
        initOverride: DROPBEAR,
        ssh: { timeoutMs: 60000 },
        rootfsHooks: [hooks.injectFile('/etc/from-hook', 'written by a rootfs hook\n')],
        tracerProvider: provider,
        signal: caller.signal,
      }),
    );
    vms.push(vm);
    // No listener stays on the caller's signal once run() has resolved (an app-wide signal).
    expect(getEventListeners(caller.signal, 'abort')).toHaveLength(0);
    const uname = await vm.exec('uname -a');
    expect(uname).toMatchObject({ exitCode: 0 });
    expect(uname.stdout).toMatch(/^Linux microvm .* x86_64/);
    expect((await vm.exec('cat /etc/from-hook')).stdout).toBe('written by a rootfs hook\n');
    expect(await vm.exec('exit 7')).toMatchObject({ exitCode: 7 });
    await vm.stop();

    const spans = exporter.getFinishedSpans();
    const one = (name: string): ReadableSpan => {
      const l = spans.filter((x) => x.name === name);
      expect([name, l.length]).toEqual([name, 1]);
      return l[0];
    };
    const id = (x: ReadableSpan): string => x.spanContext().spanId;
    const parent = (x: ReadableSpan): string | undefined => x.parentSpanContext?.spanId;
    const root = one(SPAN.RUN);
    for (const stage of [
      SPAN.PREFLIGHT,
      SPAN.IMAGE_PULL,
      SPAN.ROOTFS_CLONE,
      SPAN.ROOTFS_HOOKS,
      SPAN.BACKEND_PREPARE,
      SPAN.NETWORK_START,
      SPAN.VM_SPAWN,
      SPAN.POST_BOOT,
    ]) {
      expect([stage, parent(one(stage))]).toEqual([stage, id(root)]);
    }
    expect(parent(one(SPAN.PREFLIGHT_RUN_ALL))).toBe(id(one(SPAN.PREFLIGHT)));
    expect(
      spans.filter((x) => x.name === SPAN.PREFLIGHT_CHECK).every((x) => parent(x) === id(one(SPAN.PREFLIGHT_RUN_ALL))),
    ).toBe(true);
    expect(parent(one(SPAN.BACKEND_START))).toBe(id(one(SPAN.VM_SPAWN)));
    expect(parent(one(SPAN.BACKEND_RESOLVE_RUNTIME))).toBe(id(one(SPAN.BACKEND_START)));
    expect(parent(one(SPAN.BACKEND_RESOLVE_FIRMWARE))).toBe(id(one(SPAN.BACKEND_START)));
    const wait = one(SPAN.SSH_WAIT_READY);
    expect(parent(wait)).toBe(id(one(SPAN.POST_BOOT)));
    expect(wait.attributes).toMatchObject({ 'ssh.host': '127.0.0.1', 'ssh.user': 'root' });
    const probes = wait.attributes['ssh.probes_total'] as number;
    expect(probes).toBeGreaterThanOrEqual(1);
    expect(wait.events.filter((e) => e.name === 'ssh.probe_failed')).toHaveLength(probes - 1);
    expect(root.attributes).toMatchObject({ 'microvm.image': 'test-image', 'microvm.backend': 'qemu' });
    expect(spans.every((x) => x.status.code !== SpanStatusCode.ERROR)).toBe(true);
  });

  test('boots from an OCI image layout: pulled, unpacked, its config (Env) applied', async () => {
    if (!process.env.MICROVM_TEST_LAYOUT) throw new Error(layoutSkipReason());
    const caller = new AbortController();
    const exporter = new InMemorySpanExporter();
    const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
    const vm = await run(`oci:${process.env.MICROVM_TEST_LAYOUT}:test`, {
      backend: 'qemu',
      dataDir: path.join(s.dir, 'data'),
      initOverride: [
        '/bin/sh',
        '-c',
        'cat /etc/layer2; echo "GREETING=$GREETING"; test -e /etc/motd || echo whiteout-applied; exit 4',
      ],
      tracerProvider: provider,
      signal: caller.signal,
    });
    vms.push(vm);
    expect(getEventListeners(caller.signal, 'abort')).toHaveLength(0);
    expect(await vm.wait()).toMatchObject({ reason: 'exited', exitCode: 4 });
    const out = fs.readFileSync(vm.stdoutPath as string, 'utf8');
    expect(out).toContain('from layer 2');
    expect(out).toContain('GREETING=from-image');
    expect(out).toContain('whiteout-applied');
    const spans = exporter.getFinishedSpans();
    const pullSpan = spans.find((x) => x.name === SPAN.IMAGE_PULL) as ReadableSpan;
    for (const name of [SPAN.IMAGE_CACHE_LOOKUP, SPAN.IMAGE_FETCH, SPAN.IMAGE_EXTRACT, SPAN.IMAGE_CACHE_STORE]) {
      expect([name, spans.find((x) => x.name === name)?.parentSpanContext?.spanId]).toEqual([
        name,
        pullSpan.spanContext().spanId,
      ]);
    }
  });

  test("waitFor tcp on a guest port nothing listens on: QEMU's user network accepts on the host side, the wait still times out (ERR_MICROVM_WAIT_TIMEOUT), nothing left", async () => {
    const err = await run(
      'test-image',
      base({
        name: 'nolisten',
        initOverride: ['/bin/sh', '-c', 'sleep 600'],
        ports: [{ host: 0, guest: 9999 }],
        waitFor: { tcp: 9999, timeoutMs: 4000 },
      }),
    ).catch((e: unknown) => e);
    expect(err).toMatchObject({
      code: 'ERR_MICROVM_WAIT_TIMEOUT',
      message: expect.stringContaining('guest port 9999 of nolisten was not ready within 4000 ms'),
    });
    // What the last attempt saw (QEMU's user network closes or resets it: its words, not ours).
    expect((err as Error).message).toMatch(/; last: \S/);
    expect(fs.existsSync(path.join(s.dir, 'data', 'vms', 'nolisten'))).toBe(false);
  });

  test("guest timers work (sleep returns; uptime advances) with TCG's boot options on the kernel command line", async () => {
    const vm = await run(
      'test-image',
      base({
        initOverride: [
          '/bin/sh',
          '-c',
          'cat /proc/cmdline; a=$(cut -d. -f1 /proc/uptime); sleep 2; b=$(cut -d. -f1 /proc/uptime); echo "slept $((b - a))"; exit 0',
        ],
      }),
    );
    vms.push(vm);
    expect(await vm.wait()).toMatchObject({ reason: 'exited', exitCode: 0 });
    const [cmdline, slept] = fs.readFileSync(vm.stdoutPath as string, 'utf8').split('\n');
    // Whole seconds of uptime around a 2 s sleep: at least 2 (more on a busy host; never a hang).
    expect(Number(/^slept (\d+)$/.exec(slept)?.[1])).toBeGreaterThanOrEqual(2);
    // Under TCG only: the boot-time savings (lib/backends/qemu/index.ts); a KVM guest keeps defaults.
    const tcg = decideAccel('auto', { dataRoot: path.join(s.dir, 'data') }).accel === 'tcg';
    for (const opt of ['mitigations=off', 'nolapic_timer', 'noreplace-smp'])
      expect(cmdline.split(' ').includes(opt)).toBe(tcg);
  });

  test("the guest's resolver: QEMU's where the image names none, the image's own kept", async () => {
    const [none, own] = await Promise.all([
      run('test-image', base({ name: 'none', initOverride: ['/bin/cat', '/etc/resolv.conf'] })),
      run(
        'test-image',
        base({
          name: 'own',
          initOverride: ['/bin/cat', '/etc/resolv.conf'],
          rootfsHooks: [hooks.injectFile('/etc/resolv.conf', 'nameserver 192.0.2.53\n')],
        }),
      ),
    ]);
    vms.push(none, own);
    await Promise.all([none.wait(), own.wait()]);
    expect(fs.readFileSync(none.stdoutPath as string, 'utf8')).toBe('nameserver 10.0.2.3\n');
    expect(fs.readFileSync(own.stdoutPath as string, 'utf8')).toBe('nameserver 192.0.2.53\n');
  });

  test('two VMs at once', async () => {
    const [a, b] = await Promise.all([
      run('test-image', base({ name: 'a', initOverride: ['/bin/sh', '-c', 'echo I am a; exit 5'] })),
      run('test-image', base({ name: 'b', initOverride: ['/bin/sh', '-c', 'echo I am b; exit 6'] })),
    ]);
    vms.push(a, b);
    expect((await Promise.all([a.wait(), b.wait()])).map((x) => x.exitCode)).toEqual([5, 6]);
    expect(fs.readFileSync(a.stdoutPath as string, 'utf8')).toBe('I am a\n');
    expect(fs.readFileSync(b.stdoutPath as string, 'utf8')).toBe('I am b\n');
  });

  test('kill -9 of the process that owns a VM leaves no QEMU or virtiofsd behind', async () => {
    const dataDir = path.join(s.dir, 'owned');
    const script = `
      process.env.MICROVM_LIBKRUNFW_DIR = ${JSON.stringify(firmwareDir())};
      const m = require(${JSON.stringify(packageRoot)});
      m.run('test-image', { rootfsPath: ${JSON.stringify(process.env.MICROVM_TEST_IMAGE)}, backend: 'qemu', dataDir: ${JSON.stringify(dataDir)},
                            initOverride: ['/bin/sh', '-c', 'sleep 600'] })
        .then((vm) => console.log(vm.pid), (e) => { console.error(e); process.exit(1); });`;
    const owner = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    const pid = await new Promise<number>((resolve, reject) => {
      owner.stdout.once('data', (d: Buffer) => resolve(Number(String(d).trim())));
      owner.once('exit', (code) => reject(new Error(`owner exited early with ${String(code)}`)));
    });
    const related = (): number[] =>
      fs
        .readdirSync('/proc')
        .filter((d) => /^\d+$/.test(d))
        .map(Number)
        .filter((p) => {
          try {
            return fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(dataDir);
          } catch {
            return false;
          }
        });
    expect(alive(pid)).toBe(true);
    expect(related().length).toBeGreaterThanOrEqual(2); // QEMU and virtiofsd
    owner.kill('SIGKILL');
    for (let i = 0; i < 200 && related().length > 0; i++) await new Promise((r) => setTimeout(r, 25));
    expect(related()).toEqual([]);
  });
});
