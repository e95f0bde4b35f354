/**
 * Output a guest sends is bounded on the host (real QEMU boots): each of console/stdout/stderr keeps
 * at most `logMaxBytes`, a marker line ends a cut file, and `vm.outputStatus()` says what was cut,
 * also when the guest writes to the port itself, past its init. On a full disk nothing is lost
 * silently: the output that did not fit is reported (ERR_MICROVM_NO_SPACE, never exit 0), and
 * pull and cp fail with ERR_MICROVM_NO_SPACE. `microvm logs` streams a log of any size in constant
 * memory.
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { type MicroVM, run } from '../../lib';
import { packageRoot } from '../../lib/native';
import { qemuSkipReason, scratch } from '../helpers';

const skip = qemuSkipReason();
process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;
const CLI = path.join(packageRoot, 'bin', 'microvm.js');

let s: ReturnType<typeof scratch>;
const vms: MicroVM[] = [];
beforeEach(() => {
  s = scratch('microvm-output-');
});
afterEach(async () => {
  for (const vm of vms.splice(0)) await vm.remove().catch(() => undefined);
  s.cleanup();
});

(skip ? describe.skip : describe)(`output bounds${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  test('logMaxBytes: stdout and stderr are cut at the limit with a marker, also when the guest writes to the port itself', async () => {
    const vm = await run('img', {
      rootfsPath: process.env.MICROVM_TEST_IMAGE,
      backend: 'qemu',
      dataDir: path.join(s.dir, 'data'),
      logMaxBytes: 10_000,
      initOverride: [
        '/bin/sh',
        '-c',
        // stdout and stderr through the init's relay; the console straight from the guest.
        'head -c 100000 /dev/zero | tr "\\0" a; head -c 100000 /dev/zero | tr "\\0" b >&2; head -c 100000 /dev/zero | tr "\\0" c > /dev/console; exit 0',
      ],
    });
    vms.push(vm);
    expect(await vm.wait()).toMatchObject({ reason: 'exited', exitCode: 0 });
    for (const [stream, file, byte] of [
      ['stdout', vm.stdoutPath, 'a'],
      ['stderr', vm.stderrPath, 'b'],
      ['console', vm.consoleLogPath, 'c'],
    ] as const) {
      const text = fs.readFileSync(file as string, 'latin1');
      // (the console holds the kernel's and init's lines before the command's)
      if (stream !== 'console') expect(text.slice(0, 10_000)).toBe(byte.repeat(10_000));
      else expect(text.slice(0, 10_000)).toMatch(/c{1000}$/);
      expect(text.slice(10_000)).toBe(
        '\n[microvm: this log reached its limit of 10000 bytes; the rest is discarded]\n',
      );
      expect(vm.outputStatus()?.[stream]).toEqual({
        bytes: 10_000,
        state: 'truncated',
        discardedBytes: expect.any(Number),
      });
      expect(vm.outputStatus()?.[stream]?.discardedBytes).toBeGreaterThanOrEqual(80_000);
    }
  }, 120_000);

  test('a full disk: the output that did not fit is reported (exit 1, ERR_MICROVM_NO_SPACE); pull and cp fail with ERR_MICROVM_NO_SPACE', () => {
    // A data dir on a 40 MiB tmpfs and a 1 MiB one for a copy, in a user and mount namespace of
    // the test's own (no root needed); the CLI runs in it.
    const data = path.join(s.dir, 'data');
    const small = path.join(s.dir, 'small');
    fs.mkdirSync(data);
    fs.mkdirSync(small);
    const layout = `oci:${process.env.MICROVM_TEST_LAYOUT as string}:test`;
    const script = `
set -u
mount -t tmpfs -o size=40m tmpfs ${data}
mount -t tmpfs -o size=1m tmpfs ${small}
m() { node ${CLI} --data-dir ${data} "$@"; }
node ${CLI} --data-dir ${small} pull ${layout} > /dev/null 2> ${s.dir}/pull.err; echo "pull=$?"
m run ${layout} --backend qemu --name v -d -- /bin/sleep 600 > /dev/null
m cp v:/bin/busybox ${small}/ 2> ${s.dir}/cp.err; echo "cp=$?"
m rm -f v > /dev/null
m run ${layout} --backend qemu -- /bin/sh -c 'head -c 80000000 /dev/zero; exit 0' > /dev/null 2> ${s.dir}/run.err; echo "run=$?"
`;
    const r = spawnSync('unshare', ['-U', '-r', '-m', '--propagation', 'private', 'sh', '-c', script], {
      encoding: 'utf8',
      timeout: 170_000,
      env: { ...process.env, PATH: `${path.dirname(process.execPath)}:${process.env.PATH ?? ''}` },
    });
    const read = (f: string): string => fs.readFileSync(path.join(s.dir, f), 'utf8');
    expect(r.stdout.trim().split('\n')).toEqual(['pull=1', 'cp=1', 'run=1']);
    expect(read('pull.err')).toContain('[ERR_MICROVM_NO_SPACE]');
    expect(read('cp.err')).toContain('[ERR_MICROVM_NO_SPACE]');
    expect(read('run.err')).toMatch(/\[ERR_MICROVM_NO_SPACE\] the guest's stdout was cut after \d+ bytes/);
  }, 180_000);
});

test('microvm logs streams a log of any size (3 GiB here) in constant memory', async () => {
  const dir = path.join(s.dir, 'data', 'vms', 'big');
  fs.mkdirSync(dir, { recursive: true });
  const size = 3 * 2 ** 30;
  fs.writeFileSync(path.join(dir, 'console.log'), '');
  fs.truncateSync(path.join(dir, 'console.log'), size); // sparse: cheap to make, read as zeros
  const child = spawn(process.execPath, [CLI, 'logs', 'big', '--console', '--data-dir', path.join(s.dir, 'data')], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let bytes = 0;
  let peak = 0;
  child.stdout.on('data', (d: Buffer) => (bytes += d.length));
  const sample = setInterval(() => {
    try {
      const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${child.pid}/status`, 'utf8'));
      if (m) peak = Math.max(peak, Number(m[1]) * 1024);
    } catch {
      /* exited */
    }
  }, 20);
  const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
  clearInterval(sample);
  await new Promise((r) => setImmediate(r));
  expect({ code, bytes }).toEqual({ code: 0, bytes: size });
  expect(peak).toBeGreaterThan(0);
  expect(peak).toBeLessThan(256 * 2 ** 20); // the file is 3 GiB: far below its size, whatever the host
}, 120_000);
