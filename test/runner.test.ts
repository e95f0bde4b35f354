/**
 * The runner as a real process, over the libkrun RECORDING ABI TEST DOUBLE (whose
 * krun_start_enter behaves like a running VM until SIGTERM) and Debian's real libkrunfw.
 */
import { execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  buildLaunchPlan,
  KrunError,
  type LaunchPlan,
  MicrovmError,
  resolveRunner,
  RunnerExit,
  startRunner,
} from '../lib';
import { packageRoot } from '../lib/native';
import { classifyRunnerExit } from '../lib/backends/libkrun';
import { readTail } from '../lib/backends/libkrun/runner';
import { alive, doublePath, firmwareDir, firmwarePath, readCalls, scratch } from './helpers';

let s: ReturnType<typeof scratch>;
let log: string;
let calls: string;
let runnerPath: string;

beforeEach(() => {
  s = scratch('microvm-runner-');
  log = path.join(s.dir, 'vm.log');
  calls = path.join(s.dir, 'calls.jsonl');
  runnerPath = resolveRunner();
});
afterEach(() => s.cleanup());

const env = (extra: Record<string, string> = {}): NodeJS.ProcessEnv => {
  const e: NodeJS.ProcessEnv = { PATH: process.env.PATH, KRUN_DOUBLE_LOG: calls, ...extra };
  return e;
};
const plan = (extra: Partial<Parameters<typeof buildLaunchPlan>[0]> = {}): LaunchPlan =>
  buildLaunchPlan({
    libkrunPath: doublePath(),
    firmwarePath: firmwarePath(),
    cpus: 1,
    memoryMiB: 256,
    root: s.dir,
    ...extra,
  });

/** Waits until the double's "guest" wrote its console line (it handles SIGTERM from then on). */
async function waitRunning(consoleLog: string): Promise<void> {
  for (let i = 0; i < 400 && !(fs.existsSync(consoleLog) && fs.statSync(consoleLog).size > 0); i++)
    await new Promise((r) => setTimeout(r, 10));
}

async function waitGone(pid: number): Promise<boolean> {
  for (let i = 0; i < 200 && alive(pid); i++) await new Promise((r) => setTimeout(r, 25));
  return !alive(pid);
}

describe('startRunner', () => {
  test('applies the plan, reports configured, runs until SIGTERM, exits with the guest code', async () => {
    const consoleLog = path.join(s.dir, 'console.log');
    const vm = await startRunner({
      runnerPath,
      plan: plan({ consoleOutput: consoleLog, exec: { path: '/bin/true' } }),
      logPath: log,
      env: env({ KRUN_DOUBLE_EXIT_CODE: '7' }),
    });
    expect(alive(vm.pid)).toBe(true);
    // "configured" comes before krun_start_enter (which does not return): wait for the "guest"
    // to write its console line, by then krun_start_enter is recorded.
    await waitRunning(consoleLog);
    const recorded = readCalls(calls);
    expect(recorded.map((c) => c.fn)).toEqual([
      'krun_create_ctx',
      'krun_set_vm_config',
      'krun_set_root',
      'krun_set_exec',
      'krun_set_console_output',
      'krun_start_enter',
    ]);
    expect(recorded.every((c) => c.pid === vm.pid)).toBe(true);
    // The runner preloaded the resolved firmware; libkrun's soname lookup found that file.
    expect(recorded[0].args.firmware).toBe(firmwarePath());
    expect(fs.readFileSync(consoleLog, 'utf8')).toContain('guest running');
    expect(vm.kill('SIGTERM')).toBe(true);
    await expect(vm.exited).resolves.toEqual({ code: 7, signal: null });
  });

  test('a failing krun call before start: KrunError, exit 70, no process left', async () => {
    // cpus 0 passes the structural check of the plan reader; libkrun (the double) refuses it.
    const bad: LaunchPlan = { ...plan(), vm: { cpus: 0, memoryMiB: 256 } };
    const err = await startRunner({ runnerPath, plan: bad, logPath: log, env: env() }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(KrunError);
    expect(err).toMatchObject({
      code: 'EINVAL',
      errno: -22,
      syscall: 'krun_set_vm_config',
      exitCode: RunnerExit.CONFIGURE,
    });
    const pids = new Set(readCalls(calls).map((c) => c.pid));
    for (const pid of pids) expect(alive(pid)).toBe(false);
  });

  test('without a resolved firmware: libkrun 1.19 creates the context anyway and fails at krun_start_enter (ENOENT); the VM ends failed, not with a guest code', async () => {
    const noFw: LaunchPlan = { ...plan() };
    delete noFw.firmwarePath;
    const vm = await startRunner({ runnerPath, plan: noFw, logPath: log, env: env() });
    const status = await vm.exited;
    expect(status).toEqual({ code: RunnerExit.START, signal: null });
    const exit = classifyRunnerExit(status, readTail(log, vm.logStart), log, undefined);
    expect(exit).toMatchObject({ reason: 'failed', error: { code: 'ENOENT', syscall: 'krun_start_enter' } });
    expect(fs.readFileSync(log, 'utf8')).toContain("Couldn't find or load libkrunfw.so.5");
    // ...and it works when the loader can find it on its own.
    const consoleLog = path.join(s.dir, 'console.log');
    const ok = await startRunner({
      runnerPath,
      plan: { ...noFw, consoleOutput: consoleLog },
      logPath: log,
      env: env({ LD_LIBRARY_PATH: firmwareDir() }),
    });
    await waitRunning(consoleLog);
    ok.kill();
    await expect(ok.exited).resolves.toMatchObject({ code: 0 });
  });

  test('an unloadable libkrun: ERR_MICROVM_LIBKRUN_LOAD, exit 69', async () => {
    const err = await startRunner({
      runnerPath,
      plan: plan({ libkrunPath: '/nonexistent/libkrun.so.1' }),
      logPath: log,
      env: env(),
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MicrovmError);
    expect(err).toMatchObject({ code: 'ERR_MICROVM_LIBKRUN_LOAD', exitCode: RunnerExit.UNAVAILABLE });
    expect((err as Error).message).toContain('/nonexistent/libkrun.so.1');
  });

  test('krun_start_enter returning an error is reported after "configured" with exit 71', async () => {
    const vm = await startRunner({
      runnerPath,
      plan: plan(),
      logPath: log,
      env: env({ KRUN_DOUBLE_FAIL: 'krun_start_enter:22' }),
    });
    await expect(vm.exited).resolves.toEqual({ code: RunnerExit.START, signal: null });
    expect(fs.readFileSync(log, 'utf8')).toMatch(/"stage":"start","code":"EINVAL".*"syscall":"krun_start_enter"/);
  });

  test('an already aborted signal rejects without starting anything', async () => {
    const ac = new AbortController();
    ac.abort();
    await expect(
      startRunner({ runnerPath, plan: plan(), logPath: log, env: env(), signal: ac.signal }),
    ).rejects.toMatchObject({ name: 'AbortError' });
    expect(fs.existsSync(calls)).toBe(false);
  });

  test('a runner that cannot be executed: ERR_MICROVM_RUNNER_SPAWN', async () => {
    const fake = path.join(s.dir, 'not-executable');
    fs.writeFileSync(fake, '');
    await expect(startRunner({ runnerPath: fake, plan: plan(), logPath: log, env: env() })).rejects.toMatchObject({
      code: 'ERR_MICROVM_RUNNER_SPAWN',
    });
  });

  test('options are validated', async () => {
    await expect(startRunner({ runnerPath, plan: plan(), logPath: 'vm.log' })).rejects.toThrow(
      /absolute path for logPath/,
    );
    await expect(startRunner({ runnerPath, plan: plan(), logPath: log, detach: true } as never)).rejects.toThrow(
      /Unknown option options.detach/,
    );
  });

  test('dieWithParent: killing the owner with SIGKILL takes the runner down too', async () => {
    const script = `
      const m = require(${JSON.stringify(packageRoot)});
      m.startRunner({ runnerPath: ${JSON.stringify(runnerPath)}, plan: ${JSON.stringify(plan())}, logPath: ${JSON.stringify(log)},
                      detached: false, dieWithParent: true, env: ${JSON.stringify(env())} })
        .then((vm) => { console.log(vm.pid); setInterval(() => {}, 1000); });`;
    const owner = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    const pid = await new Promise<number>((resolve, reject) => {
      owner.stdout.once('data', (d: Buffer) => resolve(Number(String(d).trim())));
      owner.once('exit', (code) => reject(new Error(`owner exited early with ${String(code)}`)));
    });
    expect(alive(pid)).toBe(true);
    owner.kill('SIGKILL');
    expect(await waitGone(pid)).toBe(true);
  }, 20_000); // a child node process starts first: slow on a loaded machine
});

describe('microvm-runner command line', () => {
  const runRaw = (
    args: string[],
    stdinText?: string,
  ): Promise<{ code: number | null; stderr: string; stdout: string }> =>
    new Promise((resolve) => {
      const child = execFile(runnerPath, args, { env: env() }, (err, stdout, stderr) => {
        resolve({ code: child.exitCode, stdout: String(stdout), stderr: String(stderr) });
      });
      if (stdinText !== undefined) child.stdin?.end(stdinText);
    });

  test('usage errors: exit 64 with one JSON line', async () => {
    const r = await runRaw([]);
    expect(r.code).toBe(RunnerExit.USAGE);
    expect(JSON.parse(r.stderr.trim())).toMatchObject({
      microvmRunnerError: { stage: 'usage', code: 'ERR_MICROVM_RUNNER_USAGE' },
    });
    expect((await runRaw(['--bogus'])).code).toBe(RunnerExit.USAGE);
    expect((await runRaw(['--plan-fd', 'x'])).code).toBe(RunnerExit.USAGE);
  });

  test('--plan FILE: unreadable is 66, invalid is 65', async () => {
    const missing = await runRaw(['--plan', path.join(s.dir, 'nope.json')]);
    expect(missing.code).toBe(RunnerExit.PLAN_UNREADABLE);
    expect(missing.stderr).toContain('ERR_MICROVM_PLAN_UNREADABLE');
    const file = path.join(s.dir, 'plan.json');
    fs.writeFileSync(file, '{"version":1}');
    const invalid = await runRaw(['--plan', file]);
    expect(invalid.code).toBe(RunnerExit.PLAN_INVALID);
    expect(JSON.parse(invalid.stderr.trim())).toMatchObject({
      microvmRunnerError: { code: 'ERR_MICROVM_PLAN_INVALID', message: 'plan.libkrunPath: missing' },
    });
  });

  test('--plan-fd 0 reads the plan from stdin', async () => {
    const r = await runRaw(['--plan-fd', '0'], JSON.stringify({ ...plan(), vm: { cpus: 0, memoryMiB: 1 } }));
    expect(r.code).toBe(RunnerExit.CONFIGURE);
    expect(r.stderr).toContain('krun_set_vm_config');
  });

  test('--version', async () => {
    const r = await runRaw(['--version']);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('plan-version 1');
  });
});
