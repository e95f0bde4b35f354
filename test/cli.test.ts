/** The `microvm` CLI as a child process: exit codes, --json shapes, the --trace tree, doctor, VMs. */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { packageRoot } from '../lib/native';
import { layoutSkipReason, qemuRunArgs, runCli, scratch } from './helpers';
import { makeHost } from './host/fake-host';

const bin = path.join(packageRoot, 'bin', 'microvm.js');
const layout = process.env.MICROVM_TEST_LAYOUT;
let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-cli-');
});
afterEach(() => s.cleanup());

const cli = (args: string[], timeout = 120000, env: Record<string, string> = {}): ReturnType<typeof runCli> =>
  runCli(args, { timeout, env });

describe('usage', () => {
  test('--help for the tool and for run; usage errors exit 2', () => {
    expect(cli(['--help'])).toMatchObject({ code: 0, stdout: expect.stringContaining('Commands:') });
    expect(cli(['run', '--help'])).toMatchObject({ code: 0, stdout: expect.stringContaining('--trace') });
    expect(cli(['run', '--egress', 'maybe', 'img'])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining('[ERR_MICROVM_USAGE] --egress takes allow or deny, not "maybe"'),
    });
    expect(cli(['run', '--allow-host', 'svc.test:http', 'img'])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining(
        '--allow-host takes HOST, *.HOST, HOST:PORT[/udp] or HOST:PORT=ADDRESS, not "svc.test:http"',
      ),
    });
    expect(cli(['run', '--allow-host', 'a.test:80', '--allow-host', '*b.test:443', 'img'])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining(
        'egress rules: egress.allow[1].host "*b.test" is not a host name (a wildcard is "*." before a name)',
      ),
    });
    expect(cli(['run', '--allow-cidr', '10.0.0.0/33', 'img'])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining(
        'egress rules: egress.allow[0].cidr "10.0.0.0/33" is not an address or a network',
      ),
    });
    expect(cli(['run', '--deny-cidr', '10.0.0.0/8:80/icmp', 'img'])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining('--deny-cidr takes CIDR, CIDR:PORT[/udp] or [IPV6-CIDR]:PORT[/udp]'),
    });
    expect(cli(['run', '--dns', '8.8.8.8:99999', 'img'])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining('egress.dns "8.8.8.8:99999" is not a resolver address'),
    });
    expect(cli(['run', '--allow-host', 'a.test:80', '--egress', 'deny', 'img'])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining('--egress deny and rules: drop --egress'),
    });
    for (const c of [
      'pull',
      'images',
      'cache',
      'prune',
      'ps',
      'inspect',
      'port',
      'logs',
      'stop',
      'rm',
      'exec',
      'cp',
      'doctor',
      'bench',
    ]) {
      expect([c, cli([c, '--help']).stdout.startsWith(`microvm ${c}`)]).toEqual([c, true]);
    }
    expect(cli([]).code).toBe(2);
    expect(cli(['frobnicate'])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining('[ERR_MICROVM_USAGE] unknown command'),
    });
    const pkgVersion = (
      JSON.parse(fs.readFileSync(path.join(packageRoot, 'package.json'), 'utf8')) as { version: string }
    ).version;
    expect(cli(['--version'])).toMatchObject({ code: 0, stdout: `${pkgVersion}\n` });
    expect(cli(['-V'])).toMatchObject({ code: 0, stdout: `${pkgVersion}\n` });
    expect(cli(['rm', '--data-dir', s.dir])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining('[ERR_MICROVM_USAGE]'),
    });
    expect(cli(['stop', '-t', 'soon', 'x', '--data-dir', s.dir])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining('-t takes'),
    });
    expect(cli(['run', 'img', '--cpus', 'two'])).toMatchObject({ code: 2, stderr: expect.stringContaining('--cpus') });
    expect(cli(['logs', 'nope', '--data-dir', s.dir])).toMatchObject({
      code: 1,
      stderr: expect.stringContaining('ERR_MICROVM_VM_NOT_FOUND'),
    });
  });

  test('--data-dir=DIR and --data-dir DIR mean the same for every command; an unknown option is a usage error', () => {
    const a = path.join(s.dir, 'a');
    const def = path.join(s.dir, 'default');
    for (const root of [a, def]) {
      fs.mkdirSync(path.join(root, 'vms', 'victim'), { recursive: true });
      fs.writeFileSync(path.join(root, 'vms', 'victim', 'console.log'), 'x');
    }
    const env = { MICROVM_DATA_DIR: def };
    expect(cli(['rm', `--data-dir=${a}`, 'victim'], 120000, env)).toMatchObject({ code: 0 });
    expect(fs.existsSync(path.join(a, 'vms', 'victim'))).toBe(false);
    expect(fs.existsSync(path.join(def, 'vms', 'victim'))).toBe(true);
    expect(JSON.parse(cli(['ps', '-a', '--json', `--data-dir=${a}`], 120000, env).stdout)).toEqual([]);
    expect(JSON.parse(cli(['ps', '-a', '--json', '--data-dir', def], 120000, env).stdout)).toEqual([
      expect.objectContaining({ name: 'victim' }),
    ]);
    expect(cli(['logs', 'victim', `--data-dir=${def}`], 120000, env)).toMatchObject({ code: 0, stdout: 'x' });
    expect(cli(['rm', '--data-dri', a, 'victim'], 120000, env)).toMatchObject({
      code: 2,
      stderr: expect.stringContaining("Unknown option '--data-dri'"),
    });
    expect(fs.existsSync(path.join(def, 'vms', 'victim'))).toBe(true);
  });

  test('global options before the command work as after it; an option given twice is a usage error; bad -v shares are refused before anything starts; cp to a missing VM says so', () => {
    const data = path.join(s.dir, 'g');
    expect(cli(['--data-dir', data, 'ps', '-a', '--json'])).toMatchObject({ code: 0, stdout: '[]\n' });
    expect(cli([`--data-dir=${data}`, '--json', 'images'])).toMatchObject({ code: 0, stdout: '[]\n' });
    expect(cli(['run', 'img', '--name', 'a', '--name', 'b', '--data-dir', data])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining('--name was given twice'),
    });
    expect(cli(['ps', '--data-dir', data, '--data-dir', data])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining('--data-dir was given twice'),
    });
    const share = path.join(s.dir, 'share');
    fs.mkdirSync(share);
    fs.writeFileSync(path.join(s.dir, 'file'), '');
    for (const [spec, code, why] of [
      [`${share}:/mnt/../etc`, 'ERR_MICROVM_UNSAFE_PATH', 'plain absolute guest path'],
      [`${share}:/mnt/a\nb`, 'ERR_MICROVM_UNSAFE_PATH', 'plain absolute guest path'],
      [`${path.join(s.dir, 'missing')}:/mnt`, 'ERR_MICROVM_SHARE_SOURCE', 'cannot be reached (ENOENT)'],
      [`${path.join(s.dir, 'file')}:/mnt`, 'ERR_MICROVM_SHARE_SOURCE', 'is not one'],
    ]) {
      const r = cli(['run', 'img', '--data-dir', data, '--backend', 'qemu', '-v', spec]);
      expect({ code: r.code, stderr: r.stderr }).toEqual({ code: 1, stderr: expect.stringContaining(code) });
      expect(r.stderr).toContain(why);
    }
    expect(fs.existsSync(path.join(data, 'vms'))).toBe(false);
    expect(cli(['cp', 'nosuchvm:/etc/hostname', s.dir, '--data-dir', data])).toMatchObject({
      code: 1,
      stderr: expect.stringContaining('[ERR_MICROVM_VM_NOT_FOUND] no VM named nosuchvm'),
    });
  });

  test('run: --pull takes missing | always | never; a -v path with a comma (option injection into virtiofsd) is refused, naming the option', () => {
    expect(cli(['run', 'img', '--pull', 'sometimes', '--data-dir', s.dir])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining("Expected --pull to be 'always', 'missing' or 'never'"),
    });
    const outside = path.join(s.dir, 'outside');
    fs.mkdirSync(outside);
    const r = cli(['run', 'img', '--data-dir', s.dir, '--backend', 'qemu', '-v', `/tmp/a,source=${outside}:/mnt/x`]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/ERR_MICROVM_UNSAFE_PATH[\s\S]*virtiofs\[0\]\.hostPath/);
    expect(fs.existsSync(path.join(s.dir, 'vms'))).toBe(false); // refused before anything was made
  });

  test('doctor on a PVM host, a host without /dev/kvm and a hardware-KVM host (fake host trees): the reason, and QEMU with TCG', () => {
    const env = (root: string): Record<string, string> => ({ MICROVM_HOST_PROBE_ROOT: root });
    const pvm = path.join(s.dir, 'pvm');
    makeHost(pvm, { flags: 'fpu sse2 hypervisor', modules: ['kvm', 'kvm_pvm'] });
    const r = cli(['doctor', '--json', '--data-dir', s.dir], 120000, env(pvm));
    const j = JSON.parse(r.stdout) as {
      checks: { name: string; ok: boolean; message?: string }[];
      backend: string;
      accel: { accel: string };
      kvm: { kind: string };
      ready: boolean;
    };
    expect(j.checks.map((c) => c.name)).toEqual([
      'kvm',
      'libkrun',
      'libkrunfw',
      'qemu',
      'egress-filter',
      'user-namespaces',
      'file-server',
      'disk-space',
    ]);
    expect(j).toMatchObject({ backend: 'qemu', accel: { accel: 'tcg' }, kvm: { kind: 'pvm' } });
    expect(r.code).toBe(j.ready ? 0 : 1);
    const text = cli(['doctor', '--data-dir', s.dir], 120000, env(pvm)).stdout;
    expect(text).toContain('/dev/kvm is PVM software virtualization: hardware KVM unavailable; QEMU will use TCG');
    expect(text).toMatch(/backend 'auto' will use: qemu with TCG/);
    const none = path.join(s.dir, 'none');
    makeHost(none, { flags: 'fpu vmx', modules: ['kvm_intel'], device: 'none' });
    expect(cli(['doctor', '--data-dir', s.dir], 120000, env(none)).stdout).toMatch(
      /MISS kvm +\S+ does not exist[\s\S]*backend 'auto' will use: qemu with TCG/,
    );
    const hw = path.join(s.dir, 'hw');
    makeHost(hw, { flags: 'fpu vmx', modules: ['kvm_intel'] });
    const h = JSON.parse(cli(['doctor', '--json', '--data-dir', s.dir], 120000, env(hw)).stdout) as {
      checks: { name: string; ok: boolean }[];
      backend: string;
      accel: { accel: string };
    };
    expect(h.checks.find((c) => c.name === 'kvm')?.ok).toBe(true);
    // With hardware KVM, 'auto' is libkrun where libkrun loads, else QEMU with KVM.
    expect(h.backend === 'libkrun' || h.accel.accel === 'kvm').toBe(true);
  });
});

(layout ? describe : describe.skip)(`VMs from the CLI${layout ? '' : ` [skipped: ${layoutSkipReason()}]`}`, () => {
  test('run -- CMD: streams the output and exits with the guest code; --trace prints every stage', () => {
    const r = cli([
      ...qemuRunArgs(layout, s.dir),
      '--rm',
      '--trace',
      '--',
      '/bin/sh',
      '-c',
      'echo hi from the guest; exit 3',
    ]);
    expect(r.code).toBe(3);
    expect(r.stdout).toContain('hi from the guest');
    for (const stage of [
      'microvm.Run',
      'microvm.Preflight',
      'microvm.ImagePull',
      'microvm.image.Extract',
      'microvm.RootfsClone',
      'microvm.RootfsHooks',
      'microvm.BackendPrepare',
      'microvm.NetworkStart',
      'microvm.VMSpawn',
      'microvm.PostBoot',
    ]) {
      expect([stage, r.stderr.includes(stage)]).toEqual([stage, true]);
    }
    // Durations of the stages add up within the root's.
    const dur = (name: string): number =>
      Number(new RegExp(`^\\s*${name.replace('.', '\\.')}\\s+([\\d.]+) s`, 'm').exec(r.stderr)?.[1]);
    const stages = [
      'microvm.Preflight',
      'microvm.ImagePull',
      'microvm.RootfsClone',
      'microvm.RootfsHooks',
      'microvm.BackendPrepare',
      'microvm.NetworkStart',
      'microvm.VMSpawn',
      'microvm.PostBoot',
    ];
    expect(stages.reduce((n, x) => n + dur(x), 0)).toBeLessThanOrEqual(dur('microvm.Run') + 0.001 * stages.length);
    expect(r.stderr).toContain('◀ largest stage');
  });

  test('pull shows per-layer progress bars on a terminal (script gives it a pty), plain output otherwise', () => {
    const cmd = `${process.execPath} ${bin} pull oci:${layout}:test --data-dir ${s.dir}`;
    const tty = spawnSync('script', ['-qec', cmd, '/dev/null'], { encoding: 'utf8', env: process.env });
    expect(tty.status).toBe(0);
    expect(tty.stdout).toMatch(/\rlayer 1\/2 \[[#.]{20}\] \d+%/);
    expect(tty.stdout).toMatch(/layer 2\/2 \[#{20}\] 100%/);
    const plain = cli(['pull', `oci:${layout}:test`, '--data-dir', path.join(s.dir, 'plain')]);
    expect(plain.stderr).toMatch(/^layer 1\/2 sha256:[a-f0-9]{12} [\d.]+ MB\nlayer 2\/2 /);
    expect(plain.stderr).not.toContain('[');
    expect(plain.stdout).toMatch(/^sha256:[a-f0-9]{64} {2}pulled/);
  });

  test('-v shares host directories: read-write writes through, :ro is refused', () => {
    const rw = path.join(s.dir, 'rw');
    const ro = path.join(s.dir, 'ro');
    fs.mkdirSync(rw);
    fs.mkdirSync(ro);
    fs.writeFileSync(path.join(ro, 'in'), 'from the host\n');
    const r = cli([
      ...qemuRunArgs(layout, path.join(s.dir, 'd')),
      '--rm',
      '-v',
      `${rw}:/mnt/rw`,
      '-v',
      `${ro}:/mnt/ro:ro`,
      '--',
      '/bin/sh',
      '-c',
      'cat /mnt/ro/in; echo from the guest > /mnt/rw/out; touch /mnt/ro/nope 2>/dev/null && exit 9; exit 0',
    ]);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('from the host');
    expect(fs.readFileSync(path.join(rw, 'out'), 'utf8')).toBe('from the guest\n');
    expect(fs.existsSync(path.join(ro, 'nope'))).toBe(false);
    expect(cli(['run', 'img', '-v', 'nocolon'])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining('-v takes HOST:GUEST'),
    });
  });

  test('logs -f follows the console of a running VM', async () => {
    const started = cli([
      ...qemuRunArgs(layout, s.dir),
      '--name',
      'ticker',
      '--detach',
      '--',
      '/bin/sh',
      '-c',
      'i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done',
    ]);
    expect(started.code).toBe(0);
    const follower = spawn(process.execPath, [bin, 'logs', 'ticker', '-f', '--data-dir', s.dir], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    try {
      const seen = await new Promise<string>((resolve, reject) => {
        let text = '';
        const timer = setTimeout(() => reject(new Error(`only saw: ${text}`)), 60000);
        follower.stdout.on('data', (d: Buffer) => {
          text += d.toString();
          // A line that appeared after the follower started proves it follows, not just prints.
          if (/tick [5-9]\d*/.test(text)) {
            clearTimeout(timer);
            resolve(text);
          }
        });
      });
      expect(seen).toMatch(/tick 0/);
    } finally {
      follower.kill('SIGTERM');
      cli(['rm', '-f', 'ticker', '--data-dir', s.dir]);
    }
  });

  test('bench: per-stage p50/p90 from the spans', () => {
    const r = cli(['bench', `oci:${layout}:test`, '-n', '2', '--backend', 'qemu', '--data-dir', s.dir, '--json']);
    expect(r.code).toBe(0);
    const rows = JSON.parse(r.stdout) as { span: string; runs: number; p50: number; p90: number }[];
    const run = rows.find((x) => x.span === 'microvm.Run');
    expect(run).toMatchObject({ runs: 2 });
    expect((run as { p90: number }).p90).toBeGreaterThanOrEqual((run as { p50: number }).p50);
    expect(rows.map((x) => x.span)).toEqual(
      expect.arrayContaining([
        'microvm.ImagePull',
        'microvm.VMSpawn',
        'microvm.backend.ResolveFirmware',
        'microvm.guest.Kernel',
        'microvm.guest.Exec',
      ]),
    );
    // The command's whole life is measured too (microvm.Run ends once the VM is up).
    const toExit = rows.find((x) => x.span === "(run() to the command's exit)") as { p50: number; runs: number };
    expect(toExit.runs).toBe(2);
    expect(toExit.p50).toBeGreaterThan((run as { p50: number }).p50);
    // ... and the first output of the default command (echo ready), before its exit.
    const first = rows.find((x) => x.span === "(run() to the command's first output)") as { p50: number; runs: number };
    expect(first.runs).toBe(2);
    expect(first.p50).toBeGreaterThan(0);
    expect(first.p50).toBeLessThanOrEqual(toExit.p50);
    expect(rows.map((x) => x.span)).toContain('microvm.AgentWaitReady');
    const text = cli(['bench', `oci:${layout}:test`, '-n', '1', '--backend', 'qemu', '--data-dir', s.dir]);
    expect(text.stdout.split('\n')[0]).toMatch(/, 1 runs, backend qemu \(accel (tcg|kvm)\)$/);
  });

  test('run --json: one JSON object with how the VM ended, the output and spans', () => {
    const r = cli([
      ...qemuRunArgs(layout, s.dir),
      '--rm',
      '--json',
      '--',
      '/bin/sh',
      '-c',
      'echo json-out; echo json-err >&2; exit 5',
    ]);
    expect(r.code).toBe(5);
    const j = JSON.parse(r.stdout) as {
      exitCode: number;
      stdout: string;
      backend: string;
      spans: { name: string; parentSpanId?: string }[];
    };
    expect(j).toMatchObject({
      reason: 'exited',
      exitCode: 5,
      signal: null,
      error: null,
      backend: 'qemu',
      stdout: 'json-out\n',
      stderr: 'json-err\n',
    });
    expect(j.spans.map((x) => x.name)).toContain('microvm.Run');
  });

  test("stdout carries exactly the command's stdout: $(microvm run IMG -- cat FILE) is the file, byte for byte", () => {
    const r = cli([
      'run',
      `oci:${layout}:test`,
      '--data-dir',
      s.dir,
      '--rm',
      '--',
      '/bin/sh',
      '-c',
      'cat /etc/layer2; printf "no newline\\r\\n"; echo to-stderr >&2',
    ]);
    expect(r.code).toBe(0);
    expect(r.stdout).toBe('from layer 2\nno newline\r\n');
    expect(r.stderr).toBe('to-stderr\n');
  });

  test('SIGINT (Ctrl-C) stops the VM and exits 130; SIGTERM 143; the VM is gone', async () => {
    for (const [sig, code] of [
      ['SIGINT', 130],
      ['SIGTERM', 143],
    ] as const) {
      const data = path.join(s.dir, sig);
      const child = spawn(
        process.execPath,
        [
          bin,
          'run',
          `oci:${layout}:test`,
          '--data-dir',
          data,
          '--json',
          '--',
          '/bin/sh',
          '-c',
          'echo up > /dev/console; sleep 600',
        ],
        {
          stdio: ['ignore', 'pipe', 'inherit'],
          env: { ...process.env, MICROVM_LIBKRUNFW_DIR: process.env.MICROVM_TEST_LIBKRUNFW_DIR },
        },
      );
      let out = '';
      child.stdout.on('data', (d: Buffer) => (out += d.toString()));
      const exited = new Promise<number | null>((resolve) => child.once('exit', (c: number | null) => resolve(c)));
      // Signal once the guest command runs (its line on the console).
      const consoleOf = (): string => {
        try {
          const vms = fs.readdirSync(path.join(data, 'vms'));
          return vms.length ? fs.readFileSync(path.join(data, 'vms', vms[0], 'console.log'), 'utf8') : '';
        } catch {
          return '';
        }
      };
      for (let i = 0; i < 600 && !consoleOf().includes('up'); i++) await new Promise((r) => setTimeout(r, 100));
      child.kill(sig);
      expect([sig, await exited]).toEqual([sig, code]);
      expect(JSON.parse(out)).toMatchObject({ reason: 'stopped', exitCode: null, interruptedBy: sig });
      const left = fs.readdirSync('/proc').filter((p: string) => {
        try {
          return /^\d+$/.test(p) && fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(data);
        } catch {
          return false;
        }
      });
      expect([sig, left]).toEqual([sig, []]);
    }
  });

  test('--accel kvm where there is no /dev/kvm: a coded error at once, exit 1; a bad --accel is a usage error', () => {
    const none = path.join(s.dir, 'host');
    makeHost(none, { flags: 'fpu', modules: [], device: 'none' });
    const r = cli(
      ['run', `oci:${layout}:test`, '--data-dir', s.dir, '--rm', '--accel', 'kvm', '--', '/bin/true'],
      120000,
      { MICROVM_HOST_PROBE_ROOT: none },
    );
    expect(r).toMatchObject({
      code: 1,
      stdout: '',
      stderr: expect.stringContaining('[ERR_MICROVM_KVM_UNAVAILABLE]'),
    });
    expect(cli(['run', 'img', '--accel', 'fast'])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining('--accel'),
    });
  });

  test('exec over SSH into a detached VM started with --ssh', () => {
    const started = cli([
      ...qemuRunArgs(layout, s.dir),
      '--name',
      'sshvm',
      '--ssh',
      '--detach',
      '--',
      '/usr/sbin/dropbear',
      '-F',
      '-E',
      '-r',
      '/etc/dropbear/dropbear_ed25519_host_key',
      '-p',
      '22',
    ]);
    expect(started.code).toBe(0);
    try {
      const r = cli(['exec', 'sshvm', '--data-dir', s.dir, '--', 'sh', '-c', 'cat /etc/layer2; exit 6']);
      expect(r).toMatchObject({ code: 6, stdout: 'from layer 2\n', stderr: '' });
    } finally {
      cli(['rm', '-f', 'sshvm', '--data-dir', s.dir]);
    }
  });

  test('docker habits: pull, images (header, -q), run -d -p GUEST, ps (running only, header, -a, -q), port, inspect, logs --tail, rm refuses a running VM, stop -t, rm NAME..., cache purge', async () => {
    expect(cli(['pull', `oci:${layout}:test`, '--data-dir', s.dir]).code).toBe(0);
    const imgs = JSON.parse(cli(['images', '--json', '--data-dir', s.dir]).stdout) as {
      digest: string;
      references: string[];
    }[];
    expect(imgs).toEqual([expect.objectContaining({ references: [`oci:${layout}:test`] })]);
    const imagesText = cli(['images', '--data-dir', s.dir]).stdout.split('\n');
    expect(imagesText[0]).toMatch(/^DIGEST\s+SIZE\s+LAST USED\s+REFERENCES$/);
    expect(imagesText[1]).toContain(`oci:${layout}:test`);
    expect(cli(['images', '-q', '--data-dir', s.dir]).stdout).toBe(`${imgs[0].digest}\n`);
    const started = cli([
      ...qemuRunArgs(layout, s.dir),
      '--name',
      'bg',
      '-d',
      '-p',
      '8080',
      '--',
      '/bin/sh',
      '-c',
      'mkdir -p /tmp/w; echo served > /tmp/w/i; echo line1; echo in the background; exec busybox httpd -f -p 8080 -h /tmp/w',
    ]);
    expect(started).toMatchObject({ code: 0, stdout: 'bg\n' });
    const ps = JSON.parse(cli(['ps', '--json', '--data-dir', s.dir]).stdout) as {
      name: string;
      running: boolean;
      ports: { host: number; guest: number }[];
    }[];
    expect(ps).toEqual([expect.objectContaining({ name: 'bg', running: true })]);
    const host = ps[0].ports[0].host;
    expect(ps[0].ports).toEqual([{ host, guest: 8080 }]);
    expect(host).toBeGreaterThan(0);
    const psText = cli(['ps', '--data-dir', s.dir]).stdout.split('\n');
    expect(psText[0]).toMatch(/^NAME\s+STATUS\s+BACKEND\s+PID\s+PORTS\s+IMAGE$/);
    expect(psText[1]).toMatch(new RegExp(`^bg\\s+running\\s+qemu\\s+\\d+\\s+${host}->8080\\s+oci:`));
    expect(cli(['ps', '-q', '--data-dir', s.dir]).stdout).toBe('bg\n');
    expect(cli(['port', 'bg', '8080', '--data-dir', s.dir]).stdout).toBe(`127.0.0.1:${host}\n`);
    expect(cli(['port', 'bg', '--data-dir', s.dir]).stdout).toBe(`8080 -> 127.0.0.1:${host}\n`);
    expect(cli(['port', 'bg', '81', '--data-dir', s.dir])).toMatchObject({
      code: 1,
      stderr: expect.stringContaining('[ERR_MICROVM_PORT_NOT_FORWARDED]'),
    });
    const inspected = cli(['inspect', 'bg', '--data-dir', s.dir]);
    expect(inspected.code).toBe(0);
    expect(JSON.parse(inspected.stdout)).toEqual([
      expect.objectContaining({
        name: 'bg',
        backend: 'qemu',
        running: true,
        ports: [{ host, guest: 8080 }],
        imageDigest: imgs[0].digest,
        files: expect.objectContaining({
          console: expect.stringContaining('console.log'),
          outputTimes: expect.stringContaining('output-times'),
          egress: null, // no egress policy
        }),
      }),
    ]);
    expect(cli(['inspect', 'bg', 'nope', '--data-dir', s.dir])).toMatchObject({
      code: 1,
      stderr: expect.stringContaining('[ERR_MICROVM_VM_NOT_FOUND] no VM named nope'),
    });
    // The VM outlived the CLI process that started it; wait for the guest's lines and its server.
    let logs = '';
    for (let i = 0; i < 120 && !logs.includes('in the background'); i++) {
      logs = cli(['logs', 'bg', '--data-dir', s.dir]).stdout;
      if (!logs.includes('in the background')) spawnSync('sleep', ['0.25']);
    }
    expect(logs).toBe('line1\nin the background\n');
    expect(cli(['logs', 'bg', '--tail', '1', '--data-dir', s.dir]).stdout).toBe('in the background\n');
    expect(cli(['logs', 'bg', '-n', '0', '--data-dir', s.dir]).stdout).toBe('');
    let body = '';
    for (let i = 0; i < 100 && body !== 'served\n'; i++) {
      body = await fetch(`http://127.0.0.1:${host}/i`).then(
        (r) => r.text(),
        () => '',
      );
      if (body !== 'served\n') await new Promise((r) => setTimeout(r, 200));
    }
    expect(body).toBe('served\n');
    // rm of a running VM needs -f; nothing is removed without it.
    expect(cli(['rm', 'bg', '--data-dir', s.dir])).toMatchObject({
      code: 1,
      stderr: expect.stringContaining('[ERR_MICROVM_VM_RUNNING] bg is running; stop it first or use rm -f'),
    });
    expect(fs.existsSync(path.join(s.dir, 'vms', 'bg'))).toBe(true);
    expect(cli(['stop', '-t', '1', 'bg', '--data-dir', s.dir])).toMatchObject({ code: 0, stdout: 'bg\n' });
    expect(cli(['ps', '-q', '--data-dir', s.dir]).stdout).toBe('');
    expect(JSON.parse(cli(['ps', '-a', '--json', '--data-dir', s.dir]).stdout)).toEqual([
      expect.objectContaining({ name: 'bg', running: false }),
    ]);
    // Several names: each is handled, an unknown one is reported and makes the exit status 1.
    const rm = cli(['rm', 'bg', 'nope', '--data-dir', s.dir]);
    expect(rm).toMatchObject({
      code: 1,
      stdout: 'bg\n',
      stderr: expect.stringContaining('[ERR_MICROVM_VM_NOT_FOUND]'),
    });
    expect(JSON.parse(cli(['ps', '-a', '--json', '--data-dir', s.dir]).stdout)).toEqual([]);
    expect(cli(['cache', 'purge', '--data-dir', s.dir]).code).toBe(0);
    expect(JSON.parse(cli(['images', '--json', '--data-dir', s.dir]).stdout)).toEqual([]);
  });

  test('a detached VM ends when its command ends, with no host process watching: ps says exited (N), --rm removes it, no QEMU left', async () => {
    const kept = cli([...qemuRunArgs(layout, s.dir), '--name', 'kept', '-d', '--', '/bin/sh', '-c', 'sleep 1; exit 3']);
    const gone = cli([...qemuRunArgs(layout, s.dir), '--name', 'gone', '-d', '--rm', '--', '/bin/sh', '-c', 'exit 4']);
    expect([kept.code, gone.code]).toEqual([0, 0]);
    const qemus = (): string[] =>
      fs.readdirSync('/proc').filter((p) => {
        try {
          return /^\d+$/.test(p) && fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(path.join(s.dir, 'vms'));
        } catch {
          return false;
        }
      });
    for (let i = 0; i < 200 && qemus().length > 0; i++) await new Promise((r) => setTimeout(r, 100));
    expect(qemus()).toEqual([]);
    const ps = JSON.parse(cli(['ps', '-a', '--json', '--data-dir', s.dir]).stdout) as {
      name: string;
      exitCode: number | null;
    }[];
    expect(ps).toEqual([expect.objectContaining({ name: 'kept', running: false, exitCode: 3 })]);
    expect(cli(['ps', '-a', '--data-dir', s.dir]).stdout.split('\n')[1]).toMatch(/^kept\s+exited \(3\)\s+qemu\s/);
    expect(fs.readdirSync(path.join(s.dir, 'vms'))).toEqual(['kept']);
  });

  test('run --detach --ssh whose guest never serves SSH (it ends): a coded error with its stderr, exit 1, nothing left', () => {
    const r = cli([
      ...qemuRunArgs(layout, s.dir),
      '--name',
      'nossh',
      '--detach',
      '--ssh',
      '--',
      '/bin/sh',
      '-c',
      'echo no ssh here >&2; exit 0',
    ]);
    expect(r).toMatchObject({ code: 1, stdout: '' });
    expect(r.stderr).toMatch(/ERR_MICROVM_VM_EXITED[\s\S]*no ssh here/);
    expect(fs.readdirSync(path.join(s.dir, 'vms'))).toEqual([]);
  });

  test('kill -9 of `run --rm` leaves a directory the next run sweeps; prune removes stopped VMs and keeps running ones', async () => {
    const args = (name: string, ...extra: string[]): string[] => [
      bin,
      ...qemuRunArgs(layout, s.dir),
      '--name',
      name,
      ...extra,
      '--',
      '/bin/sh',
      '-c',
      'echo started; sleep 600',
    ];
    const env = { ...process.env, MICROVM_LIBKRUNFW_DIR: process.env.MICROVM_TEST_LIBKRUNFW_DIR };
    const child = spawn(process.execPath, args('doomed', '--rm'), { env, stdio: ['ignore', 'pipe', 'pipe'] });
    await new Promise<void>((resolve, reject) => {
      let out = '';
      const t = setTimeout(() => reject(new Error(`no output from the guest: ${out}`)), 90000);
      child.stdout.on('data', (b: Buffer) => {
        out += String(b);
        if (out.includes('started')) {
          clearTimeout(t);
          resolve();
        }
      });
      child.once('exit', (code) => reject(new Error(`run exited ${code}: ${out}`)));
    });
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    const doomed = path.join(s.dir, 'vms', 'doomed');
    expect(fs.existsSync(doomed)).toBe(true); // nobody removed it yet
    // QEMU died with the CLI (parent-death signal): the next run's sweep removes the directory.
    for (let i = 0; i < 100 && JSON.parse(cli(['ps', '--json', '--data-dir', s.dir]).stdout)[0]?.running; i++)
      spawnSync('sleep', ['0.1']);
    const kept = cli([...args('kept', '--detach').slice(1)]);
    expect(kept).toMatchObject({ code: 0, stdout: 'kept\n' });
    expect(fs.existsSync(doomed)).toBe(false);
    // A stopped VM (not --rm) stays until prune; the running one survives prune.
    const stopped = cli([...qemuRunArgs(layout, s.dir), '--name', 'stopped', '--', '/bin/true']);
    expect(stopped.code).toBe(0);
    const pruned = JSON.parse(cli(['prune', '--json', '--data-dir', s.dir]).stdout) as { vms: string[] };
    expect(pruned.vms).toEqual(['stopped']);
    expect(
      (JSON.parse(cli(['ps', '-a', '--json', '--data-dir', s.dir]).stdout) as { name: string }[]).map((v) => v.name),
    ).toEqual(['kept']);
    expect(cli(['rm', '-f', 'kept', '--data-dir', s.dir]).code).toBe(0);
  });
});
