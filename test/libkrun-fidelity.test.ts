/**
 * Each row of "Verified against a real libkrun 1.19.0" (../shared/notes/libkrun-api.md), twice:
 *
 * 1. the libkrun RECORDING TEST DOUBLE is as harsh as the real library (driven by a small C probe,
 *    test/fixtures/libkrun-conformance/probe.c, in a child process: some rows kill the process);
 * 2. the binding never walks into it (child processes too: against the old binding these crashed
 *    Node or sent what the guest misreads).
 *
 * Rows not modelled: "guest exit code through a virtio-fs ioctl" (no guest runs here; the double
 * exits with a chosen code instead), and the PVM internal error after ~18 s (modelled as an
 * immediate ERROR line + exit 1, see KRUN_DOUBLE_VMM_FAILURE).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { buildLaunchPlan, KrunContext, KrunFeature, libkrunBackend, resolveRunner, run, startRunner } from '../lib';
import { packageRoot } from '../lib/native';
import { doubleDir, doublePath, firmwareDir, firmwarePath, readCalls, recordCalls, scratch } from './helpers';

const probeSrc = path.join(packageRoot, 'test', 'fixtures', 'libkrun-conformance', 'probe.c');
const probeBin = path.join(packageRoot, '.test-artifacts', 'libkrun-conformance', 'probe');
let s: ReturnType<typeof scratch>;

beforeAll(() => {
  if (!fs.existsSync(probeBin) || fs.statSync(probeBin).mtimeMs < fs.statSync(probeSrc).mtimeMs) {
    fs.mkdirSync(path.dirname(probeBin), { recursive: true });
    execFileSync('cc', ['-O2', '-Wall', '-Wextra', '-Werror', '-o', `${probeBin}.${process.pid}`, probeSrc, '-ldl']);
    fs.renameSync(`${probeBin}.${process.pid}`, probeBin);
  }
});
beforeEach(() => {
  s = scratch('microvm-fidelity-');
});
afterEach(() => s.cleanup());

/** Runs one probe scenario against the double; `fw`: whether libkrunfw is on the loader path. */
function probe(
  scenario: string,
  arg = '',
  fw = true,
): { status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string } {
  const env: NodeJS.ProcessEnv = { PATH: process.env.PATH };
  if (fw) env.LD_LIBRARY_PATH = firmwareDir();
  const r = spawnSync(probeBin, [doublePath(), scenario, arg], { encoding: 'utf8', env, timeout: 20000 });
  return { status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
}

/** Runs a script with the package loaded in a fresh Node process (a crash there cannot take jest down). */
function node(
  script: string,
  env: NodeJS.ProcessEnv = {},
): { status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string } {
  const prelude = `const m = require(${JSON.stringify(packageRoot)}); const lib = ${JSON.stringify(doublePath())}; const fw = ${JSON.stringify(firmwarePath())};\n`;
  const r = spawnSync(
    process.execPath,
    [
      '-e',
      `${prelude}(async () => {\n${script}\n})().catch((e) => { console.log('ERR', e.code, e.message); process.exit(1); });`,
    ],
    {
      encoding: 'utf8',
      env: { ...process.env, KRUN_DOUBLE_CONTROL_DIR: '', ...env },
      timeout: 30000,
    },
  );
  return { status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
}

describe('the double is as harsh as libkrun 1.19.0, row by row', () => {
  test('krun_set_log_level twice in one process: panic, abort (exit 134)', () => {
    const r = probe('log-twice');
    expect(r.stdout).toBe('first 0\n');
    expect(r.signal).toBe('SIGABRT');
    expect(r.stderr).toContain('Builder::init should not be called after logger initialized');
  });

  test('krun_set_port_map(ctx, NULL): SIGSEGV', () => {
    expect(probe('port-map-null')).toMatchObject({ signal: 'SIGSEGV' });
  });

  test('krun_set_port_map after a virtio-net device: -EINVAL', () => {
    expect(probe('port-map-after-net').stdout).toBe('ctx 0\nnet 0\nret -22\n');
  });

  test('a second krun_set_console_output on one context: -EINVAL', () => {
    expect(probe('console-twice', path.join(s.dir, 'c.log')).stdout).toBe('ctx 0\nfirst 0\nsecond -22\n');
  });

  test('krun_add_vsock_port2 listening on a path that exists: -EEXIST', () => {
    const p = path.join(s.dir, 'exists.sock');
    fs.writeFileSync(p, '');
    expect(probe('vsock-listen-exists', p).stdout).toBe('ctx 0\nret -17\n');
  });

  test('two virtio-fs shares with the same tag: both 0 (accepted)', () => {
    expect(probe('duplicate-tags').stdout).toBe('ctx 0\nfirst 0\nsecond 0\n');
  });

  test('krun_create_ctx with no loadable libkrunfw succeeds; krun_start_enter fails -ENOENT', () => {
    const r = probe('start-without-firmware', '', false);
    expect(r.stdout).toBe('ctx 0\nroot 0\nstart -2\n');
    expect(r.stderr).toContain("Couldn't find or load libkrunfw.so.5");
  });

  test('an rlimit given by name is accepted, and the guest init misreads it as RLIMIT_CPU 0:0', () => {
    const con = path.join(s.dir, 'console.log');
    const r = probe('rlimit-by-name', con);
    expect(r.stdout).toBe('ctx 0\nroot 0\nconsole 0\nrlimits 0\n');
    expect(r.status).toBe(137);
    expect(fs.readFileSync(con, 'utf8')).toContain('read as resource 0 (RLIMIT_CPU) 0:0');
  });

  test('krun_has_feature(INIT_BLOB = 11): 1', () => {
    expect(probe('init-blob').stdout).toBe('ctx 0\nret 1\n');
  });

  test('context ids always increase (a freed id is not reused)', () => {
    expect(probe('ids').stdout).toBe('ctx 0\nfree 0\nnext 1\n');
  });
});

describe('the binding never walks into them', () => {
  test('log level: two dry runs with a level, then the same level again and another one, in one process: no abort; another level is EALREADY', () => {
    const r = node(`
      const plan = m.buildLaunchPlan({ libkrunPath: lib, firmwarePath: fw, cpus: 1, memoryMiB: 256, root: '/', logLevel: 'debug' });
      await m.validateLaunchPlan(plan);
      await m.validateLaunchPlan({ ...plan, logLevel: 1 });
      const ctx = await m.KrunContext.create({ libkrunPath: lib, firmwarePath: fw });
      ctx.setLogLevel('warn');
      ctx.setLogLevel(2);
      try { ctx.setLogLevel('trace'); console.log('no error'); } catch (e) { console.log(e.code, e.syscall); }
      console.log('alive');`);
    expect([r.signal, r.status, r.stderr]).toEqual([null, 0, '']);
    expect(r.stdout).toBe('EALREADY krun_set_log_level\nalive\n');
  });

  test("ports 'all': no krun_set_port_map call at all (NULL would crash libkrun 1.19)", () => {
    const log = path.join(s.dir, 'calls.jsonl');
    const r = node(
      `
      const ctx = await m.KrunContext.create({ libkrunPath: lib, firmwarePath: fw });
      ctx.setPortMap('all');
      await m.validateLaunchPlan(m.buildLaunchPlan({ libkrunPath: lib, firmwarePath: fw, cpus: 1, memoryMiB: 256, root: '/', portMap: 'all' }));
      console.log('alive');`,
      { KRUN_DOUBLE_LOG: log },
    );
    expect([r.signal, r.status, r.stdout]).toEqual([null, 0, 'alive\n']);
    expect(readCalls(log).map((c) => c.fn)).not.toContain('krun_set_port_map');
  });

  test('rlimits by name reach libkrun as numbers, so the guest is not killed by a misread RLIMIT_CPU', async () => {
    const log = path.join(s.dir, 'vm.log');
    const calls = path.join(s.dir, 'calls.jsonl');
    const plan = buildLaunchPlan({
      libkrunPath: doublePath(),
      firmwarePath: firmwarePath(),
      cpus: 1,
      memoryMiB: 256,
      root: s.dir,
      consoleOutput: path.join(s.dir, 'console.log'),
      rlimits: ['NOFILE=1024:4096', { resource: 'RLIMIT_NPROC', soft: 10, hard: 20 }],
    });
    expect(plan.rlimits).toEqual(['7=1024:4096', '6=10:20']);
    const runnerPath = resolveRunner();
    const vm = await startRunner({
      runnerPath,
      plan,
      logPath: log,
      env: { PATH: process.env.PATH, KRUN_DOUBLE_LOG: calls, KRUN_DOUBLE_GUEST_EXIT: '0' },
    });
    await expect(vm.exited).resolves.toEqual({ code: 0, signal: null });
    expect(readCalls(calls).find((c) => c.fn === 'krun_set_rlimits')?.args.rlimits).toEqual(['7=1024:4096', '6=10:20']);
    // The runner refuses a hand-made plan with a named resource before libkrun sees it.
    const bad = await startRunner({
      runnerPath,
      plan: { ...plan, rlimits: ['RLIMIT_NOFILE=1:2'] },
      logPath: log,
      env: { PATH: process.env.PATH },
    }).catch((e: unknown) => e);
    expect(bad).toMatchObject({
      code: 'ERR_MICROVM_PLAN_INVALID',
      message: expect.stringContaining('numeric resource ID'),
    });
  });

  test("a guest's set-ID modes, device nodes and file capabilities never reach the host through libkrun's file server (the runner's guard)", async () => {
    const root = path.join(s.dir, 'root');
    fs.mkdirSync(root);
    const consoleLog = path.join(s.dir, 'console.log');
    const plan = buildLaunchPlan({
      libkrunPath: doublePath(),
      firmwarePath: firmwarePath(),
      cpus: 1,
      memoryMiB: 256,
      root,
      consoleOutput: consoleLog,
    });
    const vm = await startRunner({
      runnerPath: resolveRunner(),
      plan,
      logPath: path.join(s.dir, 'vm.log'),
      env: { PATH: process.env.PATH, KRUN_DOUBLE_GUEST_FS_OPS: '1', KRUN_DOUBLE_GUEST_EXIT: '0' },
    });
    await expect(vm.exited).resolves.toEqual({ code: 0, signal: null });
    const said = fs.readFileSync(consoleLog, 'utf8');
    expect(said).toContain('fsop create=0 0');
    expect(said).toContain('fsop chmod=0 0');
    expect(said).toContain('fsop mknod=-1 1'); // EPERM
    expect(said).toContain('fsop setcap=-1 1');
    expect(fs.statSync(path.join(root, 'created')).mode & 0o7777).toBe(0o755);
    expect(fs.statSync(path.join(root, 'chmodded')).mode & 0o7777).toBe(0o755);
    expect(fs.existsSync(path.join(root, 'hostdisk'))).toBe(false);
  });

  test('a port map with a virtio-net device is refused in TypeScript, before libkrun says EINVAL', () => {
    expect(() =>
      buildLaunchPlan({
        libkrunPath: doublePath(),
        cpus: 1,
        memoryMiB: 256,
        root: '/',
        net: [{ kind: 'unixstream', path: '/tmp/p.sock', mac: '5a:94:ef:e4:0c:ee' }],
        portMap: ['8080:80'],
      }),
    ).toThrow(/portMap only applies to TSI/);
  });

  test('a second console output surfaces as a coded KrunError (EINVAL, krun_set_console_output)', async () => {
    const rec = recordCalls();
    try {
      const ctx = await KrunContext.create({ libkrunPath: doublePath(), firmwarePath: firmwarePath() });
      ctx.setConsoleOutput(path.join(s.dir, 'a.log'));
      expect(() => ctx.setConsoleOutput(path.join(s.dir, 'b.log'))).toThrow(
        expect.objectContaining({ code: 'EINVAL', syscall: 'krun_set_console_output' }),
      );
      ctx.free();
    } finally {
      rec.done();
    }
  });

  test('a vsock listen path that exists surfaces as EEXIST from krun_add_vsock_port2', async () => {
    const rec = recordCalls();
    try {
      const p = path.join(s.dir, 'taken.sock');
      fs.writeFileSync(p, '');
      const ctx = await KrunContext.create({ libkrunPath: doublePath(), firmwarePath: firmwarePath() });
      expect(() => ctx.addVsockPort({ port: 1024, path: p, listen: true })).toThrow(
        expect.objectContaining({ code: 'EEXIST', syscall: 'krun_add_vsock_port2' }),
      );
      ctx.free();
    } finally {
      rec.done();
    }
  });

  test('duplicate virtio-fs tags (libkrun accepts them) are refused by the binding, in plans, contexts and run()', async () => {
    expect(() =>
      buildLaunchPlan({
        libkrunPath: doublePath(),
        cpus: 1,
        memoryMiB: 256,
        root: '/',
        virtiofs: [
          { tag: 'a', hostPath: '/srv/a' },
          { tag: 'a', hostPath: '/srv/b' },
        ],
      }),
    ).toThrow(/used twice/);
    await expect(
      run('img', {
        rootfsPath: s.dir,
        dataDir: path.join(s.dir, 'd'),
        virtiofs: [
          { tag: 'a', hostPath: '/srv/a' },
          { tag: 'a', hostPath: '/srv/b' },
        ],
      }),
    ).rejects.toThrow(/virtiofs\[1\].tag/);
  });

  test('no libkrunfw: run() stops at firmware resolution with ERR_MICROVM_LIBKRUNFW_NOT_FOUND, before any krun_start_enter', async () => {
    const calls = path.join(s.dir, 'calls.jsonl');
    const empty = path.join(s.dir, 'no-firmware');
    fs.mkdirSync(empty);
    fs.mkdirSync(path.join(s.dir, 'img', 'bin'), { recursive: true });
    const err = await run('img', {
      rootfsPath: path.join(s.dir, 'img'),
      dataDir: path.join(s.dir, 'd'),
      initOverride: ['/bin/true'],
      preflight: [],
      backend: libkrunBackend({
        runtime: { libDir: doubleDir(), pkgConfig: false, systemDirs: [], loaderSearch: false },
        firmware: { dir: empty, systemDirs: [], loaderSearch: false, env: {} },
        env: { PATH: process.env.PATH, KRUN_DOUBLE_LOG: calls },
      }),
    }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_MICROVM_LIBKRUNFW_NOT_FOUND' });
    expect(readCalls(calls).map((c) => c.fn)).not.toContain('krun_start_enter');
  });

  test('INIT_BLOB is reported as a feature; context ids increase', async () => {
    const rec = recordCalls();
    try {
      const a = await KrunContext.create({ libkrunPath: doublePath(), firmwarePath: firmwarePath() });
      expect(a.hasFeature(KrunFeature.INIT_BLOB)).toBe(true);
      const first = a.id;
      a.free();
      const b = await KrunContext.create({ libkrunPath: doublePath(), firmwarePath: firmwarePath() });
      expect(b.id).toBeGreaterThan(first);
      b.free();
    } finally {
      rec.done();
    }
  });
});
