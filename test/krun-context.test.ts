/**
 * Contract tests of KrunContext against the libkrun RECORDING ABI TEST DOUBLE: each method must
 * reach the libkrun function it names with exactly the arguments libkrun expects, and libkrun's
 * negative errno returns must come back as KrunError.
 */
import { KrunContext, KrunError, KrunFeature } from '../lib';
import { doublePath, firmwarePath, recordCalls } from './helpers';

let rec: ReturnType<typeof recordCalls>;
let ctx: KrunContext;

beforeEach(async () => {
  rec = recordCalls();
  ctx = await KrunContext.create({ libkrunPath: doublePath(), firmwarePath: firmwarePath() });
});

afterEach(() => {
  ctx.free();
  rec.done();
});

/** The last recorded call of `fn`. */
function last(fn: string): { args: Record<string, unknown>; ret: number } {
  const calls = rec.calls().filter((c) => c.fn === fn);
  if (calls.length === 0)
    throw new Error(
      `${fn} was not called; calls: ${rec
        .calls()
        .map((c) => c.fn)
        .join(', ')}`,
    );
  return calls[calls.length - 1];
}

describe('KrunContext.create', () => {
  test('creates a context; libkrun loads libkrunfw by soname and finds the preloaded real one', () => {
    const created = last('krun_create_ctx');
    expect(created.ret).toBe(ctx.id);
    expect(created.args.firmware).toBe(firmwarePath());
    expect(ctx.libkrunPath).toBe(doublePath());
    expect(ctx.freed).toBe(false);
  });

  test('validates its options', async () => {
    await expect(KrunContext.create({ libkrunPath: 'libkrun.so.1' })).rejects.toThrow(/absolute path for libkrunPath/);
    await expect(KrunContext.create({ libkrunPath: '/nonexistent/libkrun.so.1' })).rejects.toMatchObject({
      code: 'ERR_MICROVM_LIBKRUN_LOAD',
    });
  });

  test('a krun_create_ctx failure is a KrunError', async () => {
    rec.fail('krun_create_ctx:12');
    const err = await KrunContext.create({ libkrunPath: doublePath(), firmwarePath: firmwarePath() }).catch(
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(KrunError);
    expect(err).toMatchObject({ code: 'ENOMEM', errno: -12, syscall: 'krun_create_ctx' });
  });
});

describe('KrunContext methods record the libkrun call they name', () => {
  // The level itself is applied once per process (libkrun aborts on a second logger): that is
  // tested in fresh processes in test/libkrun-fidelity.test.ts; here only the validation.
  test('setLogLevel validates before it calls anything', () => {
    expect(() => ctx.setLogLevel(6 as never)).toThrow(/integer 0–5 for level/);
    expect(() => ctx.setLogLevel('loud' as never)).toThrow(RangeError);
  });

  test('setVmConfig -> krun_set_vm_config', () => {
    ctx.setVmConfig({ cpus: 2, memoryMiB: 1024 });
    expect(last('krun_set_vm_config').args).toEqual({ ctx: ctx.id, num_vcpus: 2, ram_mib: 1024 });
    expect(() => ctx.setVmConfig({ cpus: 0, memoryMiB: 512 })).toThrow(
      'Expected an integer 1–255 for cpus but received 0',
    );
    expect(() => ctx.setVmConfig({ cpus: 256, memoryMiB: 512 })).toThrow(RangeError);
    expect(() => ctx.setVmConfig({ cpus: 1, memoryMiB: '512' as never })).toThrow(TypeError);
    expect(() => ctx.setVmConfig({ cpus: 1, memoryMb: 512 } as never)).toThrow(/Unknown option config.memoryMb/);
  });

  test('setRoot -> krun_set_root', () => {
    ctx.setRoot('/srv/rootfs');
    expect(last('krun_set_root').args).toEqual({ ctx: ctx.id, root_path: '/srv/rootfs' });
    expect(() => ctx.setRoot('rootfs')).toThrow(/absolute path/);
    expect(() => ctx.setRoot('/a\0b')).toThrow(/NUL/);
  });

  test('addVirtiofs -> krun_add_virtiofs3 with read_only', () => {
    ctx.addVirtiofs({ tag: 'data', hostPath: '/srv/data', readOnly: true });
    expect(last('krun_add_virtiofs3').args).toEqual({
      ctx: ctx.id,
      c_tag: 'data',
      c_path: '/srv/data',
      shm_size: 0,
      read_only: true,
    });
    ctx.addVirtiofs({ tag: 'rw', hostPath: '/srv/rw' });
    expect(last('krun_add_virtiofs3').args.read_only).toBe(false);
    // libkrun 1.19 accepts a tag twice (the guest cannot tell the shares apart): the binding refuses it.
    const before = rec.calls().length;
    expect(() => ctx.addVirtiofs({ tag: 'data', hostPath: '/srv/other' })).toThrow(
      /virtiofs tag "data" is already added/,
    );
    expect(rec.calls().length).toBe(before);
    expect(() => ctx.addVirtiofs({ tag: 'bad tag', hostPath: '/x' })).toThrow(/mount.tag/);
  });

  test("setPortMap -> krun_set_port_map: none = empty, list = host:guest; 'all' makes no call (NULL crashes libkrun 1.19)", () => {
    ctx.setPortMap('all');
    expect(rec.calls().filter((c) => c.fn === 'krun_set_port_map')).toEqual([]);
    ctx.setPortMap('none');
    expect(last('krun_set_port_map').args.port_map).toEqual([]);
    ctx.setPortMap([{ host: 8080, guest: 80 }, '2222:22']);
    expect(last('krun_set_port_map').args.port_map).toEqual(['8080:80', '2222:22']);
    expect(() => ctx.setPortMap([{ host: 0, guest: 80 }])).toThrow(/map\[0\].host/);
    expect(() => ctx.setPortMap(['80'])).toThrow(/HOST:GUEST/);
    expect(() =>
      ctx.setPortMap([
        { host: 1, guest: 2 },
        { host: 1, guest: 3 },
      ]),
    ).toThrow(/appears twice/);
  });

  test('setExec -> krun_set_exec: args after the path, env list or NULL', () => {
    ctx.setExec({ path: '/bin/sh', args: ['-c', 'echo hi'], env: ['A=1', 'B=two words'] });
    expect(last('krun_set_exec').args).toEqual({
      ctx: ctx.id,
      exec_path: '/bin/sh',
      argv: ['-c', 'echo hi'],
      envp: ['A=1', 'B=two words'],
    });
    ctx.setExec({ path: '/bin/true', env: null });
    expect(last('krun_set_exec').args).toEqual({ ctx: ctx.id, exec_path: '/bin/true', argv: [], envp: null });
    expect(() => ctx.setExec({ path: '/bin/sh', env: ['1BAD=x'] })).toThrow(/exec.env\[0\]/);
  });

  test('setEnv -> krun_set_env', () => {
    ctx.setEnv(['PATH=/usr/bin:/bin', 'EMPTY=']);
    expect(last('krun_set_env').args).toEqual({ ctx: ctx.id, envp: ['PATH=/usr/bin:/bin', 'EMPTY='] });
    expect(() => ctx.setEnv(['NOEQUALS'])).toThrow(/KEY=VALUE/);
  });

  test('setWorkdir -> krun_set_workdir', () => {
    ctx.setWorkdir('/app');
    expect(last('krun_set_workdir').args).toEqual({ ctx: ctx.id, workdir_path: '/app' });
  });

  test('setRlimits -> krun_set_rlimits', () => {
    ctx.setRlimits(['NOFILE=1024:4096', { resource: 'RLIMIT_NPROC', soft: 100, hard: 200 }]);
    // libkrun's guest init parses the resource as a number: names become their Linux numbers.
    expect(last('krun_set_rlimits').args.rlimits).toEqual(['7=1024:4096', '6=100:200']);
    ctx.setRlimits(['7=1:2', { resource: 4, soft: 0, hard: 0 }]);
    expect(last('krun_set_rlimits').args.rlimits).toEqual(['7=1:2', '4=0:0']);
    expect(() => ctx.setRlimits(['16=1:1'])).toThrow(/resource number 0–15 for rlimits\[0\].resource/);
    expect(() => ctx.setRlimits([{ resource: 'NOFILE', soft: 10, hard: 5 }])).toThrow(/soft \(10\) to be at most/);
    expect(() => ctx.setRlimits(['BOGUS=1:1'])).toThrow(/resource/);
  });

  test('setConsoleOutput -> krun_set_console_output', () => {
    ctx.setConsoleOutput('/tmp/console.log');
    expect(last('krun_set_console_output').args).toEqual({ ctx: ctx.id, c_filepath: '/tmp/console.log' });
  });

  test('addNet -> krun_add_net_unixstream / unixgram', () => {
    ctx.addNet({ kind: 'unixstream', path: '/run/passt.sock', mac: '5a:94:ef:e4:0c:ee', features: 3, flags: 0 });
    expect(last('krun_add_net_unixstream').args).toEqual({
      ctx: ctx.id,
      c_path: '/run/passt.sock',
      fd: -1,
      c_mac: '5a:94:ef:e4:0c:ee',
      features: 3,
      flags: 0,
    });
    ctx.addNet({ kind: 'unixgram', fd: 7, mac: '5A:94:EF:E4:0C:EF', flags: 1 });
    expect(last('krun_add_net_unixgram').args).toEqual({
      ctx: ctx.id,
      c_path: null,
      fd: 7,
      c_mac: '5a:94:ef:e4:0c:ef',
      features: 0,
      flags: 1,
    });
    // libkrun 1.19: with a virtio-net device, a TSI port map is refused with -EINVAL.
    expect(() => ctx.setPortMap(['8080:80'])).toThrow(
      expect.objectContaining({ code: 'EINVAL', errno: -22, syscall: 'krun_set_port_map' }),
    );
    expect(() => ctx.addNet({ kind: 'unixstream', path: '/a', fd: 3, mac: '5a:94:ef:e4:0c:ee' })).toThrow(
      /exactly one of/,
    );
    expect(() => ctx.addNet({ kind: 'unixstream', path: '/a', mac: '01:00:00:00:00:00' })).toThrow(/unicast/);
  });

  test('addVsockPort -> krun_add_vsock_port, or krun_add_vsock_port2 with listen', () => {
    ctx.addVsockPort({ port: 1024, path: '/tmp/vsock.sock' });
    expect(last('krun_add_vsock_port').args).toEqual({ ctx: ctx.id, port: 1024, c_filepath: '/tmp/vsock.sock' });
    ctx.addVsockPort({ port: 1025, path: '/tmp/vsock2.sock', listen: true });
    expect(last('krun_add_vsock_port2').args).toEqual({
      ctx: ctx.id,
      port: 1025,
      c_filepath: '/tmp/vsock2.sock',
      listen: true,
    });
    expect(() => ctx.addVsockPort({ port: 1, path: `/tmp/${'x'.repeat(120)}` })).toThrow(/107 bytes/);
  });

  test('hasFeature -> krun_has_feature', () => {
    expect(ctx.hasFeature(KrunFeature.NET)).toBe(true);
    expect(ctx.hasFeature(KrunFeature.GPU)).toBe(false);
    expect(last('krun_has_feature').args).toEqual({ feature: KrunFeature.GPU });
    expect(() => ctx.hasFeature(40)).toThrow(expect.objectContaining({ code: 'EINVAL', syscall: 'krun_has_feature' }));
  });

  test('free -> krun_free_ctx once; later calls fail with a coded error', () => {
    const id = ctx.id;
    ctx.free();
    ctx.free();
    expect(rec.calls().filter((c) => c.fn === 'krun_free_ctx')).toEqual([
      expect.objectContaining({ args: { ctx: id }, ret: 0 }),
    ]);
    expect(ctx.freed).toBe(true);
    expect(() => ctx.setRoot('/x')).toThrow(expect.objectContaining({ code: 'ERR_MICROVM_CONTEXT_FREED' }));
  });
});

describe('libkrun errors become KrunError', () => {
  test.each([
    ['krun_set_vm_config', 'EINVAL', 22, (c: KrunContext) => c.setVmConfig({ cpus: 1, memoryMiB: 512 })],
    ['krun_set_root', 'ENOENT', 2, (c: KrunContext) => c.setRoot('/r')],
    ['krun_set_exec', 'E2BIG', 7, (c: KrunContext) => c.setExec({ path: '/bin/sh' })],
    ['krun_set_console_output', 'EACCES', 13, (c: KrunContext) => c.setConsoleOutput('/c')],
  ])('%s -> %s', (fn, code, errno, call) => {
    rec.fail(`${fn}:${errno}`);
    let err: unknown;
    try {
      call(ctx);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(KrunError);
    expect(err).toMatchObject({ code, errno: -errno, syscall: fn });
    expect((err as Error).message).toContain(`${fn} failed: ${code}`);
    // The error is created on the JS side: its stack shows this test file.
    expect((err as Error).stack).toContain('krun-context.test.ts');
    expect((err as Error).cause).toMatchObject({ code, syscall: fn });
  });
});
