import { buildLaunchPlan, KrunError, type LaunchPlan, serializeLaunchPlan, validateLaunchPlan } from '../lib';
import { addon } from '../lib/native';
import { doublePath, firmwarePath, recordCalls } from './helpers';

const base = () => ({
  libkrunPath: doublePath(),
  firmwarePath: firmwarePath(),
  cpus: 2,
  memoryMiB: 768,
  root: '/srv/rootfs',
});

describe('buildLaunchPlan', () => {
  test('produces the version-1 wire form with normalised fields', () => {
    const plan = buildLaunchPlan({
      ...base(),
      logLevel: 'warn',
      virtiofs: [{ tag: 'data', hostPath: '/srv/data', readOnly: true }],
      portMap: [{ host: 2222, guest: 22 }],
      exec: { path: '/bin/sh', args: ['-c', 'true'] },
      env: ['A=1'],
      workdir: '/',
      rlimits: ['NOFILE=10:20'],
      consoleOutput: '/tmp/console.log',
      vsockPorts: [{ port: 5000, path: '/tmp/v.sock' }],
    });
    expect(plan).toEqual({
      version: 1,
      libkrunPath: doublePath(),
      firmwarePath: firmwarePath(),
      logLevel: 2,
      vm: { cpus: 2, memoryMiB: 768 },
      root: '/srv/rootfs',
      virtiofs: [{ tag: 'data', path: '/srv/data', readOnly: true }],
      portMap: ['2222:22'],
      exec: { path: '/bin/sh', args: ['-c', 'true'], env: [] },
      env: ['A=1'],
      workdir: '/',
      rlimits: ['7=10:20'],
      consoleOutput: '/tmp/console.log',
      vsockPorts: [{ port: 5000, path: '/tmp/v.sock' }],
    });
  });

  test.each([
    [{ cpus: 0 }, RangeError, 'Expected an integer 1–255 for cpus but received 0'],
    [{ memoryMiB: 1.5 }, RangeError, /memoryMiB/],
    [{ root: 'relative' }, RangeError, /absolute path for root/],
    [{ libkrunPath: 42 }, TypeError, /string for libkrunPath/],
    [{ portMap: 'some' }, TypeError, /portMap/],
    [
      {
        virtiofs: [
          { tag: 'a', hostPath: '/a' },
          { tag: 'a', hostPath: '/b' },
        ],
      },
      RangeError,
      /used twice/,
    ],
    [{ env: ['=x'] }, RangeError, /env\[0\]/],
    [{ rlimits: 'NOFILE=1:1' }, TypeError, /rlimits/],
    [
      { net: [{ kind: 'unixstream', path: '/p', mac: '5a:94:ef:e4:0c:ee' }], portMap: ['1:1'] },
      RangeError,
      /virtio-net/,
    ],
    [{ cpu: 1 }, TypeError, /Unknown option plan.cpu/],
  ])('rejects %j', (patch, type, message) => {
    expect(() => buildLaunchPlan({ ...base(), ...(patch as object) })).toThrow(type);
    expect(() => buildLaunchPlan({ ...base(), ...(patch as object) })).toThrow(message);
  });
});

describe('native plan reader (shared by the addon and the runner)', () => {
  test('accepts what buildLaunchPlan produces', () => {
    expect(() =>
      serializeLaunchPlan(buildLaunchPlan({ ...base(), portMap: 'none', exec: { path: '/x', env: null } })),
    ).not.toThrow();
  });

  test.each([
    ['not JSON', '{', /invalid JSON at byte/],
    [
      'an unknown key',
      JSON.stringify({ version: 1, libkrunPath: '/l', vm: { cpus: 1, memoryMiB: 1 }, root: '/', extra: 1 }),
      /plan.extra: unknown key/,
    ],
    [
      'a wrong type',
      JSON.stringify({ version: 1, libkrunPath: '/l', vm: { cpus: '1', memoryMiB: 1 }, root: '/' }),
      /plan.vm.cpus: expected a number/,
    ],
    [
      'cpus out of range',
      JSON.stringify({ version: 1, libkrunPath: '/l', vm: { cpus: 256, memoryMiB: 1 }, root: '/' }),
      /plan.vm.cpus/,
    ],
    [
      'another version',
      JSON.stringify({ version: 2, libkrunPath: '/l', vm: { cpus: 1, memoryMiB: 1 }, root: '/' }),
      /unsupported plan version/,
    ],
    [
      'a missing root',
      JSON.stringify({ version: 1, libkrunPath: '/l', vm: { cpus: 1, memoryMiB: 1 } }),
      /plan.root: missing/,
    ],
    [
      'a bad MAC',
      JSON.stringify({
        version: 1,
        libkrunPath: '/l',
        vm: { cpus: 1, memoryMiB: 1 },
        root: '/',
        net: [{ kind: 'unixgram', fd: 3, mac: 'zz' }],
      }),
      /mac/,
    ],
    ['duplicate keys', '{"version":1,"version":1}', /duplicate key/],
    ['deep nesting', '['.repeat(40) + ']'.repeat(40), /nesting too deep/],
    [
      'an escaped NUL',
      JSON.stringify({ version: 1, libkrunPath: '/l\u0000', vm: { cpus: 1, memoryMiB: 1 }, root: '/' }),
      /NUL/,
    ],
  ])('rejects %s with ERR_MICROVM_PLAN_INVALID', (_what, text, message) => {
    let err: unknown;
    try {
      addon().checkPlan(text);
    } catch (e) {
      err = e;
    }
    expect(err).toMatchObject({ code: 'ERR_MICROVM_PLAN_INVALID' });
    expect((err as Error).message).toMatch(message);
  });

  test('decodes escapes and non-ASCII text', () => {
    expect(() =>
      addon().checkPlan(
        JSON.stringify({ version: 1, libkrunPath: '/l', vm: { cpus: 1, memoryMiB: 1 }, root: '/rööt/\u{1F600}/"q"\\' }),
      ),
    ).not.toThrow();
  });
});

describe('validateLaunchPlan (in-process dry run against the double)', () => {
  let rec: ReturnType<typeof recordCalls>;
  beforeEach(() => {
    rec = recordCalls();
  });
  afterEach(() => rec.done());

  test('applies every setting in a fixed order, then frees the context', async () => {
    const plan = buildLaunchPlan({
      ...base(),
      logLevel: 1,
      virtiofs: [{ tag: 'data', hostPath: '/srv/data' }],
      net: [{ kind: 'unixstream', path: '/run/passt.sock', mac: '5a:94:ef:e4:0c:ee' }],
      exec: { path: '/bin/sh', args: ['-c', 'exit 3'], env: ['X=1'] },
      env: ['Y=2'],
      workdir: '/work',
      rlimits: [{ resource: 'NOFILE', soft: 1, hard: 2 }],
      consoleOutput: '/tmp/console.log',
      vsockPorts: [{ port: 9, path: '/tmp/v.sock', listen: false }],
    });
    await validateLaunchPlan(plan);
    const calls = rec.calls();
    // No krun_set_log_level in-process: libkrun's logger can be installed once per process, and
    // the runner (a fresh process) applies the level itself.
    expect(calls.map((c) => c.fn)).toEqual([
      'krun_create_ctx',
      'krun_set_vm_config',
      'krun_set_root',
      'krun_add_virtiofs3',
      'krun_add_net_unixstream',
      'krun_set_exec',
      'krun_set_env',
      'krun_set_workdir',
      'krun_set_rlimits',
      'krun_set_console_output',
      'krun_add_vsock_port2',
      'krun_free_ctx',
    ]);
    expect(calls.every((c) => c.ret >= 0)).toBe(true);
    const ctx = calls[0].ret;
    expect(calls[1].args).toEqual({ ctx, num_vcpus: 2, ram_mib: 768 });
    expect(calls[calls.length - 1].args).toEqual({ ctx });
  });

  test('a failing call rejects with a KrunError naming it, and the context is still freed', async () => {
    rec.fail('krun_set_root:13');
    const err = await validateLaunchPlan(buildLaunchPlan(base())).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(KrunError);
    expect(err).toMatchObject({ code: 'EACCES', errno: -13, syscall: 'krun_set_root' });
    expect(rec.calls().map((c) => c.fn)).toEqual([
      'krun_create_ctx',
      'krun_set_vm_config',
      'krun_set_root',
      'krun_free_ctx',
    ]);
  });

  test('libkrun rules the TypeScript side cannot see still surface (libkrun 1.19: port map after virtio-net is EINVAL)', async () => {
    const plan: LaunchPlan = {
      ...buildLaunchPlan(base()),
      net: [{ kind: 'unixgram', fd: 5, mac: '5a:94:ef:e4:0c:ee', features: 0, flags: 0 }],
      portMap: ['8080:80'],
    };
    await expect(validateLaunchPlan(plan)).rejects.toMatchObject({ code: 'EINVAL', syscall: 'krun_set_port_map' });
  });

  test('a missing libkrun is ERR_MICROVM_LIBKRUN_LOAD', async () => {
    await expect(
      validateLaunchPlan(buildLaunchPlan({ ...base(), libkrunPath: '/nonexistent/libkrun.so.1' })),
    ).rejects.toMatchObject({
      code: 'ERR_MICROVM_LIBKRUN_LOAD',
    });
  });
});
