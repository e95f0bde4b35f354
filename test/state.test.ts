/** VM records and locks: the PID-reuse guard, termination that never signals a stranger, file locks. */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { isRecordedProcess, processStartTime, terminateRecorded, withFileLock } from '../lib/state';
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
