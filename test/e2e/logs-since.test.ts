/**
 * `microvm logs --since` on real QEMU boots: the guest init relays the command's output and notes
 * when each chunk arrived (native/guest/init.cc), the host maps the guest's clock
 * (lib/log-times.ts). The command prints, waits for a file the test creates in a share after the
 * cut-off time, then prints again: what --since prints is decided by the guest's clock alone.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { run } from '../../lib';
import { OUTPUT_TIMES_FILE } from '../../lib/log-times';
import { qemuRunArgs, qemuSkipReason, runCli, scratch } from '../helpers';

process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;
const layout = process.env.MICROVM_TEST_LAYOUT;
const skip = qemuSkipReason() ?? (layout ? undefined : 'no test layout (MICROVM_TEST_LAYOUT)');

const cli = (args: string[]): ReturnType<typeof runCli> => runCli(args);

async function until(what: string, check: () => boolean, ms = 60000): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

(skip ? describe.skip : describe)(`logs --since${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  let s: ReturnType<typeof scratch>;
  beforeEach(() => {
    s = scratch('microvm-logs-since-');
  });
  afterEach(() => s.cleanup());

  test('prints only what arrived after the time, per stream; -n on top; durations and Unix seconds; the console and bad values refused', async () => {
    const share = path.join(s.dir, 'share');
    fs.mkdirSync(share);
    const started = cli([
      ...qemuRunArgs(layout, s.dir),
      '--name',
      'since',
      '--detach',
      '-v',
      `${share}:/share`,
      '--',
      '/bin/sh',
      '-c',
      'echo early-1; echo early-2; echo early-err >&2; while [ ! -e /share/go ]; do sleep 0.05; done; echo late-1; echo late-2; echo late-err >&2; sleep 600',
    ]);
    expect(started).toMatchObject({ code: 0 });
    const vmDir = path.join(s.dir, 'vms', 'since');
    try {
      const out = (f: string): string => fs.readFileSync(path.join(vmDir, f), 'utf8');
      await until(
        'the early output',
        () => out('stdout.log').includes('early-2') && out('stderr.log').includes('early-err'),
      );
      await new Promise((r) => setTimeout(r, 1000)); // wide of the guest clock mapping error under load
      const cut = Date.now();
      await new Promise((r) => setTimeout(r, 1000)); // wide of the guest clock mapping error under load
      fs.writeFileSync(path.join(share, 'go'), '');
      await until(
        'the late output',
        () => out('stdout.log').includes('late-2') && out('stderr.log').includes('late-err'),
      );

      const since = (value: string, ...more: string[]) =>
        cli(['logs', 'since', '--since', value, ...more, '--data-dir', s.dir]);
      expect(since(new Date(cut).toISOString())).toEqual({ code: 0, stdout: 'late-1\nlate-2\n', stderr: 'late-err\n' });
      expect(since((cut / 1000).toFixed(3))).toEqual({ code: 0, stdout: 'late-1\nlate-2\n', stderr: 'late-err\n' });
      expect(since(new Date(cut).toISOString(), '-n', '1')).toEqual({
        code: 0,
        stdout: 'late-2\n',
        stderr: 'late-err\n',
      });
      expect(since('1h')).toEqual({
        code: 0,
        stdout: 'early-1\nearly-2\nlate-1\nlate-2\n',
        stderr: 'early-err\nlate-err\n',
      });
      expect(since(new Date(Date.now() + 60000).toISOString())).toEqual({ code: 0, stdout: '', stderr: '' });
      // The index is the init's: one line per note, in order.
      expect(out(OUTPUT_TIMES_FILE)).toMatch(/^([12] \d+ \d+\n)+$/);

      expect(since('1h', '--console')).toMatchObject({
        code: 1,
        stderr: expect.stringContaining('[ERR_MICROVM_LOG_TIMES]'),
      });
      expect(since('last tuesday')).toMatchObject({ code: 2, stderr: expect.stringMatching(/--since takes a time/) });
    } finally {
      cli(['rm', '-f', 'since', '--data-dir', s.dir]);
    }
  });

  test('the relay: a command that ends leaving a process that writes on still ends the VM with its code, its own output complete', async () => {
    const vm = await run(`oci:${layout}:test`, {
      backend: 'qemu',
      dataDir: s.dir,
      name: 'orphan',
      initOverride: ['/bin/sh', '-c', 'seq 1 3000; echo to-err >&2; (while true; do echo orphan; done) & exit 3'],
      agent: false,
    });
    try {
      expect(await vm.wait()).toMatchObject({ reason: 'exited', exitCode: 3 });
      const out = fs.readFileSync(path.join(vm.dataDir, 'stdout.log'), 'utf8');
      const expected = `${Array.from({ length: 3000 }, (_, i) => i + 1).join('\n')}\n`;
      expect(out.slice(0, expected.length)).toBe(expected);
      expect(fs.readFileSync(path.join(vm.dataDir, 'stderr.log'), 'utf8')).toBe('to-err\n');
    } finally {
      await vm.remove();
    }
  });

  test('outputTimes: false: the output goes straight to the ports (no index), and --since says why it cannot', async () => {
    const vm = await run(`oci:${layout}:test`, {
      backend: 'qemu',
      dataDir: s.dir,
      name: 'straight',
      initOverride: ['/bin/sh', '-c', 'echo out; echo err >&2'],
      agent: false,
      outputTimes: false,
    });
    try {
      expect(await vm.wait()).toMatchObject({ reason: 'exited', exitCode: 0 });
      expect(fs.readFileSync(path.join(vm.dataDir, 'stdout.log'), 'utf8')).toBe('out\n');
      expect(fs.readFileSync(path.join(vm.dataDir, 'stderr.log'), 'utf8')).toBe('err\n');
      expect(fs.existsSync(path.join(vm.dataDir, OUTPUT_TIMES_FILE))).toBe(false);
      const r = cli(['logs', 'straight', '--since', '1h', '--data-dir', s.dir]);
      expect(r).toMatchObject({ code: 1, stdout: '', stderr: expect.stringContaining('[ERR_MICROVM_LOG_TIMES]') });
    } finally {
      await vm.remove();
    }
  });
});
