/**
 * run() end to end over the libkrun RECORDING ABI TEST DOUBLE (the runner is a real process whose
 * "VM" runs until SIGTERM) with Debian's real libkrunfw, spans captured by the OTel SDK.
 */
import { getEventListeners } from 'node:events';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SpanStatusCode, trace } from '@opentelemetry/api';
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  type ReadableSpan,
  SimpleSpanProcessor,
} from '@opentelemetry/sdk-trace-base';
import { type Backend, hooks, libkrunBackend, type MicroVM, run, type RunOptions, SPAN } from '../../lib';
import { AGENT_VSOCK_PORT } from '../../lib/backends/libkrun';
import { alive, doubleDir, firmwareDir, readCalls, scratch } from '../helpers';

let s: ReturnType<typeof scratch>;
let exporter: InMemorySpanExporter;
let provider: BasicTracerProvider;
let calls: string;
const started: MicroVM[] = [];

/** A small image tree: /etc/passwd, /root (0700), /bin/sh as a file. */
function makeImage(dir: string): string {
  const img = path.join(dir, 'image');
  if (fs.existsSync(img)) return img;
  fs.mkdirSync(path.join(img, 'etc'), { recursive: true });
  fs.mkdirSync(path.join(img, 'root'), { mode: 0o700 });
  fs.mkdirSync(path.join(img, 'bin'));
  fs.writeFileSync(path.join(img, 'etc', 'passwd'), 'root:x:0:0:root:/root:/bin/sh\n');
  fs.writeFileSync(path.join(img, 'etc', 'hostname'), 'image\n');
  fs.writeFileSync(path.join(img, 'bin', 'sh'), '#!fake\n', { mode: 0o755 });
  return img;
}

function options(extra: RunOptions = {}): RunOptions {
  return {
    rootfsPath: makeImage(s.dir),
    dataDir: path.join(s.dir, 'data'),
    initOverride: ['/bin/sh', '-c', 'echo hi'],
    preflight: [],
    // This double runs no guest (no KRUN_DOUBLE_RUN_GUEST): nothing would answer as the agent.
    agent: false,
    backend: libkrunBackend({
      runtime: { libDir: doubleDir(), pkgConfig: false, systemDirs: [], loaderSearch: false },
      firmware: { dir: firmwareDir(), systemDirs: [], loaderSearch: false },
      env: { PATH: process.env.PATH, KRUN_DOUBLE_LOG: calls },
    }),
    tracerProvider: provider,
    ...extra,
  };
}

const byName = (name: string): ReadableSpan[] => exporter.getFinishedSpans().filter((sp) => sp.name === name);
const one = (name: string): ReadableSpan => {
  const list = byName(name);
  if (list.length !== 1) throw new Error(`expected one ${name} span, got ${list.length}`);
  return list[0];
};
const parentOf = (sp: ReadableSpan): string | undefined => sp.parentSpanContext?.spanId;

beforeEach(() => {
  s = scratch('microvm-run-');
  calls = path.join(s.dir, 'calls.jsonl');
  exporter = new InMemorySpanExporter();
  provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
});

afterEach(async () => {
  for (const vm of started.splice(0)) await vm.remove().catch(() => undefined);
  s.cleanup();
});

describe('run() over the libkrun double', () => {
  test('the full span tree: names, parents, attributes; the runner got the plan', async () => {
    const vm = await run(
      'example.org/busybox:1',
      options({
        name: 'spans',
        cpus: 2,
        memoryMiB: 256,
        ports: [{ host: 40022, guest: 22 }],
        rootfsHooks: [hooks.injectFile('/etc/motd', 'hello\n')],
      }),
    );
    started.push(vm);
    const rootSpan = one(SPAN.RUN);
    expect(rootSpan.attributes).toMatchObject({
      'microvm.image': 'example.org/busybox:1',
      'microvm.name': 'spans',
      'microvm.cpus': 2,
      'microvm.memory_mib': 256,
    });
    expect(parentOf(rootSpan)).toBeUndefined();
    const stages = [
      SPAN.PREFLIGHT,
      SPAN.IMAGE_PULL,
      SPAN.ROOTFS_CLONE,
      SPAN.ROOTFS_HOOKS,
      SPAN.BACKEND_PREPARE,
      SPAN.NETWORK_START,
      SPAN.VM_SPAWN,
      SPAN.POST_BOOT,
    ];
    for (const name of stages) expect([name, parentOf(one(name))]).toEqual([name, rootSpan.spanContext().spanId]);
    // Stages ran in order.
    const startTimes = stages.map((n) => one(n).startTime);
    const asNs = startTimes.map(([sec, ns]) => sec * 1e9 + ns);
    expect([...asNs].sort((a, b) => a - b)).toEqual(asNs);
    expect(parentOf(one(SPAN.PREFLIGHT_RUN_ALL))).toBe(one(SPAN.PREFLIGHT).spanContext().spanId);
    const start = one(SPAN.BACKEND_START);
    expect(parentOf(start)).toBe(one(SPAN.VM_SPAWN).spanContext().spanId);
    expect(parentOf(one(SPAN.BACKEND_RESOLVE_RUNTIME))).toBe(start.spanContext().spanId);
    expect(parentOf(one(SPAN.BACKEND_RESOLVE_FIRMWARE))).toBe(start.spanContext().spanId);
    expect(one(SPAN.BACKEND_RESOLVE_FIRMWARE).attributes['microvm.firmware.abi_version']).toBe(5);
    expect(one(SPAN.ROOTFS_CLONE).attributes['microvm.rootfs.clone_strategy']).toBe(vm.cloneStrategy);
    expect(exporter.getFinishedSpans().every((sp) => sp.status.code !== SpanStatusCode.ERROR)).toBe(true);

    // The runner (vm.pid) applied the plan: vm config, root, port map, console.
    const recorded = readCalls(calls).filter((c) => c.pid === vm.pid);
    expect(recorded.find((c) => c.fn === 'krun_set_vm_config')?.args).toMatchObject({ num_vcpus: 2, ram_mib: 256 });
    expect(recorded.find((c) => c.fn === 'krun_set_root')?.args.root_path).toBe(vm.rootfsPath);
    expect(recorded.find((c) => c.fn === 'krun_set_port_map')?.args.port_map).toEqual(['40022:22']);
    expect(recorded.find((c) => c.fn === 'krun_set_console_output')?.args.c_filepath).toBe(vm.consoleLogPath);
    expect(recorded[recorded.length - 1].fn).toBe('krun_start_enter');
    expect(vm.status()).toMatchObject({ state: 'running', backend: 'libkrun', pid: vm.pid });
    const state = JSON.parse(fs.readFileSync(path.join(vm.dataDir, 'state.json'), 'utf8'));
    expect(state).toMatchObject({ name: 'spans', pid: vm.pid, cpus: 2, memoryMiB: 256 });
  });

  test('the guest sees .krun_config.json and hook files; the shared tree is untouched', async () => {
    const img = makeImage(s.dir);
    const before = fs.readdirSync(img, { recursive: true }).sort();
    const vm = await run(
      'img',
      options({
        rootfsPath: img,
        env: { GREETING: 'hi there' },
        workdir: '/root',
        rootfsHooks: [hooks.injectAuthorizedKeys('ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample test@host')],
      }),
    );
    started.push(vm);
    // Read the guest's root as the runner (the VMM) sees it: /proc/PID/root enters its mount namespace.
    const guest = (p: string): string => path.join(`/proc/${vm.pid}/root`, vm.rootfsPath, p);
    const config = JSON.parse(fs.readFileSync(guest('.krun_config.json'), 'utf8'));
    const rootCtx = one(SPAN.RUN).spanContext();
    expect(config).toEqual({
      // libkrun's init runs ours, which starts the guest agent on its vsock port, then becomes the command.
      Cmd: ['/.microvm/init', `--agent-listen=vsock:${AGENT_VSOCK_PORT}`, '--', '/bin/sh', '-c', 'echo hi'],
      // W3C trace context: the guest command continues this trace under microvm.Run.
      Env: [
        expect.stringMatching(/^PATH=/),
        'GREETING=hi there',
        `TRACEPARENT=00-${rootCtx.traceId}-${rootCtx.spanId}-01`,
      ],
      WorkingDir: '/root',
    });
    expect(fs.readFileSync(guest('root/.ssh/authorized_keys'), 'utf8')).toContain('ssh-ed25519 AAAAC3');
    expect(fs.statSync(guest('root/.ssh')).mode & 0o777).toBe(0o700);
    expect(fs.statSync(guest('root')).mode & 0o777).toBe(0o700);
    expect(fs.readFileSync(guest('etc/hostname'), 'utf8')).toBe('image\n');
    expect(fs.statSync(guest('.microvm/init')).mode & 0o7777).toBe(0o755);
    expect(fs.readdirSync(img, { recursive: true }).sort()).toEqual(before);
  });

  test.each(['overlay', 'copy'] as const)('clone strategy %s', async (strategy) => {
    const vm = await run('img', options({ cloneStrategies: [strategy] }));
    started.push(vm);
    expect(vm.cloneStrategy).toBe(strategy);
    expect(fs.readFileSync(path.join(`/proc/${vm.pid}/root`, vm.rootfsPath, 'etc/hostname'), 'utf8')).toBe('image\n');
  });

  test('a rootfs hook cannot follow a symlink in the image out of the rootfs', async () => {
    const img = makeImage(s.dir);
    const outside = path.join(s.dir, 'outside');
    fs.mkdirSync(outside);
    fs.symlinkSync(outside, path.join(img, 'escape'));
    fs.symlinkSync('/etc', path.join(img, 'etc2'));
    for (const strategy of ['copy', 'overlay'] as const) {
      for (const target of ['/escape/pwned', '/etc2/pwned']) {
        const err = await run(
          'img',
          options({ rootfsPath: img, cloneStrategies: [strategy], rootfsHooks: [hooks.injectFile(target, 'x')] }),
        ).catch((e: unknown) => e);
        if (strategy === 'copy') expect(err).toMatchObject({ code: 'ERR_MICROVM_ROOTFS_SYMLINK' });
        else if (err instanceof Error) expect(err).toMatchObject({ code: 'ERR_MICROVM_ROOTFS_SYMLINK' });
        else {
          // Overlay: the write landed in the VM's own upper layer, as a file under a real directory
          // that shadows the image's link.
          const vm = err as MicroVM;
          started.push(vm);
          const written = path.join(vm.dataDir, 'rootfs', 'upper', target);
          expect(fs.lstatSync(path.dirname(written)).isDirectory()).toBe(true);
          expect(fs.readFileSync(written, 'utf8')).toBe('x');
        }
      }
    }
    expect(fs.readdirSync(outside)).toEqual([]);
    expect(fs.existsSync('/etc/pwned')).toBe(false);
  });

  test.each([
    [
      SPAN.PREFLIGHT,
      (): RunOptions => ({
        preflight: [
          {
            name: 'always-fails',
            description: 'x',
            required: true,
            run: () => ({ ok: false, message: 'nope', remediation: 'do the thing' }),
          },
        ],
      }),
      'ERR_MICROVM_PREFLIGHT',
    ],
    [SPAN.IMAGE_PULL, (): RunOptions => ({ rootfsPath: '/nonexistent/rootfs' }), 'ERR_MICROVM_ROOTFS_NOT_FOUND'],
    [
      SPAN.ROOTFS_CLONE,
      (): RunOptions => ({
        cloneStrategies: ['overlay'],
        backend: { ...(options().backend as Backend), supportsOverlay: false },
      }),
      'ERR_MICROVM_CLONE_UNSUPPORTED',
    ],
    [
      SPAN.ROOTFS_HOOKS,
      (): RunOptions => ({
        rootfsHooks: [
          () => {
            throw Object.assign(new Error('hook failed'), { code: 'E_HOOK' });
          },
        ],
      }),
      'E_HOOK',
    ],
    [SPAN.BACKEND_PREPARE, (): RunOptions => ({ initOverride: undefined }), 'ERR_MICROVM_NO_COMMAND'],
    [
      SPAN.NETWORK_START,
      (): RunOptions => ({
        network: {
          name: 'broken',
          start: async () => {
            throw Object.assign(new Error('no passt'), { code: 'E_NET' });
          },
        },
      }),
      'E_NET',
    ],
    [SPAN.VM_SPAWN, (): RunOptions => ({ cpus: 200 }), 'EINVAL'],
    [
      SPAN.POST_BOOT,
      (): RunOptions => ({
        postBoot: [
          async () => {
            throw Object.assign(new Error('post boot failed'), { code: 'E_POST' });
          },
        ],
      }),
      'E_POST',
    ],
  ])('a failure in %s: ERROR on that span and on microvm.Run, nothing left behind', async (stage, extra, code) => {
    const opts = options(extra());
    if (stage === SPAN.VM_SPAWN) {
      // Make libkrun (the double) refuse the VM config inside the runner.
      opts.backend = libkrunBackend({
        runtime: { libDir: doubleDir(), pkgConfig: false, systemDirs: [], loaderSearch: false },
        firmware: { dir: firmwareDir(), systemDirs: [], loaderSearch: false },
        validatePlan: false,
        env: { PATH: process.env.PATH, KRUN_DOUBLE_LOG: calls, KRUN_DOUBLE_FAIL: 'krun_set_vm_config:22' },
      });
    }
    const err = await run('img', opts).catch((e: unknown) => e);
    expect(err).toMatchObject({ code });
    expect(one(stage).status.code).toBe(2);
    expect(one(SPAN.RUN).status.code).toBe(2);
    expect(one(SPAN.RUN).attributes['error.type']).toBe(code);
    // No VM process and no VM directory remain.
    for (const pid of new Set(readCalls(calls).map((c) => c.pid)))
      if (pid !== process.pid) expect(alive(pid)).toBe(false);
    const vms = path.join(s.dir, 'data', 'vms');
    expect(fs.existsSync(vms) ? fs.readdirSync(vms) : []).toEqual([]);
  });

  test('the preflight error lists each failed required check with its fix', async () => {
    const err = await run(
      'img',
      options({
        preflight: [
          {
            name: 'a',
            description: '',
            required: true,
            run: () => ({ ok: false, message: 'A is missing', remediation: 'install A' }),
          },
          { name: 'b', description: '', required: false, run: () => ({ ok: false, message: 'B is slow' }) },
          {
            name: 'c',
            description: '',
            required: true,
            run: () => {
              throw new Error('C exploded');
            },
          },
        ],
      }),
    ).catch((e: Error) => e);
    expect(err).toMatchObject({ code: 'ERR_MICROVM_PREFLIGHT' });
    expect((err as Error).message).toContain('a: A is missing\n    fix: install A');
    expect((err as Error).message).toContain('c: check threw: C exploded');
    expect((err as Error).message).not.toContain('B is slow');
    expect(
      byName(SPAN.PREFLIGHT_CHECK).map((sp) => [
        sp.attributes['preflight.check.name'],
        sp.attributes['preflight.check.passed'],
      ]),
    ).toEqual([
      ['a', false],
      ['b', false],
      ['c', false],
    ]);
  });

  test('a check given as a class instance keeps its methods; a missing `required` counts as required', async () => {
    class Failing {
      name = 'class-check';
      description = 'a class-based check';
      run(): { ok: boolean; message: string } {
        return { ok: false, message: `from ${this.name}` };
      }
    }
    const err = await run('img', options({ preflight: [new Failing() as never] })).catch((e: Error) => e);
    expect(err).toMatchObject({ code: 'ERR_MICROVM_PREFLIGHT' });
    expect((err as Error).message).toContain('class-check: from class-check');
  });

  test.each([
    [
      SPAN.PREFLIGHT,
      (ac: AbortController): RunOptions => ({
        preflight: [
          {
            name: 'aborts',
            description: '',
            required: false,
            run: () => {
              ac.abort();
              return { ok: true };
            },
          },
        ],
      }),
    ],
    [SPAN.ROOTFS_HOOKS, (ac: AbortController): RunOptions => ({ rootfsHooks: [() => ac.abort()] })],
    [
      SPAN.BACKEND_PREPARE,
      (ac: AbortController): RunOptions => {
        const b = options().backend as Backend;
        return {
          backend: {
            ...b,
            prepareRootfs: async (input) => {
              await b.prepareRootfs(input);
              ac.abort();
            },
          },
        };
      },
    ],
    [
      SPAN.NETWORK_START,
      (ac: AbortController): RunOptions => ({
        network: {
          name: 'aborting',
          start: async () => {
            ac.abort();
            return {
              kind: 'unixstream',
              socketPath: '/tmp/none.sock',
              mac: '5a:94:ef:e4:0c:ee',
              stop: async () => undefined,
            };
          },
        },
      }),
    ],
    [
      SPAN.VM_SPAWN,
      (ac: AbortController): RunOptions => {
        const b = options().backend as Backend;
        return {
          backend: {
            ...b,
            start: async (input) => {
              const h = await b.start(input);
              ac.abort();
              return h;
            },
          },
        };
      },
    ],
    [SPAN.POST_BOOT, (ac: AbortController): RunOptions => ({ postBoot: [() => ac.abort()] })],
  ])('abort during %s: AbortError, that span ERROR, nothing left behind', async (stage, extra) => {
    const ac = new AbortController();
    const err = await run('img', options({ signal: ac.signal, ...extra(ac) })).catch((e: unknown) => e);
    expect(err).toMatchObject({ name: 'AbortError' });
    expect(one(stage).status.code).toBe(2);
    expect(one(SPAN.RUN).status.code).toBe(2);
    for (const pid of new Set(readCalls(calls).map((c) => c.pid)))
      if (pid !== process.pid) expect(alive(pid)).toBe(false);
    const vms = path.join(s.dir, 'data', 'vms');
    expect(fs.existsSync(vms) ? fs.readdirSync(vms) : []).toEqual([]);
  });

  test('abort during a stage undoes everything', async () => {
    const ac = new AbortController();
    const err = await run('img', options({ signal: ac.signal, rootfsHooks: [() => ac.abort()] })).catch(
      (e: unknown) => e,
    );
    expect(err).toMatchObject({ name: 'AbortError' });
    expect(fs.readdirSync(path.join(s.dir, 'data', 'vms'))).toEqual([]);
    expect(one(SPAN.RUN).status.code).toBe(2);
  });

  test('stop() is idempotent and concurrent calls share one stop; wait() says it was stopped, not exit 0', async () => {
    const vm = await run('img', options());
    started.push(vm);
    const exits: unknown[] = [];
    vm.on('exit', (exit) => exits.push(exit));
    await Promise.all([vm.stop(), vm.stop(), vm.stop({ timeoutMs: 1000 })]);
    await vm.stop();
    // The double exits 0 on SIGTERM, as a VMM may: still a stop, never "the guest exited 0".
    expect(await vm.wait()).toEqual({ reason: 'stopped', exitCode: null, signal: 'SIGTERM' });
    expect(exits).toEqual([{ reason: 'stopped', exitCode: null, signal: 'SIGTERM' }]);
    expect(vm.status()).toMatchObject({ state: 'exited', reason: 'stopped', exitCode: null, signal: 'SIGTERM' });
    expect(alive(vm.pid)).toBe(false);
  });

  test('stop() escalates to SIGKILL when the VMM ignores SIGTERM, after timeoutMs; wait() says SIGKILL', async () => {
    const vm = await run(
      'img',
      options({
        backend: libkrunBackend({
          runtime: { libDir: doubleDir(), pkgConfig: false, systemDirs: [], loaderSearch: false },
          firmware: { dir: firmwareDir(), systemDirs: [], loaderSearch: false },
          env: { PATH: process.env.PATH, KRUN_DOUBLE_LOG: calls, KRUN_DOUBLE_IGNORE_TERM: '1' },
        }),
      }),
    );
    started.push(vm);
    // The double writes its console line once its (ignoring) SIGTERM disposition is in place.
    for (let i = 0; i < 200 && !fs.existsSync(vm.consoleLogPath); i++) await new Promise((r) => setTimeout(r, 10));
    for (let i = 0; i < 200 && !fs.readFileSync(vm.consoleLogPath, 'utf8').includes('running'); i++)
      await new Promise((r) => setTimeout(r, 10));
    await vm.stop({ timeoutMs: 300 });
    expect(await vm.wait()).toEqual({ reason: 'stopped', exitCode: null, signal: 'SIGKILL' });
    expect(alive(vm.pid)).toBe(false);
  });

  test('a network provider: started before the VM with the VM id, its socket handed to libkrun, stopped when the VM is removed', async () => {
    const events: string[] = [];
    const sock = path.join(s.dir, 'net.sock');
    const vm = await run(
      'img',
      options({
        name: 'netvm',
        ports: [{ host: 40999, guest: 80 }],
        network: {
          name: 'fake-passt',
          start: async (input) => {
            events.push(`start ${input.vmId.length > 0} ${input.ports.map((p) => `${p.host}:${p.guest}`).join(',')}`);
            return {
              kind: 'unixstream',
              socketPath: sock,
              mac: '5a:94:ef:e4:0c:ee',
              stop: async () => {
                events.push('stop');
              },
            };
          },
        },
      }),
    );
    started.push(vm);
    expect(one(SPAN.NETWORK_START).attributes['microvm.network.provider']).toBe('fake-passt');
    const recorded = readCalls(calls).filter((c) => c.pid === vm.pid);
    expect(recorded.find((c) => c.fn.startsWith('krun_add_net'))?.args).toMatchObject({ c_path: sock });
    expect(events).toEqual(['start true 40999:80']);
    await vm.remove();
    expect(events).toEqual(['start true 40999:80', 'stop']);
  });

  test("libkrun: a VMM failure (exit 1 with its ERROR line) is a failure, not the guest's exit code 1", async () => {
    const backend = (env: Record<string, string>): RunOptions['backend'] =>
      libkrunBackend({
        runtime: { libDir: doubleDir(), pkgConfig: false, systemDirs: [], loaderSearch: false },
        firmware: { dir: firmwareDir(), systemDirs: [], loaderSearch: false },
        env: { PATH: process.env.PATH, ...env },
      });
    const failed = await run('img', options({ name: 'vmm', backend: backend({ KRUN_DOUBLE_VMM_FAILURE: '1' }) }));
    started.push(failed);
    expect(await failed.wait()).toMatchObject({
      reason: 'failed',
      exitCode: null,
      error: {
        code: 'ERR_MICROVM_HYPERVISOR_FAILED',
        message: expect.stringContaining('Received KVM_EXIT_INTERNAL_ERROR signal'),
      },
    });
    const guest = await run('img', options({ name: 'guest', backend: backend({ KRUN_DOUBLE_GUEST_EXIT: '1' }) }));
    started.push(guest);
    expect(await guest.wait()).toEqual({ reason: 'exited', exitCode: 1, signal: null });
  });

  test("no listener is left on the caller's signal: three runs, with a post-boot hook, then removed", async () => {
    const ac = new AbortController();
    expect(getEventListeners(ac.signal, 'abort')).toHaveLength(0);
    for (let i = 0; i < 3; i++) {
      let hookRan = false;
      const vm = await run(
        'img',
        options({ name: `l${i}`, signal: ac.signal, postBoot: [async () => void (hookRan = true)] }),
      );
      expect(hookRan).toBe(true);
      expect(getEventListeners(ac.signal, 'abort')).toHaveLength(0);
      await vm.remove();
    }
    expect(getEventListeners(ac.signal, 'abort')).toHaveLength(0);
    // A run that fails (the name is taken) leaves none either.
    const vm = await run('img', options({ name: 'taken', signal: ac.signal }));
    started.push(vm);
    await expect(run('img', options({ name: 'taken', signal: ac.signal }))).rejects.toThrow();
    expect(getEventListeners(ac.signal, 'abort')).toHaveLength(0);
  });

  test('waitFor log: the console line the guest writes ends PostBoot, in a microvm.WaitForLog span', async () => {
    const vm = await run('img', options({ waitFor: { log: /guest (running|ready)/, stream: 'console' } }));
    started.push(vm);
    const w = one('microvm.WaitForLog');
    expect(parentOf(w)).toBe(one(SPAN.POST_BOOT).spanContext().spanId);
    expect(w.attributes).toMatchObject({
      'microvm.wait.pattern': '/guest (running|ready)/',
      'microvm.wait.stream': 'console',
    });
    expect(w.attributes['microvm.wait.attempts']).toBeGreaterThanOrEqual(1);
    expect(w.status.code).not.toBe(SpanStatusCode.ERROR);
  });

  test('waitFor log that never matches: ERR_MICROVM_WAIT_TIMEOUT naming the wait, nothing left', async () => {
    const err = await run(
      'img',
      options({ name: 'never', waitFor: [{ log: 'no such line', stream: 'console', timeoutMs: 300 }] }),
    ).catch((e: unknown) => e);
    expect(err).toMatchObject({
      code: 'ERR_MICROVM_WAIT_TIMEOUT',
      message: expect.stringMatching(/console of never \(waiting for "no such line"\) was not ready within 300 ms/),
    });
    expect(fs.existsSync(path.join(s.dir, 'data', 'vms', 'never'))).toBe(false);
    expect(one('microvm.WaitForLog').status.code).toBe(SpanStatusCode.ERROR);
  });

  test('waitFor on a guest that ends: ERR_MICROVM_VM_EXITED at once, not the wait timeout', async () => {
    const backend = libkrunBackend({
      runtime: { libDir: doubleDir(), pkgConfig: false, systemDirs: [], loaderSearch: false },
      firmware: { dir: firmwareDir(), systemDirs: [], loaderSearch: false },
      env: { PATH: process.env.PATH, KRUN_DOUBLE_LOG: calls, KRUN_DOUBLE_GUEST_EXIT: '0' },
    });
    const t0 = Date.now();
    const err = await run('img', options({ backend, waitFor: { log: 'never printed', timeoutMs: 60_000 } })).catch(
      (e: unknown) => e,
    );
    expect(err).toMatchObject({ code: 'ERR_MICROVM_VM_EXITED' });
    expect(Date.now() - t0).toBeLessThan(30_000); // far below the wait's own 60 s deadline
  });

  test('ports with host 0 get free host ports; vm.port(guest) says which; waitFor checks its port is forwarded', async () => {
    const vm = await run(
      'img',
      options({
        ports: [
          { host: 0, guest: 80 },
          { host: 0, guest: 443 },
        ],
      }),
    );
    started.push(vm);
    const [a, b] = [vm.port(80), vm.port(443)];
    expect(a).toBeGreaterThan(0);
    expect(b).toBeGreaterThan(0);
    expect(a).not.toBe(b);
    expect(vm.ports).toEqual([
      { host: a, guest: 80 },
      { host: b, guest: 443 },
    ]);
    // The runner got the picked ports, not 0.
    const portMap = readCalls(calls).find((c) => c.fn === 'krun_set_port_map');
    expect(JSON.stringify(portMap?.args)).toContain(`${a}:80`);
    expect(() => vm.port(8080)).toThrow(expect.objectContaining({ code: 'ERR_MICROVM_PORT_NOT_FORWARDED' }));
    await expect(run('img', options({ name: 'w', waitFor: { tcp: 8080 } }))).rejects.toMatchObject({
      code: 'ERR_OUT_OF_RANGE',
      message: 'waitFor[0] waits on guest port 8080, which ports does not forward',
    });
    await expect(run('img', options({ name: 'w', waitFor: { tcp: 1, log: 'x' } as never }))).rejects.toMatchObject({
      code: 'ERR_INVALID_ARG_TYPE',
    });
  });

  test('flight recorder: a failed run leaves its spans (without any provider), error and VM logs; the message names it; the newest `keep` stay; an abort or flightRecorder: false leaves none', async () => {
    const failed = path.join(s.dir, 'data', 'failed');
    const err = (await run(
      'img',
      options({
        name: 'fr',
        tracerProvider: undefined,
        waitFor: { log: 'never printed', stream: 'console', timeoutMs: 200 },
      }),
    ).catch((e: unknown) => e)) as Error & { code: string; flightRecord: string };
    expect(err.code).toBe('ERR_MICROVM_WAIT_TIMEOUT');
    expect(err.flightRecord.startsWith(path.join(failed, 'fr-'))).toBe(true);
    expect(err.message.endsWith(`\nFlight record (spans, logs): ${err.flightRecord}`)).toBe(true);
    expect(fs.statSync(failed).mode & 0o777).toBe(0o700);
    const rec = err.flightRecord;
    expect(fs.readdirSync(rec).sort()).toEqual(['console.log', 'error.json', 'record.json', 'spans.json', 'vm.log']);
    expect(fs.statSync(path.join(rec, 'spans.json')).mode & 0o777).toBe(0o600);
    expect(fs.readFileSync(path.join(rec, 'console.log'), 'utf8')).toContain('guest running');
    expect(JSON.parse(fs.readFileSync(path.join(rec, 'error.json'), 'utf8'))).toMatchObject({
      code: 'ERR_MICROVM_WAIT_TIMEOUT',
      name: 'MicrovmError',
    });
    expect(JSON.parse(fs.readFileSync(path.join(rec, 'record.json'), 'utf8'))).toMatchObject({
      name: 'fr',
      backend: 'libkrun',
      image: 'img',
    });
    const spans = JSON.parse(fs.readFileSync(path.join(rec, 'spans.json'), 'utf8')) as {
      name: string;
      spanId: string;
      parentSpanId?: string;
      attributes: Record<string, unknown>;
      status?: { code: number };
    }[];
    const byName = (n: string) => spans.find((x) => x.name === n);
    const rootRec = byName('microvm.Run');
    expect(rootRec?.status?.code).toBe(SpanStatusCode.ERROR);
    expect(rootRec?.attributes).toMatchObject({ 'microvm.name': 'fr', 'error.type': 'ERR_MICROVM_WAIT_TIMEOUT' });
    expect(byName('microvm.WaitForLog')?.parentSpanId).toBe(byName('microvm.PostBoot')?.spanId);
    expect(byName('microvm.PostBoot')?.parentSpanId).toBe(rootRec?.spanId);
    expect(byName('microvm.backend.ResolveFirmware')?.attributes['microvm.firmware.path']).toEqual(expect.any(String));
    expect(fs.existsSync(path.join(s.dir, 'data', 'vms', 'fr'))).toBe(false);
    // keep: 2 of three failures (a hook that throws, before any VM).
    for (const n of ['k1', 'k2', 'k3']) {
      await run(
        'img',
        options({
          name: n,
          flightRecorder: { keep: 2 },
          rootfsHooks: [
            () => {
              throw new Error('hook broke');
            },
          ],
        }),
      ).catch(() => undefined);
      await new Promise((r) => setTimeout(r, 20)); // distinct mtimes
    }
    expect(
      fs
        .readdirSync(failed)
        .map((n) => n.split('-')[0])
        .sort(),
    ).toEqual(['k2', 'k3']);
    // An abort is not a failure; false records nothing and leaves the message alone.
    const ac = new AbortController();
    await run('img', options({ name: 'ab', signal: ac.signal, rootfsHooks: [() => ac.abort()] })).catch(
      () => undefined,
    );
    const off = (await run(
      'img',
      options({
        name: 'off',
        flightRecorder: false,
        rootfsHooks: [
          () => {
            throw new Error('hook broke');
          },
        ],
      }),
    ).catch((e: unknown) => e)) as Error;
    expect(off.message).toBe('hook broke');
    expect(
      fs
        .readdirSync(failed)
        .map((n) => n.split('-')[0])
        .sort(),
    ).toEqual(['k2', 'k3']);
    await expect(run('img', options({ flightRecorder: { keep: -1 } }))).rejects.toThrow(
      'Expected an integer 0–10000 for flightRecorder.keep but received -1',
    );
  });

  test('await using: the VM is stopped and its directory removed, the image is not', async () => {
    const img = makeImage(s.dir);
    let pid = 0;
    let dir = '';
    {
      await using vm = await run('img', options({ rootfsPath: img }));
      pid = vm.pid;
      dir = vm.dataDir;
    }
    expect(alive(pid)).toBe(false);
    expect(fs.existsSync(dir)).toBe(false);
    expect(fs.existsSync(path.join(img, 'etc', 'hostname'))).toBe(true);
  });

  test('a name in use is refused; cleanDataDir stops the recorded VM first', async () => {
    const first = await run('img', options({ name: 'dup' }));
    started.push(first);
    await expect(run('img', options({ name: 'dup' }))).rejects.toMatchObject({ code: 'ERR_MICROVM_NAME_IN_USE' });
    const second = await run('img', options({ name: 'dup', cleanDataDir: true }));
    started.push(second);
    // Stopped by SIGTERM from outside (through the PID-reuse guard): the double exits 0, and with
    // nothing else to tell, that reads as the guest's exit.
    expect(await first.wait()).toMatchObject({ exitCode: 0 });
    expect(alive(second.pid)).toBe(true);
  });

  test('cleanDataDir never signals a recycled PID (different start time)', async () => {
    const vm = await run('img', options({ name: 'guarded' }));
    started.push(vm);
    const stateFile = path.join(vm.dataDir, 'state.json');
    const state = JSON.parse(fs.readFileSync(stateFile, 'utf8'));
    // Pretend the recorded process started at another time: the PID now belongs to someone else.
    fs.writeFileSync(stateFile, JSON.stringify({ ...state, pidStartTime: '1' }));
    const second = await run('img', options({ name: 'guarded', cleanDataDir: true }));
    started.push(second);
    expect(alive(vm.pid)).toBe(true);
    await vm.stop();
  });

  test('options are validated with messages naming the option', async () => {
    await expect(run('img', options({ cpus: 0 }))).rejects.toThrow('Expected an integer 1–255 for cpus but received 0');
    await expect(run('img', options({ name: 'bad name' }))).rejects.toThrow(/for name/);
    await expect(run('img', { ...options(), memoryMb: 1 } as never)).rejects.toThrow(/Unknown option options.memoryMb/);
    await expect(run('img', options({ backend: 'firecracker' as never }))).rejects.toThrow(/for backend/);
  });

  test("memoryMiB above the host's physical memory fails preflight (required), naming the fix", async () => {
    const err = await run('img', { ...options(), preflight: undefined, memoryMiB: 4_194_304 }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_MICROVM_PREFLIGHT' });
    expect((err as { failures: { name: string; message: string; remediation: string }[] }).failures).toContainEqual(
      expect.objectContaining({
        name: 'memory',
        message: expect.stringContaining('4194304 MiB of guest memory requested'),
        remediation: expect.stringContaining('--memory'),
      }),
    );
  });

  test("paths that go into another program's option string cannot inject options (comma, colon), with a coded error naming the option", async () => {
    const unsafe = { code: 'ERR_MICROVM_UNSAFE_PATH' };
    // virtiofsd -o source=...: '/a,source=/b' would serve /b.
    await expect(
      run('img', options({ virtiofs: [{ tag: 'v', hostPath: '/tmp/a,source=/tmp/outside' }] })),
    ).rejects.toMatchObject({
      ...unsafe,
      message: expect.stringContaining('virtiofs[0].hostPath'),
    });
    // Overlay mount options (lowerdir=...,upperdir=...) and QEMU's chardev paths.
    await expect(run('img', options({ dataDir: path.join(s.dir, 'x,upperdir=y') }))).rejects.toMatchObject({
      ...unsafe,
      message: expect.stringContaining('dataDir'),
    });
    await expect(run('img', options({ rootfsPath: path.join(s.dir, 'a:b') }))).rejects.toMatchObject({
      ...unsafe,
      message: expect.stringContaining('rootfsPath'),
    });
    await expect(run('img', options({ imageCache: path.join(s.dir, 'c,d') }))).rejects.toMatchObject({
      ...unsafe,
      message: expect.stringContaining('imageCache'),
    });
    expect(fs.existsSync(path.join(s.dir, 'x,upperdir=y'))).toBe(false);
  });
});

describe('tracing without a provider', () => {
  test('no provider registered: run() works and records nothing (a registered global one does receive them)', async () => {
    const opts = options();
    delete opts.tracerProvider;
    // Control: with this exporter's provider registered globally, run() without tracerProvider
    // reports to it — so the exporter below would see spans if run() made recording ones.
    trace.setGlobalTracerProvider(provider);
    try {
      const vm = await run('img', { ...opts, name: 'global' });
      started.push(vm);
      expect(exporter.getFinishedSpans().map((x) => x.name)).toContain('microvm.Run');
    } finally {
      trace.disable();
    }
    exporter.reset();
    const vm = await run('img', { ...opts, name: 'none' });
    started.push(vm);
    expect(vm.status()).toMatchObject({ state: 'running' });
    expect(exporter.getFinishedSpans()).toEqual([]);
  });
});
