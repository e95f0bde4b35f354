/**
 * The QEMU backend for a caller who is not root, on a real boot: the CLI run as an unprivileged
 * user with supplementary groups (as a login user has; `setpriv` when this test runs as root, as
 * itself otherwise) boots the test image, runs a command through the agent, reads a share, and
 * `doctor` says the file server works. A failure's message names files that still exist.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { packageRoot } from '../../lib/native';
import { layoutSkipReason, qemuSkipReason } from '../helpers';

const root = process.getuid?.() === 0;
const NOBODY = 65534;

function skipReason(): string | undefined {
  const q = qemuSkipReason();
  if (q) return q;
  if (!process.env.MICROVM_TEST_LAYOUT) return layoutSkipReason();
  if (root && spawnSync('setpriv', ['--version']).status !== 0) return 'setpriv (util-linux) is not installed';
  if (spawnSync('unshare', ['-U', '-r', '-m', 'true'], { uid: root ? NOBODY : undefined }).status !== 0)
    return 'no unprivileged user namespaces on this host';
  return undefined;
}
const skip = skipReason();

let dir: string;
/** The CLI as an unprivileged user: nobody with groups nogroup and users (root), or this user. */
function cli(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const argv = [path.join(packageRoot, 'bin', 'microvm.js'), ...args];
  const [cmd, full] = root
    ? [
        'setpriv',
        ['--reuid', String(NOBODY), '--regid', String(NOBODY), '--groups', `${NOBODY},100`, process.execPath, ...argv],
      ]
    : [process.execPath, argv];
  const r = spawnSync(cmd, full, {
    encoding: 'utf8',
    timeout: 120_000,
    cwd: dir,
    env: { ...process.env, HOME: dir, MICROVM_LIBKRUNFW_DIR: process.env.MICROVM_TEST_LIBKRUNFW_DIR },
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

(skip ? describe.skip : describe)(
  `the QEMU backend as a user who is not root${skip ? ` [skipped: ${skip}]` : ''}`,
  () => {
    let layout: string;
    let share: string;
    beforeAll(() => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'microvm-nonroot-'));
      fs.chmodSync(dir, 0o755);
      // The image and a share the user can read; the data dir theirs.
      layout = path.join(dir, 'layout');
      execFileSync('cp', ['-a', process.env.MICROVM_TEST_LAYOUT as string, layout]);
      execFileSync('chmod', ['-R', 'a+rX', layout]);
      share = path.join(dir, 'share');
      fs.mkdirSync(share);
      fs.writeFileSync(path.join(share, 'note'), 'shared with the guest\n');
      execFileSync('chmod', ['-R', 'a+rX', share]);
      fs.mkdirSync(path.join(dir, 'data'));
      if (root) execFileSync('chown', ['-R', `${NOBODY}:${NOBODY}`, path.join(dir, 'data')]);
    });
    afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

    test('doctor: the file server works for this user', () => {
      const r = cli(['doctor', '--json', '--data-dir', path.join(dir, 'data')]);
      const checks = (JSON.parse(r.stdout) as { checks: { name: string; ok: boolean }[] }).checks;
      expect(checks.find((c) => c.name === 'file-server')).toMatchObject({ ok: true });
    });

    test('run boots, the command runs (its exit code is ours) and reads a share', () => {
      const r = cli([
        'run',
        `oci:${layout}:test`,
        '--data-dir',
        path.join(dir, 'data'),
        '--backend',
        'qemu',
        '--rm',
        '-v',
        `${share}:/mnt/share:ro`,
        '--',
        '/bin/sh',
        '-c',
        'cat /mnt/share/note; echo "uid=$(id -u)"; exit 7',
      ]);
      expect({ status: r.status, stdout: r.stdout }).toEqual({ status: 7, stdout: 'shared with the guest\nuid=0\n' });
      expect(fs.readdirSync(path.join(dir, 'data', 'vms'))).toEqual([]);
    });

    test("a boot that fails: the message's file paths exist (the flight record holds the logs)", () => {
      const r = cli([
        'run',
        `oci:${layout}:test`,
        '--data-dir',
        path.join(dir, 'data'),
        '--backend',
        'qemu',
        '--boot-timeout',
        '1',
        '--',
        '/bin/true',
      ]);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/ERR_MICROVM_BOOT_(TIMEOUT|FAILED)/);
      const paths = [...r.stderr.matchAll(/(\/[\w./-]+)/g)]
        .map((m) => m[1].replace(/[.,:]+$/, ''))
        .filter((p) => p.startsWith(dir));
      expect(paths.length).toBeGreaterThan(0);
      for (const p of paths) expect([p, fs.existsSync(p)]).toEqual([p, true]);
    });
  },
);
