/** VM records and locks: the PID-reuse guard, termination that never signals a stranger, file locks. */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  isRecordedProcess,
  processStartTime,
  sweepVms,
  terminateRecorded,
  withFileLock,
  writeOwner,
} from '../lib/state';
import { alive, scratch } from './helpers';

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-state-');
});
afterEach(() => s.cleanup());

const me = () => ({
  pid: process.pid,
  pidStartTime: processStartTime(process.pid) as string,
  executable: fs.readlinkSync('/proc/self/exe'),
});

test('isRecordedProcess: the same pid, start time and executable; any one different is another process', () => {
  expect(isRecordedProcess(me())).toBe(true);
  expect(isRecordedProcess({ ...me(), executable: '/bin/sh' })).toBe(false); // pid and start time match
  expect(isRecordedProcess({ ...me(), pidStartTime: '1' })).toBe(false);
  expect(isRecordedProcess({ ...me(), pid: 2 ** 22 + 17 })).toBe(false);
});

test('terminateRecorded signals the recorded process only: a recycled PID running another program is left alone', async () => {
  const child = spawn('sleep', ['60'], { detached: true, stdio: 'ignore' });
  const dir = path.join(s.dir, 'vm');
  fs.mkdirSync(dir);
  const record = (executable: string): void =>
    fs.writeFileSync(
      path.join(dir, 'state.json'),
      JSON.stringify({ pid: child.pid, pidStartTime: processStartTime(child.pid as number), executable }),
    );
  try {
    record('/usr/bin/qemu-system-x86_64'); // the pid is now "sleep": not that VM
    expect(await terminateRecorded(dir, 200)).toBe(false);
    expect(alive(child.pid as number)).toBe(true);
    record(fs.readlinkSync(`/proc/${child.pid}/exe`));
    const exited = new Promise((r) => child.once('exit', (_c, sig) => r(sig)));
    expect(await terminateRecorded(dir, 2000)).toBe(true);
    expect(await exited).toBe('SIGTERM');
  } finally {
    child.kill('SIGKILL');
  }
});

test("withFileLock: one holder at a time; a dead holder's lock is taken over; a live one times out with a code; a lock being written is not stolen", async () => {
  const lock = path.join(s.dir, 'x.lock');
  const order: string[] = [];
  await Promise.all([
    withFileLock(lock, async () => {
      order.push('a+');
      await new Promise((r) => setTimeout(r, 50));
      order.push('a-');
    }),
    (async () => {
      await new Promise((r) => setTimeout(r, 5));
      await withFileLock(lock, () => {
        order.push('b');
      });
    })(),
  ]);
  expect(order).toEqual(['a+', 'a-', 'b']);
  expect(fs.existsSync(lock)).toBe(false);
  // A lock left by a dead process.
  const dead = spawn('true');
  await new Promise((r) => dead.once('exit', r));
  fs.writeFileSync(lock, String(dead.pid));
  expect(await withFileLock(lock, () => 'taken')).toBe('taken');
  // A live holder (this process's parent): a timeout with a code.
  fs.writeFileSync(lock, String(process.ppid));
  await expect(withFileLock(lock, () => 'never', 100)).rejects.toMatchObject({ code: 'ERR_MICROVM_LOCK_TIMEOUT' });
  // An empty lock (its creator has not written its pid yet) is a live one, not an abandoned one.
  fs.writeFileSync(lock, '');
  await expect(withFileLock(lock, () => 'stolen', 100)).rejects.toMatchObject({ code: 'ERR_MICROVM_LOCK_TIMEOUT' });
  const old = new Date(Date.now() - 60_000);
  fs.utimesSync(lock, old, old);
  expect(await withFileLock(lock, () => 'abandoned')).toBe('abandoned');
});

describe('terminateRecorded escalation and processStartTime', () => {
  test('a process that ignores SIGTERM gets SIGKILL after timeoutMs (not before); its group is signalled', async () => {
    const child = spawn('sh', ['-c', 'trap "" TERM; sleep 60 & wait'], { detached: true, stdio: 'ignore' });
    await new Promise((r) => setTimeout(r, 200)); // the trap is set
    const dir = path.join(s.dir, 'vm');
    fs.mkdirSync(dir);
    fs.writeFileSync(
      path.join(dir, 'state.json'),
      JSON.stringify({
        pid: child.pid,
        pidStartTime: processStartTime(child.pid as number),
        executable: fs.readlinkSync(`/proc/${child.pid}/exe`),
      }),
    );
    const exited = new Promise((r) => child.once('exit', (_c, sig) => r(sig)));
    try {
      const t0 = Date.now();
      expect(await terminateRecorded(dir, 400)).toBe(true);
      expect(Date.now() - t0).toBeGreaterThanOrEqual(380); // it waited for the grace period
      expect(await exited).toBe('SIGKILL');
    } finally {
      child.kill('SIGKILL');
    }
    expect(await terminateRecorded(path.join(s.dir, 'none'))).toBe(false);
  });

  test('processStartTime: field 22 of /proc/PID/stat (the same as ps reports), undefined for no process', () => {
    const stat = fs.readFileSync('/proc/self/stat', 'utf8');
    expect(processStartTime(process.pid)).toBe(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]);
    expect(processStartTime(process.pid)).toMatch(/^\d+$/);
    expect(processStartTime(2 ** 22 + 17)).toBeUndefined();
  });
});

describe('sweepVms', () => {
  const vm = (name: string, files: { owner?: object | string; state?: object }): string => {
    const dir = path.join(s.dir, 'vms', name);
    fs.mkdirSync(dir, { recursive: true });
    if (files.owner !== undefined)
      fs.writeFileSync(
        path.join(dir, 'owner.json'),
        typeof files.owner === 'string' ? files.owner : JSON.stringify(files.owner),
      );
    if (files.state) fs.writeFileSync(path.join(dir, 'state.json'), JSON.stringify(files.state));
    return dir;
  };
  const deadOwner = (autoRemove: boolean) => ({ pid: 2 ** 22 + 17, startTime: '1', autoRemove });
  const liveOwner = () => ({ pid: process.pid, startTime: processStartTime(process.pid), autoRemove: true });
  const stopped = { pid: 2 ** 22 + 19, pidStartTime: '1', executable: '/x' };

  test('without all: only what nobody will use again; with all: every stopped VM whose creator is gone', async () => {
    vm('starting', { owner: liveOwner() }); // its creator is alive (starting it): kept
    vm('orphan', { owner: deadOwner(false) }); // creator died before the VM started: removed
    vm('rm-ended', { owner: deadOwner(true), state: stopped }); // run --rm whose creator died: removed
    vm('kept', { owner: deadOwner(false), state: stopped }); // a stopped VM the user may inspect: kept
    vm('old', { state: stopped }); // no owner record (older version): kept
    vm('junk-owner', { owner: '{"pid":"x"}', state: stopped }); // unreadable owner: as no owner
    vm('running', { owner: deadOwner(true), state: me() }); // its process runs: never removed
    vm('empty', {}); // neither record: never removed
    expect((await sweepVms(s.dir)).sort()).toEqual(['orphan', 'rm-ended']);
    expect(fs.readdirSync(path.join(s.dir, 'vms')).sort()).toEqual([
      'empty',
      'junk-owner',
      'kept',
      'old',
      'running',
      'starting',
    ]);
    expect((await sweepVms(s.dir, true)).sort()).toEqual(['junk-owner', 'kept', 'old']);
    expect(fs.readdirSync(path.join(s.dir, 'vms')).sort()).toEqual(['empty', 'running', 'starting']);
    expect(await sweepVms(path.join(s.dir, 'nothing-here'), true)).toEqual([]);
  });

  test('writeOwner records this process (pid, start time, autoRemove) in owner.json, mode 0600', () => {
    const dir = vm('mine', {});
    const o = writeOwner(dir, true);
    expect(o).toEqual({ pid: process.pid, startTime: processStartTime(process.pid), autoRemove: true });
    expect(JSON.parse(fs.readFileSync(path.join(dir, 'owner.json'), 'utf8'))).toEqual(o);
    expect(fs.readFileSync(path.join(dir, 'owner.json'), 'utf8').endsWith('}\n')).toBe(true);
    expect(fs.statSync(path.join(dir, 'owner.json')).mode & 0o777).toBe(0o600);
  });
});
