/**
 * The MicroVM handle's guest-facing methods (exec, spawn, files, stats, pause/resume) over a FAKE
 * GUEST AGENT and a FAKE QMP CONTROL SOCKET (TEST DOUBLES: unix socket servers in this process),
 * so that what the handle itself decides — argv, trace context, exit codes, spans, the paused
 * state, error codes — is tested without a boot. Real guests: test/e2e/agent.test.ts,
 * test/e2e/pause.test.ts, test/stats.test.ts.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { SpanStatusCode } from '@opentelemetry/api';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { AgentClient } from '../lib/agent/client';
import { FRAME } from '../lib/agent/protocol';
import type { BackendHandle, VmExit } from '../lib/backends/types';
import { MicroVM } from '../lib/vm';
import { scratch } from './helpers';
import { type FakeGuest, fakeAgent } from './agent/fake-guest';

let s: ReturnType<typeof scratch>;
let agent: Awaited<ReturnType<typeof fakeAgent>>;
let exporter: InMemorySpanExporter;
let closers: Array<() => Promise<void> | void>;
beforeEach(async () => {
  s = scratch('microvm-vm-agent-');
  exporter = new InMemorySpanExporter();
  closers = [];
  agent = await fakeAgent(path.join(s.dir, 'agent.sock'));
});
afterEach(async () => {
  for (const c of closers.reverse()) await c();
  await agent.close();
  s.cleanup();
});

/** What a relative path (host or guest) is refused with. */
const COPY_CODE = 'ERR_OUT_OF_RANGE';

interface Req {
  argv: string[];
  env?: string[];
  user?: string;
}

/** A VM handle over a fake backend handle whose process ends when told, with the fake agent attached. */
async function vmWith(handle: Partial<BackendHandle> = {}) {
  let end!: (e: VmExit) => void;
  const exited = new Promise<VmExit>((r) => (end = r));
  const tracer = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] }).getTracer('t');
  const vm = new MicroVM(
    {
      id: 'id1',
      name: 'box',
      backend: 'fake',
      dataDir: s.dir,
      rootfsPath: '/r',
      cloneStrategy: 'copy',
      ports: [],
      consoleLogPath: path.join(s.dir, 'console.log'),
      logPath: path.join(s.dir, 'vm.log'),
    },
    { pid: process.pid, executable: '/x', exited, kill: () => true, ...handle },
    [],
    tracer,
  );
  const client = await AgentClient.connect(path.join(s.dir, 'agent.sock'), { timeoutMs: 5000 });
  vm.attachAgent(path.join(s.dir, 'agent.sock'), client);
  closers.push(() => {
    end({ reason: 'stopped', exitCode: null, signal: 'SIGKILL' });
  });
  return { vm, end, guest: (): FakeGuest => agent.guests[agent.guests.length - 1] };
}

/** Answers the next exec with `stdout` and an exit frame; returns its request. */
async function answerExec(g: FakeGuest, stdout: string, exit = '{"code":0}', stderr = ''): Promise<Req> {
  const f = await g.next(FRAME.EXEC);
  if (stdout) g.send(FRAME.STDOUT, f.stream, stdout);
  if (stderr) g.send(FRAME.STDERR, f.stream, stderr);
  g.send(FRAME.EXIT, f.stream, exit);
  return JSON.parse(f.payload.toString()) as Req;
}

describe('exec and spawn', () => {
  test('an argv as given, its output and exit code, a microvm.Exec span whose context the command gets', async () => {
    const { vm, guest } = await vmWith();
    const [r, req] = await Promise.all([
      vm.exec(['/usr/bin/env', 'x']),
      answerExec(guest(), 'out\n', '{"code":3}', 'err\n'),
    ]);
    expect(r).toEqual({ stdout: 'out\n', stderr: 'err\n', exitCode: 3, signal: null });
    expect(req.argv).toEqual(['/usr/bin/env', 'x']);
    const span = exporter.getFinishedSpans().find((x) => x.name === 'microvm.Exec');
    expect(span?.attributes).toEqual({
      'microvm.name': 'box',
      'process.executable.name': 'env',
      'process.exit.code': 3,
    });
    const { traceId, spanId } = span?.spanContext() ?? {};
    expect(req.env).toContain(`TRACEPARENT=00-${traceId}-${spanId}-01`);
  });

  test('a string runs through /bin/sh -c; a TRACEPARENT of the caller is kept; a signal exit has no code', async () => {
    const { vm, guest } = await vmWith();
    const [r, req] = await Promise.all([
      vm.exec('echo $X', { env: { TRACEPARENT: 'mine', X: '1' } }),
      answerExec(guest(), '', '{"signal":9}'),
    ]);
    expect(req.argv).toEqual(['/bin/sh', '-c', 'echo $X']);
    expect(req.env).toEqual(['TRACEPARENT=mine', 'X=1']);
    expect(r).toMatchObject({ exitCode: null, signal: 'SIGKILL' });
    const span = exporter.getFinishedSpans().find((x) => x.name === 'microvm.Exec');
    expect(span?.attributes['process.exit.code']).toBeUndefined();
  });

  test('spawn streams and exits; a refused spawn option fails before anything is sent', async () => {
    const { vm, guest } = await vmWith();
    const proc = await vm.spawn(['cat']);
    const f = await guest().next(FRAME.EXEC);
    let out = '';
    proc.stdout.on('data', (d: Buffer) => (out += d.toString()));
    guest().send(FRAME.STDOUT, f.stream, 'streamed');
    guest().send(FRAME.EXIT, f.stream, '{"code":0}');
    expect(await proc.exited).toMatchObject({ exitCode: 0 });
    expect(out).toBe('streamed');
    await expect(vm.spawn(['cat'], { stdin: 'yes' as never })).rejects.toMatchObject({
      code: 'ERR_INVALID_ARG_TYPE',
      message: expect.stringContaining('options.stdin'),
    });
    // With stdin: the request asks for it, and the exit code lands on the span.
    const withStdin = await vm.spawn(['cat'], { stdin: true });
    const f2 = await guest().next(FRAME.EXEC);
    expect(JSON.parse(f2.payload.toString())).toMatchObject({ argv: ['cat'], stdin: true });
    guest().send(FRAME.EXIT, f2.stream, '{"code":5}');
    expect(await withStdin.exited).toMatchObject({ exitCode: 5 });
    await new Promise((r) => setImmediate(r));
    const codes = exporter.getFinishedSpans().map((x) => x.attributes['process.exit.code']);
    expect(codes).toEqual([0, 5]);
  });

  test('without an agent: ERR_MICROVM_AGENT_UNAVAILABLE; over SSH only a string, and the agent-only options are named', async () => {
    const vm = new MicroVM(
      {
        id: 'i',
        name: 'bare',
        backend: 'fake',
        dataDir: s.dir,
        rootfsPath: '/r',
        cloneStrategy: 'copy',
        ports: [],
        consoleLogPath: '/dev/null',
        logPath: '/dev/null',
      },
      { pid: 1, executable: '/x', exited: new Promise(() => undefined), kill: () => true },
    );
    await expect(vm.exec(['ls'])).rejects.toMatchObject({
      code: 'ERR_MICROVM_AGENT_UNAVAILABLE',
      message: expect.stringContaining('backend, fake'),
    });
    await expect(vm.readFile('/etc/hostname')).rejects.toMatchObject({ code: 'ERR_MICROVM_AGENT_UNAVAILABLE' });
    const calls: unknown[] = [];
    vm.ssh = { exec: async (...a: unknown[]) => (calls.push(a), { stdout: 'ok', stderr: '', exitCode: 0 }) } as never;
    await expect(vm.exec(['ls'])).rejects.toMatchObject({
      code: 'ERR_MICROVM_AGENT_UNAVAILABLE',
      message: 'An argv command needs the guest agent; over SSH pass a string',
    });
    await expect(vm.exec('ls', { cwd: '/', user: 'x' })).rejects.toMatchObject({
      message: 'cwd, user need the guest agent; this VM has SSH only',
    });
    await expect(vm.exec('ls', { env: { A: '1' } })).resolves.toMatchObject({ stdout: 'ok' });
    expect(calls).toEqual([['ls', { signal: undefined, stdin: undefined, env: { A: '1' } }]]);
  });
});

describe('files', () => {
  test('readFile and writeFile go through the agent as get and put', async () => {
    const { vm, guest } = await vmWith();
    const reading = vm.readFile('/etc/hostname', { maxBytes: 100 });
    const get = await guest().next(FRAME.OP);
    expect(JSON.parse(get.payload.toString())).toMatchObject({ op: 'get', path: '/etc/hostname' });
    guest().send(FRAME.STDOUT, get.stream, 'box\n');
    guest().send(FRAME.EXIT, get.stream, '{"code":0}');
    await expect(reading).resolves.toEqual(Buffer.from('box\n'));
    const writing = vm.writeFile('/etc/motd', 'hello', { mode: 0o600 });
    const put = await guest().next(FRAME.OP);
    expect(JSON.parse(put.payload.toString())).toMatchObject({ op: 'put', path: '/etc/motd', mode: 0o600 });
    const data = await guest().next(FRAME.DATA);
    expect(data.payload.toString()).toBe('hello');
    await guest().next(FRAME.EOF);
    guest().send(FRAME.EXIT, put.stream, '{"code":0}');
    await expect(writing).resolves.toBeUndefined();
  });

  test('paths must be absolute; bad sizes and modes are refused before anything is sent', async () => {
    const { vm, guest } = await vmWith();
    await expect(vm.readFile('etc/hostname')).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    await expect(vm.readFile('/x', { maxBytes: -1 })).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    await expect(vm.writeFile('/x', 'a', { mode: 0o10000 })).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    await expect(vm.copyIn('rel', '/x')).rejects.toMatchObject({ code: COPY_CODE });
    await expect(vm.copyOut('/x', 'rel')).rejects.toMatchObject({ code: COPY_CODE });
    expect(guest().frames.filter((f) => f.type === FRAME.OP)).toEqual([]);
  });
});

describe('the handle', () => {
  test('port() names what is forwarded; unref() and ref() reach the backend handle', async () => {
    const calls: string[] = [];
    const { vm } = await vmWith({ ref: () => calls.push('ref'), unref: () => calls.push('unref') });
    expect(() => vm.port(80)).toThrow(
      expect.objectContaining({
        code: 'ERR_MICROVM_PORT_NOT_FORWARDED',
        message: 'box forwards no host port to guest port 80 (forwarded: none)',
      }),
    );
    expect(vm.unref()).toBe(vm);
    expect(vm.ref()).toBe(vm);
    expect(calls).toEqual(['unref', 'ref']);
  });
});

describe('paused', () => {
  test('the marker makes the state paused and refuses new requests with the code; stats then leave the guest out', async () => {
    const { vm, guest } = await vmWith();
    fs.writeFileSync(path.join(s.dir, 'paused'), '');
    expect(vm.status().state).toBe('paused');
    await expect(vm.exec(['true'])).rejects.toMatchObject({
      code: 'ERR_MICROVM_VM_PAUSED',
      message: expect.stringContaining('microvm unpause box'),
    });
    await expect(vm.writeFile('/x', 'a')).rejects.toMatchObject({ code: 'ERR_MICROVM_VM_PAUSED' });
    const st = await vm.stats();
    expect(st.guest).toBeUndefined();
    expect(guest().frames.filter((f) => f.type === FRAME.EXEC)).toEqual([]);
    fs.rmSync(path.join(s.dir, 'paused'));
    expect(vm.status().state).toBe('running');
  });

  test('pause and resume need a control socket: ERR_MICROVM_SNAPSHOT_UNSUPPORTED, an error span, no marker', async () => {
    const { vm } = await vmWith();
    await expect(vm.pause()).rejects.toMatchObject({
      code: 'ERR_MICROVM_SNAPSHOT_UNSUPPORTED',
      message: expect.stringMatching(/^box runs on the fake backend, which cannot pause/),
    });
    await expect(vm.resume()).rejects.toMatchObject({ code: 'ERR_MICROVM_SNAPSHOT_UNSUPPORTED' });
    expect(fs.existsSync(path.join(s.dir, 'paused'))).toBe(false);
    const spans = exporter.getFinishedSpans().filter((x) => x.name === 'microvm.Pause' || x.name === 'microvm.Resume');
    expect(spans.map((x) => [x.name, x.status.code])).toEqual([
      ['microvm.Pause', SpanStatusCode.ERROR],
      ['microvm.Resume', SpanStatusCode.ERROR],
    ]);
  });

  test('through a control socket: stop then cont, the marker while paused; a refused stop leaves no marker', async () => {
    const commands: string[] = [];
    let refuse = false;
    const control = path.join(s.dir, 'control.sock');
    // A FAKE QMP monitor (TEST DOUBLE): greeting, then {return: {}} to each command (or an error).
    const server = net.createServer((sock) => {
      sock.write('{"QMP": {"version": {}, "capabilities": []}}\n');
      let buf = '';
      sock.on('data', (d) => {
        buf += d.toString();
        for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
          const cmd = (JSON.parse(buf.slice(0, i)) as { execute: string }).execute;
          buf = buf.slice(i + 1);
          commands.push(cmd);
          sock.write(
            refuse && cmd === 'stop' ? '{"error": {"class": "GenericError", "desc": "no"}}\n' : '{"return": {}}\n',
          );
        }
      });
      sock.on('error', () => undefined);
    });
    await new Promise<void>((r) => server.listen(control, r));
    closers.push(() => new Promise((r) => server.close(() => r())));
    const { vm } = await vmWith({ controlSocketPath: control });
    await vm.resume(); // not paused: cont is harmless, and there is no marker to remove
    commands.splice(0);
    const before = Date.now();
    await vm.pause();
    const marker = path.join(s.dir, 'paused');
    expect(fs.statSync(marker).mode & 0o777).toBe(0o600);
    const when = Date.parse(fs.readFileSync(marker, 'utf8').trim());
    expect(when).toBeGreaterThanOrEqual(before - 1000);
    expect(fs.readFileSync(marker, 'utf8')).toMatch(/^\d{4}-\d\d-\d\dT[\d:.]+Z\n$/);
    expect(vm.status().state).toBe('paused');
    await vm.pause(); // already paused: nothing sent
    await vm.resume();
    expect(fs.existsSync(path.join(s.dir, 'paused'))).toBe(false);
    expect(commands).toEqual(['qmp_capabilities', 'stop', 'qmp_capabilities', 'cont']);
    refuse = true;
    await expect(vm.pause()).rejects.toMatchObject({
      code: 'ERR_MICROVM_QMP',
      message: 'QEMU refused stop: GenericError: no',
    });
    expect(fs.existsSync(path.join(s.dir, 'paused'))).toBe(false);
    const spans = exporter.getFinishedSpans().filter((x) => x.name === 'microvm.Pause' || x.name === 'microvm.Resume');
    expect(spans.map((x) => x.name)).toEqual([
      'microvm.Resume',
      'microvm.Pause',
      'microvm.Pause',
      'microvm.Resume',
      'microvm.Pause',
    ]);
    expect(spans[0].attributes).toEqual({ 'microvm.name': 'box', 'microvm.backend': 'fake' });
  });

  test('a control socket that never answers: ERR_MICROVM_QMP within its deadline, no marker left', async () => {
    const control = path.join(s.dir, 'silent.sock');
    // A FAKE QMP monitor (TEST DOUBLE) that greets and negotiates, then never answers a command.
    const server = net.createServer((sock) => {
      sock.write('{"QMP": {"version": {}, "capabilities": []}}\n');
      let first = true;
      sock.on('data', () => {
        if (first) sock.write('{"return": {}}\n');
        first = false;
      });
      sock.on('error', () => undefined);
    });
    await new Promise<void>((r) => server.listen(control, r));
    closers.push(
      () =>
        new Promise((r) => {
          server.close(() => r());
          server.unref();
        }),
    );
    const { vm } = await vmWith({ controlSocketPath: control });
    await expect(vm.pause()).rejects.toMatchObject({
      code: 'ERR_MICROVM_QMP',
      message: 'QEMU did not answer stop within 5000 ms',
    });
    expect(fs.existsSync(path.join(s.dir, 'paused'))).toBe(false);
  }, 20_000);

  test('after the end: pause, resume and stats are ERR_MICROVM_VM_NOT_RUNNING, saying how it ended', async () => {
    const { vm, end } = await vmWith({ controlSocketPath: path.join(s.dir, 'none.sock') });
    end({ reason: 'exited', exitCode: 4, signal: null });
    await vm.wait();
    for (const call of [() => vm.pause(), () => vm.resume(), () => vm.stats()])
      await expect(call()).rejects.toMatchObject({
        code: 'ERR_MICROVM_VM_NOT_RUNNING',
        message: 'box is not running (the guest command exited with code 4)',
      });
  });
});

describe('stats', () => {
  test("the guest's answer parsed, the directory counted, the host's processes; a garbled answer leaves the guest out", async () => {
    const { vm, guest } = await vmWith();
    fs.writeFileSync(path.join(s.dir, 'blob'), Buffer.alloc(256 * 1024, 1));
    const meminfo = 'MemTotal: 1000 kB\nMemAvailable: 600 kB\n0.50 0.20 0.10 1/20 30\n';
    const [st, req] = await Promise.all([vm.stats(), answerExec(guest(), meminfo)]);
    expect(req.argv).toEqual(['cat', '/proc/meminfo', '/proc/loadavg', '/proc/net/dev']);
    expect(st.guest).toEqual({
      memoryTotalBytes: 1000 * 1024,
      memoryAvailableBytes: 600 * 1024,
      memoryUsedBytes: 400 * 1024,
      load1: 0.5,
      rxBytes: 0,
      txBytes: 0,
    });
    expect(st.disk).toEqual({ usedBytes: expect.any(Number), limitBytes: null });
    expect(st.disk.usedBytes).toBeGreaterThanOrEqual(256 * 1024);
    expect(st.host.cpuSeconds).toBeGreaterThanOrEqual(0);
    const [garbled] = await Promise.all([vm.stats(), answerExec(guest(), 'nonsense')]);
    expect(garbled.guest).toBeUndefined();
    const [failed] = await Promise.all([vm.stats(), answerExec(guest(), meminfo, '{"code":1}')]);
    expect(failed.guest).toBeUndefined();
    await expect(vm.stats({ signal: 'x' as never })).rejects.toMatchObject({ code: 'ERR_INVALID_ARG_TYPE' });
  });
});
