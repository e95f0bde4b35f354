/**
 * A script whose only work is awaiting the library ends with the call's outcome, never with exit
 * status 0 (or Node's 13, "unsettled top-level await") while the call is still pending: run()
 * through its agent wait, `exec`, `wait()`, on both backends (libkrun through the RECORDING DOUBLE,
 * whose runner is a real detached process, as libkrun's would be; QEMU for real). And `vm.unref()`
 * lets the script end while the VM runs, taking the VM with it.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { packageRoot } from '../../lib/native';
import { alive, doubleDir, firmwareDir, qemuSkipReason, scratch } from '../helpers';

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-keepalive-');
});
afterEach(() => s.cleanup());

/** Runs `body` as an ES module in a fresh Node process; `run`, `libkrunBackend`... are in scope. */
function script(
  body: string,
  env: Record<string, string | undefined> = {},
): { status: number | null; stdout: string; stderr: string } {
  const file = path.join(s.dir, 'script.mjs');
  fs.writeFileSync(
    file,
    `import lib from ${JSON.stringify(path.join(packageRoot, 'dist', 'index.js'))};\nconst { run, libkrunBackend, qemuBackend } = lib;\n${body}\n`,
  );
  const r = spawnSync(process.execPath, [file], {
    cwd: s.dir,
    encoding: 'utf8',
    timeout: 120_000,
    env: {
      ...process.env,
      MICROVM_DATA_DIR: path.join(s.dir, 'data'),
      MICROVM_LIBKRUNFW_DIR: process.env.MICROVM_TEST_LIBKRUNFW_DIR,
      ...env,
    },
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Processes whose command line names this test's directory. */
function leftovers(): number[] {
  return fs
    .readdirSync('/proc')
    .filter((d) => /^\d+$/.test(d))
    .map(Number)
    .filter((p) => {
      try {
        return p !== process.pid && fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(s.dir) && alive(p);
      } catch {
        return false;
      }
    });
}

function vmDirs(): string[] {
  const dir = path.join(s.dir, 'data', 'vms');
  return fs.existsSync(dir) ? fs.readdirSync(dir) : [];
}

const image = JSON.stringify(process.env.MICROVM_TEST_IMAGE ?? '');

/** The libkrun double as the backend; with a guest, the double runs it as libkrun's init would. */
const krun = (guest: boolean): string => `libkrunBackend({
  runtime: { libDir: ${JSON.stringify(doubleDir())}, pkgConfig: false, systemDirs: [], loaderSearch: false },
  firmware: { dir: ${JSON.stringify(firmwareDir())}, systemDirs: [], loaderSearch: false },
  env: { PATH: process.env.PATH${guest ? ", KRUN_DOUBLE_RUN_GUEST: '1'" : ''} },
})`;

function libkrunSkip(): string | undefined {
  if (!process.env.MICROVM_TEST_IMAGE) return 'no test image';
  if (process.getuid?.() !== 0 && spawnSync('unshare', ['-U', '-r', '-p', '-f', 'true']).status !== 0)
    return 'no user namespaces for the double to run its guest in';
  return undefined;
}
const krunSkip = libkrunSkip();
const qemuSkip = qemuSkipReason();

(krunSkip ? describe.skip : describe)(`libkrun (recording double)${krunSkip ? ` [skipped: ${krunSkip}]` : ''}`, () => {
  test('a pending run() whose agent never answers keeps Node alive until it rejects with ERR_MICROVM_AGENT_TIMEOUT', () => {
    const r = script(`
const vm = await run('img', { rootfsPath: ${image}, preflight: [], initOverride: ['/bin/sleep', '600'],
  agent: { timeoutMs: 2000 }, backend: ${krun(false)} });
console.log('resolved', vm.name);
`);
    expect(r.status).toBe(1); // the unhandled rejection of the top-level await
    expect(r.stderr).toContain('ERR_MICROVM_AGENT_TIMEOUT');
    expect(r.stdout).toBe('');
    expect(vmDirs()).toEqual([]);
    expect(leftovers()).toEqual([]);
  });

  test("run(), exec and wait() on a VM whose guest runs: each settles with its outcome, the exit is the guest command's", () => {
    const r = script(`
const vm = await run('img', { rootfsPath: ${image}, preflight: [], initOverride: ['/bin/sh', '-c', 'sleep 2; exit 7'],
  backend: ${krun(true)} });
console.log('resolved');
const e = await vm.exec(['sh', '-c', 'echo hi']);
console.log('exec', JSON.stringify(e));
console.log('wait', JSON.stringify(await vm.wait()));
`);
    expect({ status: r.status, stderr: r.stderr }).toEqual({ status: 0, stderr: '' });
    expect(r.stdout.split('\n')).toEqual([
      'resolved',
      `exec ${JSON.stringify({ stdout: 'hi\n', stderr: '', exitCode: 0, signal: null })}`,
      `wait ${JSON.stringify({ reason: 'exited', exitCode: 7, signal: null })}`,
      '',
    ]);
    expect(leftovers()).toEqual([]);
  });

  test('an un-awaited running VM keeps Node alive until it ends; after vm.unref() the script ends and the VM with it', () => {
    const t = script(`
const vm = await run('img', { rootfsPath: ${image}, preflight: [], initOverride: ['/bin/sh', '-c', 'sleep 2; exit 0'],
  backend: ${krun(true)} });
vm.on('exit', (x) => console.log('exit', x.reason, x.exitCode));
`);
    expect({ status: t.status, stdout: t.stdout }).toEqual({ status: 0, stdout: 'exit exited 0\n' });
    const u = script(`
const vm = await run('img', { rootfsPath: ${image}, preflight: [], initOverride: ['/bin/sleep', '600'],
  backend: ${krun(true)} });
vm.unref();
void vm.wait();
console.log('pid', vm.pid);
`);
    expect(u.status).toBe(0);
    const pid = Number(/^pid (\d+)$/m.exec(u.stdout)?.[1]);
    expect(pid).toBeGreaterThan(0);
    // The runner was tied to the script (PR_SET_PDEATHSIG): gone with it, within a moment.
    const until = Date.now() + 5000;
    while (alive(pid) && Date.now() < until) spawnSync('sleep', ['0.05']);
    expect(alive(pid)).toBe(false);
  });
});

(qemuSkip ? describe.skip : describe)(`QEMU${qemuSkip ? ` [skipped: ${qemuSkip}]` : ''}`, () => {
  test('run(), exec and wait() in a script that does nothing else: each settles with its outcome', () => {
    const r = script(`
const vm = await run('img', { rootfsPath: ${image}, initOverride: ['/bin/sh', '-c', 'sleep 1; exit 5'] });
console.log('resolved');
console.log('exec', JSON.stringify(await vm.exec(['sh', '-c', 'echo hi'])));
console.log('wait', JSON.stringify(await vm.wait()));
`);
    expect({ status: r.status, stderr: r.stderr }).toEqual({ status: 0, stderr: '' });
    expect(r.stdout.split('\n')).toEqual([
      'resolved',
      `exec ${JSON.stringify({ stdout: 'hi\n', stderr: '', exitCode: 0, signal: null })}`,
      `wait ${JSON.stringify({ reason: 'exited', exitCode: 5, signal: null })}`,
      '',
    ]);
    expect(leftovers()).toEqual([]);
  });

  test('a run() that fails rejects (exit 1, the code on stderr), never exit 0 while pending', () => {
    const r = script(`
const vm = await run('img', { rootfsPath: ${image}, initOverride: ['/bin/sh', '-c', 'sleep 600'],
  waitFor: { log: /never printed/, timeoutMs: 1500 } });
console.log('resolved', vm.name);
`);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('ERR_MICROVM_WAIT_TIMEOUT');
    expect(r.stdout).toBe('');
    expect(vmDirs()).toEqual([]);
    expect(leftovers()).toEqual([]);
  });

  test('vm.unref(): the script ends while the VM runs, and the VM ends with it', () => {
    const r = script(`
const vm = await run('img', { rootfsPath: ${image}, initOverride: ['/bin/sleep', '600'] });
vm.unref();
void vm.wait();
console.log('pid', vm.pid);
`);
    expect(r.status).toBe(0);
    const pid = Number(/^pid (\d+)$/m.exec(r.stdout)?.[1]);
    expect(pid).toBeGreaterThan(0);
    const until = Date.now() + 5000;
    while (alive(pid) && Date.now() < until) spawnSync('sleep', ['0.05']);
    expect(alive(pid)).toBe(false);
  });
});
