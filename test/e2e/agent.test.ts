/**
 * The guest agent on real QEMU boots, on an image with no SSH server (the test image with dropbear
 * removed): exec, streams, TTY, signals, files, limits.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { type MicroVM, run, type RunOptions } from '../../lib';
import { WINDOW } from '../../lib/agent/protocol';
import { packageRoot } from '../../lib/native';
import { AGENT_IDLE_MS } from '../../lib/vm';
import { qemuSkipReason, scratch } from '../helpers';

const skip = qemuSkipReason();
process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;

let s: ReturnType<typeof scratch>;
let image: string;
let vm: MicroVM;
const exporter = new InMemorySpanExporter();

const base = (extra: RunOptions = {}): RunOptions => ({
  rootfsPath: image,
  backend: 'qemu',
  dataDir: path.join(s.dir, 'data'),
  ...extra,
});

(skip ? describe.skip : describe)(`guest agent, real VMs, no SSH server${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  beforeAll(async () => {
    s = scratch('microvm-agent-e2e-');
    image = path.join(s.dir, 'image');
    execFileSync('cp', ['-a', process.env.MICROVM_TEST_IMAGE as string, image]);
    fs.rmSync(path.join(image, 'usr/sbin/dropbear'), { force: true });
    fs.rmSync(path.join(image, 'etc/dropbear'), { recursive: true, force: true });
    const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
    vm = await run(
      'no-ssh',
      base({
        initOverride: ['/bin/sleep', '3600'],
        env: ['FROM_RUN=1', 'GREETING=overridden-by-run'],
        tracerProvider: provider,
      }),
    );
  }, 120_000);
  afterAll(async () => {
    await vm?.remove();
    s?.cleanup();
  });

  test('run() resolves once the agent answered: microvm.AgentWaitReady under PostBoot, with the guest uptime', () => {
    const spans = exporter.getFinishedSpans();
    const ready = spans.find((x) => x.name === 'microvm.AgentWaitReady');
    const postBoot = spans.find((x) => x.name === 'microvm.PostBoot');
    expect(ready?.parentSpanContext?.spanId).toBe(postBoot?.spanContext().spanId);
    expect(ready?.attributes['microvm.agent.ready']).toBe(true);
    expect(ready?.attributes['microvm.agent.socket']).toBe(path.join(vm.dataDir, 'agent.sock'));
    expect(Number(ready?.attributes['microvm.agent.uptime_ms'])).toBeGreaterThan(0);
    expect(vm.ssh).toBeUndefined();
    expect(fs.statSync(path.join(vm.dataDir, 'agent.sock')).mode & 0o777).toBe(0o600);
  });

  test('exec: argv and string forms, stdout and stderr apart, the exit code', async () => {
    expect(await vm.exec(['/bin/sh', '-c', 'echo "$0 $1"; echo to-err >&2; exit 3', 'a b', 'c'])).toEqual({
      stdout: 'a b c\n',
      stderr: 'to-err\n',
      exitCode: 3,
      signal: null,
    });
    expect(await vm.exec('echo $((6*7)) && ls /usr/sbin/dropbear')).toMatchObject({
      stdout: '42\n',
      exitCode: 1,
    });
    expect(await vm.exec(['/no/such/program'])).toMatchObject({
      exitCode: 127,
      stderr: expect.stringContaining('/no/such/program'),
    });
  });

  test("a bare name is looked up on the command's own PATH; a remembered one that is gone is looked up anew", async () => {
    await vm.exec(
      'mkdir -p /opt/a /opt/b && printf "#!/bin/sh\\necho from-a\\n" > /opt/a/tool && printf "#!/bin/sh\\necho from-b\\n" > /opt/b/tool && chmod +x /opt/a/tool /opt/b/tool',
    );
    const env = { PATH: '/opt/a:/opt/b:/bin' };
    expect((await vm.exec(['tool'], { env })).stdout).toBe('from-a\n');
    expect((await vm.exec(['tool'], { env })).stdout).toBe('from-a\n'); // remembered
    expect((await vm.exec(['tool'], { env: { PATH: '/opt/b:/bin' } })).stdout).toBe('from-b\n'); // another PATH
    await vm.exec(['rm', '/opt/a/tool']);
    expect((await vm.exec(['tool'], { env })).stdout).toBe('from-b\n');
    await vm.exec(['rm', '/opt/b/tool']);
    expect(await vm.exec(['tool'], { env })).toMatchObject({ exitCode: 127, stderr: expect.stringContaining('tool') });
  });

  test("env: the image's Env, then run()'s env, then the call's; cwd: the image's unless given; user", async () => {
    const r = await vm.exec('echo "$GREETING $FROM_RUN $CALL"; pwd; id -u', { env: { CALL: 'c', FROM_RUN: '2' } });
    expect(r.stdout).toBe('overridden-by-run 2 c\n/\n0\n');
    expect((await vm.exec(['pwd'], { cwd: '/tmp' })).stdout).toBe('/tmp\n');
    expect((await vm.exec(['id', '-u'], { user: '1000:1000' })).stdout).toBe('1000\n');
    expect((await vm.exec(['pwd'], { cwd: '/no/such' })).exitCode).toBe(126);
  });

  test('each exec is a microvm.Exec span whose W3C context the command gets (TRACEPARENT)', async () => {
    const r = await vm.exec('echo $TRACEPARENT');
    const span = exporter
      .getFinishedSpans()
      .filter((x) => x.name === 'microvm.Exec')
      .pop();
    const sc = span?.spanContext();
    expect(r.stdout).toBe(`00-${sc?.traceId}-${sc?.spanId}-01\n`);
    expect(span?.attributes).toMatchObject({
      'microvm.name': vm.name,
      'process.executable.name': 'sh',
      'process.exit.code': 0,
    });
    // The caller's own value wins.
    expect((await vm.exec('echo $TRACEPARENT', { env: { TRACEPARENT: 'mine' } })).stdout).toBe('mine\n');
  });

  test('stdin: piped in, closed with EOF; a large input arrives whole', async () => {
    expect(await vm.exec(['cat'], { stdin: 'piped\n' })).toMatchObject({ stdout: 'piped\n', exitCode: 0 });
    const big = Buffer.alloc(3 * WINDOW + 123, 0x61);
    expect((await vm.exec(['wc', '-c'], { stdin: big })).stdout.trim()).toBe(String(big.length));
    const proc = await vm.spawn(['cat'], { stdin: true });
    let out = '';
    proc.stdout.on('data', (d: Buffer) => (out += d.toString()));
    proc.stdin?.write('one\n');
    proc.stdin?.end('two\n');
    expect(await proc.exited).toEqual({ exitCode: 0, signal: null });
    expect(out).toBe('one\ntwo\n');
  });

  test('tty: the size is set and follows resize()', async () => {
    expect((await vm.exec(['stty', 'size'], { tty: { rows: 33, cols: 99 } })).stdout).toBe('33 99\r\n');
    const proc = await vm.spawn(['/bin/sh'], { tty: { rows: 10, cols: 20 } });
    let out = '';
    proc.stdout.on('data', (d: Buffer) => (out += d.toString()));
    proc.stdin?.write('stty size\n');
    await waitUntil(() => out.includes('10 20'));
    proc.resize(40, 120);
    proc.stdin?.write('stty size; exit 5\n');
    expect(await proc.exited).toEqual({ exitCode: 5, signal: null });
    expect(out).toContain('40 120');
  });

  test('signals reach the process; abort and timeout kill its process group', async () => {
    const proc = await vm.spawn([
      '/bin/sh',
      '-c',
      'trap "echo got-term; exit 7" TERM; echo ready; while :; do sleep 1; done',
    ]);
    let out = '';
    proc.stdout.on('data', (d: Buffer) => (out += d.toString()));
    await waitUntil(() => out.includes('ready'));
    proc.kill('SIGTERM');
    expect(await proc.exited).toEqual({ exitCode: 7, signal: null });
    expect(out).toContain('got-term');
    const ac = new AbortController();
    const running = vm.exec('sleep 301 & sleep 302', { signal: ac.signal });
    await waitUntil(async () => (await vm.exec('ps')).stdout.includes('sleep 302'));
    ac.abort(new Error('enough'));
    await expect(running).rejects.toThrow('enough');
    await expect(vm.exec('sleep 303', { timeoutMs: 200 })).rejects.toMatchObject({ code: 'ERR_MICROVM_EXEC_TIMEOUT' });
    await waitUntil(async () => !/sleep 30[123]/.test((await vm.exec('ps')).stdout));
  });

  test('a flood of output with a slow reader: all of it arrives, and what the host holds stays bounded', async () => {
    const total = 20_000_000;
    const proc = await vm.spawn(['/bin/sh', '-c', `yes | head -c ${total}`]);
    proc.stdout.pause();
    await new Promise((r) => setTimeout(r, 1500));
    // The guest may not send beyond the window the host granted, and the host grants what went into
    // the stream below its high-water mark: a paused reader holds at most the sum.
    expect(proc.stdout.readableLength).toBeGreaterThan(0);
    expect(proc.stdout.readableLength).toBeLessThanOrEqual(WINDOW + proc.stdout.readableHighWaterMark);
    let got = 0;
    proc.stdout.on('data', (d: Buffer) => (got += d.length));
    proc.stdout.resume();
    expect(await proc.exited).toEqual({ exitCode: 0, signal: null });
    expect(got).toBe(total);
  });

  test('copyIn and copyOut: a tree round trip keeps modes and symlinks; a failed copy leaves nothing', async () => {
    const src = path.join(s.dir, 'tree');
    fs.mkdirSync(path.join(src, 'sub/deeper'), { recursive: true });
    fs.writeFileSync(path.join(src, 'sub/run.sh'), '#!/bin/sh\necho ran\n', { mode: 0o750 });
    fs.writeFileSync(path.join(src, 'sub/deeper/data'), Buffer.alloc(300_000, 7));
    fs.writeFileSync(path.join(src, 'secret'), 's', { mode: 0o600 });
    fs.symlinkSync('sub/run.sh', path.join(src, 'link'));
    fs.chmodSync(path.join(src, 'sub/deeper'), 0o711);
    await vm.exec(['mkdir', '/srv']);
    await vm.copyIn(src, '/srv'); // an existing directory: into it
    expect(
      (
        await vm.exec(
          '/srv/tree/link; stat -c "%a %n" /srv/tree/sub/run.sh /srv/tree/secret /srv/tree/sub/deeper; readlink /srv/tree/link',
        )
      ).stdout,
    ).toBe('ran\n750 /srv/tree/sub/run.sh\n600 /srv/tree/secret\n711 /srv/tree/sub/deeper\nsub/run.sh\n');
    const back = path.join(s.dir, 'back');
    await vm.copyOut('/srv/tree', back);
    expect(fs.readFileSync(path.join(back, 'sub/deeper/data')).equals(Buffer.alloc(300_000, 7))).toBe(true);
    expect(fs.statSync(path.join(back, 'sub/run.sh')).mode & 0o7777).toBe(0o750);
    expect(fs.statSync(path.join(back, 'sub/deeper')).mode & 0o7777).toBe(0o711);
    expect(fs.readlinkSync(path.join(back, 'link'))).toBe('sub/run.sh');
    if (process.getuid?.() === 0) {
      // Owners travel both ways when this process is root.
      fs.chownSync(path.join(src, 'secret'), 1234, 4321);
      await vm.copyIn(path.join(src, 'secret'), '/srv/owned');
      expect((await vm.exec(['stat', '-c', '%u:%g %a', '/srv/owned'])).stdout).toBe('1234:4321 600\n');
      await vm.exec(['chown', '2345:5432', '/srv/owned']);
      await vm.copyOut('/srv/owned', path.join(s.dir, 'owned'));
      const st = fs.statSync(path.join(s.dir, 'owned'));
      expect([st.uid, st.gid, st.mode & 0o7777]).toEqual([2345, 5432, 0o600]);
    }
    // Failures: nothing partial on either side.
    await expect(vm.copyOut('/no/such', path.join(s.dir, 'none'))).rejects.toMatchObject({
      code: 'ERR_MICROVM_GUEST_FILE',
      guestCode: 'ENOENT',
    });
    expect(fs.readdirSync(s.dir).filter((n) => n.includes('none') || n.includes('microvm-'))).toEqual([]);
    await expect(vm.copyIn(src, '/no/such/dir/x')).rejects.toMatchObject({ code: 'ERR_MICROVM_GUEST_FILE' });
    await expect(vm.copyIn(path.join(src, 'secret'), '/proc/version')).rejects.toMatchObject({
      code: 'ERR_MICROVM_GUEST_FILE',
    });
    expect((await vm.exec('ls -a / /srv /proc | grep -c microvm-; true')).stdout).toBe('0\n');
    await vm.writeFile('/tmp/w', 'written', { mode: 0o640 });
    expect((await vm.readFile('/tmp/w')).toString()).toBe('written');
    await expect(vm.readFile('/tmp/w', { maxBytes: 3 })).rejects.toMatchObject({ code: 'ERR_MICROVM_COPY' });
    // A FIFO where a file is expected: refused at once, the agent is not stuck in open().
    await vm.exec(['mkfifo', '/tmp/fifo']);
    await expect(vm.readFile('/tmp/fifo')).rejects.toMatchObject({
      code: 'ERR_MICROVM_GUEST_FILE',
      guestCode: 'EINVAL',
    });
    expect((await vm.exec(['echo', 'still-serving'])).stdout).toBe('still-serving\n');
  });

  test('the channel is let go when idle: `microvm exec` from another process works while this one holds the VM, and this one reconnects after', async () => {
    await vm.exec(['true']);
    await new Promise((r) => setTimeout(r, AGENT_IDLE_MS + 100));
    const r = spawnSync(
      process.execPath,
      [
        path.join(packageRoot, 'bin', 'microvm.js'),
        'exec',
        '--data-dir',
        path.join(s.dir, 'data'),
        vm.name,
        '--',
        'echo',
        'from-cli',
      ],
      { encoding: 'utf8', timeout: 60_000 },
    );
    expect({ code: r.status, stdout: r.stdout, stderr: r.stderr }).toEqual({
      code: 0,
      stdout: 'from-cli\n',
      stderr: '',
    });
    expect((await vm.exec(['echo', 'back'])).stdout).toBe('back\n');
    // Several at once share one connection.
    const many = await Promise.all([1, 2, 3, 4].map((i) => vm.exec(['echo', String(i)])));
    expect(many.map((x) => x.stdout)).toEqual(['1\n', '2\n', '3\n', '4\n']);
  });

  test('a command that ends before the agent answers is no failure of run(); exec after the end is a coded error', async () => {
    const quick = await run('no-ssh', base({ initOverride: ['/bin/true'] }));
    expect(await quick.wait()).toEqual({ reason: 'exited', exitCode: 0, signal: null });
    await expect(quick.exec(['true'])).rejects.toMatchObject({ code: 'ERR_MICROVM_AGENT_UNAVAILABLE' });
    await quick.remove();
  });
});

async function waitUntil(cond: () => boolean | Promise<boolean>, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 50));
  }
}
