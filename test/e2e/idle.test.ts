/**
 * Idle VMs (`run(image, { idle: true })`, `microvm run -d --idle`): on real QEMU boots the guest
 * runs no command of its own, stays up, and serves exec with the image's Env, WorkingDir and User.
 * The option's conflicts are refused with Node's argument code before anything starts.
 */
import * as path from 'node:path';
import { run } from '../../lib';
import { qemuRunArgs, qemuSkipReason, runCli, scratch } from '../helpers';

process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;
const layout = process.env.MICROVM_TEST_LAYOUT;
const skip = qemuSkipReason();
const cliSkip = skip ?? (layout ? undefined : 'no test layout (MICROVM_TEST_LAYOUT)');

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-idle-');
});
afterEach(() => s.cleanup());

test('idle excludes initOverride and agent: false (ERR_INVALID_ARG_VALUE, nothing started)', async () => {
  const dataDir = path.join(s.dir, 'data');
  await expect(run('x', { idle: true, initOverride: ['/bin/true'], dataDir })).rejects.toMatchObject({
    code: 'ERR_INVALID_ARG_VALUE',
    message: expect.stringMatching(/initOverride/),
  });
  await expect(run('x', { idle: true, agent: false, dataDir })).rejects.toMatchObject({
    code: 'ERR_INVALID_ARG_VALUE',
    message: expect.stringMatching(/agent/),
  });
  await expect(run('x', { idle: 'yes' as unknown as boolean, dataDir })).rejects.toMatchObject({
    code: 'ERR_INVALID_ARG_TYPE',
  });
});

(skip ? describe.skip : describe)(`idle VMs on QEMU${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  test("runs nothing, stays up, and execs with the image's Env, WorkingDir and User", async () => {
    const vm = await run('test-image', {
      rootfsPath: process.env.MICROVM_TEST_IMAGE,
      imageConfig: { entrypoint: ['/bin/false'], env: ['FROM_IMAGE=yes'], workingDir: '/tmp', user: '1000:1001' },
      dataDir: path.join(s.dir, 'data'),
      backend: 'qemu',
      idle: true,
    });
    try {
      // The image's Entrypoint (/bin/false) did not run: the VM is still up a moment later.
      await new Promise((r) => setTimeout(r, 1500));
      expect(vm.status().state).toBe('running');
      const r = await vm.exec(['sh', '-c', 'echo "$(id -u):$(id -g) $(pwd) $FROM_IMAGE"']);
      expect(r).toMatchObject({ exitCode: 0, stdout: '1000:1001 /tmp yes\n' });
      // A call may still name its own user.
      expect((await vm.exec(['id', '-u'], { user: 'root' })).stdout).toBe('0\n');
    } finally {
      await vm.remove();
    }
  }, 120_000);
});

(cliSkip ? describe.skip : describe)(`microvm run --idle${cliSkip ? ` [skipped: ${cliSkip}]` : ''}`, () => {
  test('run -d --idle, then exec; --idle with a command is a usage error', () => {
    const bad = runCli([...qemuRunArgs(layout, s.dir), '--idle', '--', '/bin/true']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/--idle runs no command/);
    const started = runCli([...qemuRunArgs(layout, s.dir), '--name', 'box', '-d', '--idle']);
    expect(started).toMatchObject({ code: 0, stdout: 'box\n' });
    try {
      expect(runCli(['exec', 'box', '--data-dir', s.dir, '--', 'echo', 'hi'])).toMatchObject({
        code: 0,
        stdout: 'hi\n',
      });
      expect(runCli(['ps', '--data-dir', s.dir]).stdout).toMatch(/^box\s+running\s/m);
    } finally {
      runCli(['rm', '-f', 'box', '--data-dir', s.dir]);
    }
  }, 180_000);
});
