/** The CLI's agent commands on real QEMU boots: exec -i/-t/-e/-w/-u, cp both ways, run -i/-it. */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { packageRoot } from '../lib/native';
import { layoutSkipReason, qemuSkipReason, runCli, scratch } from './helpers';

const bin = path.join(packageRoot, 'bin', 'microvm.js');
const skip = qemuSkipReason() ?? layoutSkipReason();
const image = `oci:${process.env.MICROVM_TEST_LAYOUT}:test`;

let s: ReturnType<typeof scratch>;
let dataDir: string;

const cli = (args: string[], input?: string): ReturnType<typeof runCli> => runCli(args, { input });

function hasScript(): boolean {
  return spawnSync('script', ['--version'], { stdio: 'ignore' }).status === 0;
}

(skip ? describe.skip : describe)(`CLI through the guest agent${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  beforeAll(() => {
    s = scratch('microvm-cli-agent-');
    dataDir = path.join(s.dir, 'data');
    const started = cli([
      'run',
      '-d',
      '--name',
      'web',
      '-e',
      'FROM_RUN=r',
      '--data-dir',
      dataDir,
      image,
      '--',
      '/bin/sleep',
      '600',
    ]);
    expect(started).toMatchObject({ code: 0, stdout: 'web\n' });
  }, 120_000);
  afterAll(() => {
    cli(['rm', '-f', '--data-dir', dataDir, 'web']);
    s.cleanup();
  });

  test('exec: stdin with -i, exit codes passed through, -e/-w/-u, 128+N after a signal', () => {
    expect(cli(['exec', '-i', '--data-dir', dataDir, 'web', '--', 'cat'], 'hi\n')).toEqual({
      code: 0,
      stdout: 'hi\n',
      stderr: '',
    });
    // without -i the command's stdin is empty
    expect(cli(['exec', '--data-dir', dataDir, 'web', '--', 'cat'], 'ignored\n')).toMatchObject({
      code: 0,
      stdout: '',
    });
    expect(
      cli([
        'exec',
        '-e',
        'A=1',
        '-w',
        '/tmp',
        '-u',
        '1000',
        '--data-dir',
        dataDir,
        'web',
        '--',
        'sh',
        '-c',
        'echo $A $FROM_RUN $(pwd) $(id -u) >&2; exit 4',
      ]),
    ).toEqual({ code: 4, stdout: '', stderr: '1 r /tmp 1000\n' });
    expect(cli(['exec', '--data-dir', dataDir, 'web', '--', 'sh', '-c', 'kill -TERM $$']).code).toBe(143);
    expect(cli(['exec', '--data-dir', dataDir, 'web', '--', '/no/such']).code).toBe(127);
    expect(cli(['exec', '--json', '--data-dir', dataDir, 'web', '--', 'echo', 'j'])).toMatchObject({
      code: 0,
      stdout: `${JSON.stringify({ stdout: 'j\n', stderr: '', exitCode: 0, signal: null })}\n`,
    });
    expect(cli(['exec', '-e', 'bad', '--data-dir', dataDir, 'web', '--', 'true'])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining('[ERR_MICROVM_USAGE] -e takes KEY=VALUE'),
    });
    expect(cli(['exec', '--data-dir', dataDir, 'nope', '--', 'true'])).toMatchObject({
      code: 1,
      stderr: expect.stringContaining('[ERR_MICROVM_VM_NOT_FOUND]'),
    });
  });

  test('cp both ways: a tree in, the same tree out; a missing source is a coded error and leaves nothing', () => {
    const src = path.join(s.dir, 'd');
    fs.mkdirSync(path.join(src, 'sub'), { recursive: true });
    fs.writeFileSync(path.join(src, 'sub', 'f'), 'content', { mode: 0o640 });
    expect(cli(['cp', '--data-dir', dataDir, src, 'web:/root/'])).toMatchObject({ code: 0, stdout: '' });
    expect(cli(['exec', '--data-dir', dataDir, 'web', '--', 'stat', '-c', '%a %s', '/root/d/sub/f']).stdout).toBe(
      '640 7\n',
    );
    const back = path.join(s.dir, 'back');
    expect(cli(['cp', '--data-dir', dataDir, 'web:/root/d', back]).code).toBe(0);
    expect(fs.readFileSync(path.join(back, 'sub', 'f'), 'utf8')).toBe('content');
    expect(cli(['cp', '--data-dir', dataDir, 'web:/no/such', path.join(s.dir, 'x')])).toMatchObject({
      code: 1,
      stderr: expect.stringContaining('[ERR_MICROVM_GUEST_FILE]'),
    });
    expect(fs.existsSync(path.join(s.dir, 'x'))).toBe(false);
    expect(cli(['cp', '--data-dir', dataDir, src, path.join(s.dir, 'y')])).toMatchObject({ code: 2 });
  });

  test('run -i: the command runs through the agent on stdin, its exit code is ours, and --rm leaves nothing', () => {
    const r = cli(
      ['run', '-i', '--rm', '--name', 'once', '--data-dir', dataDir, image],
      'echo in-vm $(hostname); exit 3\n',
    );
    expect(r).toMatchObject({ code: 3, stdout: 'in-vm microvm\n' });
    expect(fs.readdirSync(path.join(dataDir, 'vms'))).toEqual(['web']);
    expect(cli(['run', '-it', '-d', '--data-dir', dataDir, image]).code).toBe(2);
  });

  (hasScript() ? test : test.skip)(
    `run -it: a terminal of this size${hasScript() ? '' : ' [skipped: no script(1) to make a pseudo-terminal]'}`,
    () => {
      const command = `stty rows 30 cols 90; ${process.execPath} ${bin} run -it --rm --data-dir ${dataDir} ${image} -- /bin/sh -c 'stty size; exit 6'`;
      const r = spawnSync('script', ['-qec', command, '/dev/null'], {
        encoding: 'utf8',
        timeout: 120_000,
        env: { ...process.env, MICROVM_LIBKRUNFW_DIR: process.env.MICROVM_TEST_LIBKRUNFW_DIR },
      });
      expect(r.stdout).toContain('30 90');
      expect(r.status).toBe(6);
    },
  );
});
