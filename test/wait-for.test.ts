/**
 * The waitFor strategies against real local servers and files (the VM-side behaviour of QEMU's
 * user network is covered on real boots in test/e2e/qemu.test.ts and the telemetry contract test).
 */
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as path from 'node:path';
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  SimpleSpanProcessor,
  type ReadableSpan,
} from '@opentelemetry/sdk-trace-base';
import { ROOT_CONTEXT } from '@opentelemetry/api';
import { normalizeWaitFor, waitFor, type WaitTarget } from '../lib/wait-for';
import { usernetState } from '../lib/backends/qemu';
import { freePort } from '../lib/network/free-port';
import { scratch } from './helpers';

let s: ReturnType<typeof scratch>;
let exporter: InMemorySpanExporter;
let scope: { tracer: ReturnType<BasicTracerProvider['getTracer']>; ctx: typeof ROOT_CONTEXT };
beforeEach(() => {
  s = scratch('microvm-wait-');
  exporter = new InMemorySpanExporter();
  const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
  scope = { tracer: provider.getTracer('t'), ctx: ROOT_CONTEXT };
});
/** Writes a test schedules; cleared before the scratch dir goes (a wait that ended early must not leave one behind). */
const timers: NodeJS.Timeout[] = [];
const later = (ms: number, fn: () => void): void => void timers.push(setTimeout(fn, ms));
afterEach(() => {
  for (const t of timers.splice(0)) clearTimeout(t);
  s.cleanup();
});

function target(ports: Record<number, number> = {}, extra: Partial<WaitTarget> = {}): WaitTarget {
  return {
    name: 'vm1',
    port: (g) => {
      if (!(g in ports)) throw Object.assign(new Error('not forwarded'), { code: 'ERR_MICROVM_PORT_NOT_FORWARDED' });
      return ports[g];
    },
    stdoutPath: path.join(s.dir, 'stdout.log'),
    stderrPath: path.join(s.dir, 'stderr.log'),
    consoleLogPath: path.join(s.dir, 'console.log'),
    ...extra,
  };
}
const span = (): ReadableSpan => exporter.getFinishedSpans()[0];
const never = new AbortController().signal;

describe('normalizeWaitFor', () => {
  test('one strategy or a list; defaults; bad ones name the field', () => {
    expect(normalizeWaitFor({ tcp: 80 })).toEqual([{ kind: 'tcp', port: 80, timeoutMs: 60_000 }]);
    expect(normalizeWaitFor([{ http: { port: 8080 } }, { log: 'x', timeoutMs: 5 }])).toMatchObject([
      { kind: 'http', port: 8080, path: '/', status: undefined, timeoutMs: 60_000 },
      { kind: 'log', pattern: '"x"', timeoutMs: 5 },
    ]);
    expect(() => normalizeWaitFor({})).toThrow('Expected exactly one of log, tcp or http in waitFor');
    expect(() => normalizeWaitFor([{ tcp: 0 }])).toThrow(
      'Expected an integer 1–65535 for waitFor[0].tcp but received 0',
    );
    expect(() => normalizeWaitFor({ log: 'x', stream: 'tty' })).toThrow(
      `Expected 'stdout', 'stderr' or 'console' for waitFor.stream but received "tty"`,
    );
    expect(() => normalizeWaitFor({ http: { port: 1, path: 'x' } })).toThrow(/waitFor\.http\.path/);
    expect(() => normalizeWaitFor({ http: { port: 1, status: 99 } })).toThrow(/waitFor\.http\.status/);
    expect(() => normalizeWaitFor({ tcp: 1, extra: 1 })).toThrow(/extra/);
    // A global regular expression keeps no lastIndex between lines.
    const [w] = normalizeWaitFor({ log: /ready/g });
    expect(w.kind === 'log' && [w.match('ready'), w.match('ready'), w.match('nope')]).toEqual([true, true, false]);
  });
});

describe('waitFor log', () => {
  test('a line written later, in pieces, without its newline yet: matched; earlier lines are not re-read', async () => {
    const file = path.join(s.dir, 'stdout.log');
    fs.writeFileSync(file, 'booting\nstill booting\n');
    later(100, () => fs.appendFileSync(file, 'server re'));
    later(200, () => fs.appendFileSync(file, 'ady on :80'));
    const [w] = normalizeWaitFor({ log: /^server ready/, timeoutMs: 5000 });
    await waitFor(w, target(), scope, never);
    expect(span().attributes).toMatchObject({
      'microvm.wait.stream': 'stdout',
      'microvm.wait.pattern': '/^server ready/',
    });
    expect(span().attributes['microvm.wait.attempts']).toBeGreaterThan(1);
  });

  test('stderr and console are read when asked; a CRLF console line matches its end anchor', async () => {
    fs.writeFileSync(path.join(s.dir, 'stderr.log'), 'warn: x\n');
    fs.writeFileSync(path.join(s.dir, 'console.log'), '[    1.0] init\r\nlogin ready\r\n');
    await waitFor(normalizeWaitFor({ log: 'warn', stream: 'stderr', timeoutMs: 1000 })[0], target(), scope, never);
    await waitFor(normalizeWaitFor({ log: /ready$/, stream: 'console', timeoutMs: 1000 })[0], target(), scope, never);
    // No stdout file kept apart (libkrun): the console is the default.
    await waitFor(
      normalizeWaitFor({ log: 'login', timeoutMs: 1000 })[0],
      target({}, { stdoutPath: undefined, stderrPath: undefined }),
      scope,
      never,
    );
    expect(exporter.getFinishedSpans().map((x) => x.attributes['microvm.wait.stream'])).toEqual([
      'stderr',
      'console',
      'console',
    ]);
  });

  test('a flood of output without the line: a timeout naming the wait, memory bounded (a 1 MB line is cut)', async () => {
    fs.writeFileSync(path.join(s.dir, 'stdout.log'), `${'x'.repeat(1 << 20)}\n`.repeat(4));
    const err = await waitFor(normalizeWaitFor({ log: 'ready', timeoutMs: 300 })[0], target(), scope, never).catch(
      (e: unknown) => e,
    );
    expect(err).toMatchObject({
      code: 'ERR_MICROVM_WAIT_TIMEOUT',
      message: expect.stringMatching(
        /^the stdout of vm1 \(waiting for "ready"\) was not ready within 300 ms \(\d+ attempts?\)$/,
      ),
    });
  });

  test('a line is matched on its first 64 KiB only; the next line is matched whole', async () => {
    const file = path.join(s.dir, 'stdout.log');
    fs.writeFileSync(file, `${'x'.repeat(100_000)}ready\n`);
    const w = normalizeWaitFor({ log: 'ready', timeoutMs: 200 })[0];
    await expect(waitFor(w, target(), scope, never)).rejects.toMatchObject({ code: 'ERR_MICROVM_WAIT_TIMEOUT' });
    fs.appendFileSync(file, 'ready\n');
    await waitFor(w, target(), scope, never);
  });

  test('the signal (the VM died) ends the wait at once with its reason', async () => {
    const ac = new AbortController();
    setTimeout(() => ac.abort(Object.assign(new Error('VM gone'), { code: 'ERR_MICROVM_VM_EXITED' })), 100);
    const t0 = performance.now();
    await expect(waitFor(normalizeWaitFor({ log: 'x' })[0], target(), scope, ac.signal)).rejects.toMatchObject({
      code: 'ERR_MICROVM_VM_EXITED',
    });
    expect(performance.now() - t0).toBeLessThan(10_000); // the wait's own deadline is 60 s
  });
});

describe('waitFor tcp and http', () => {
  test('tcp: refused until a server listens; then ready (no hypervisor state: the accept counts)', async () => {
    const port = await freePort();
    const server = net.createServer((c) => c.on('error', () => undefined));
    setTimeout(() => server.listen(port, '127.0.0.1'), 300);
    try {
      await waitFor(normalizeWaitFor({ tcp: 80, timeoutMs: 10_000 })[0], target({ 80: port }), scope, never);
    } finally {
      server.close();
    }
    expect(span().name).toBe('microvm.WaitForTCP');
    expect(span().attributes).toMatchObject({
      'microvm.wait.guest_port': 80,
      'server.port': port,
      'server.address': '127.0.0.1',
    });
    expect(span().attributes['microvm.wait.attempts']).toBeGreaterThan(1);
  });

  test('tcp: a host-side accept whose guest side never establishes is not ready (QEMU user network)', async () => {
    const port = await freePort();
    const server = net.createServer((c) => c.on('error', () => undefined)).listen(port, '127.0.0.1');
    const asked: number[] = [];
    try {
      const err = await waitFor(
        normalizeWaitFor({ tcp: 80, timeoutMs: 1500 })[0],
        target({ 80: port }, { tcpForwardState: async (p) => (asked.push(p), 'SYN_SENT') }),
        scope,
        never,
      ).catch((e: unknown) => e);
      expect(err).toMatchObject({
        code: 'ERR_MICROVM_WAIT_TIMEOUT',
        message: expect.stringContaining('last: guest side SYN_SENT'),
      });
      expect(asked.length).toBeGreaterThan(0);
      expect(asked.every((p) => p === port)).toBe(true);
    } finally {
      server.close();
    }
  });

  test('http: 503 is not ready, 200 is; the last status is on the span; an exact status is honoured', async () => {
    let n = 0;
    const paths: string[] = [];
    const server = http.createServer((req, res) => {
      paths.push(req.url ?? '');
      res.statusCode = ++n < 3 ? 503 : 200;
      res.end('ok');
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const port = (server.address() as net.AddressInfo).port;
    try {
      await waitFor(
        normalizeWaitFor({ http: { port: 80, path: '/health?x=1' }, timeoutMs: 10_000 })[0],
        target({ 80: port }),
        scope,
        never,
      );
      expect(n).toBe(3);
      expect(paths.every((p) => p === '/health?x=1')).toBe(true);
      expect(span().attributes).toMatchObject({
        'http.response.status_code': 200,
        'url.path': '/health?x=1',
        'microvm.wait.attempts': 3,
      });
      const err = await waitFor(
        normalizeWaitFor({ http: { port: 80, status: 204 }, timeoutMs: 400 })[0],
        target({ 80: port }),
        scope,
        never,
      ).catch((e: unknown) => e);
      expect(err).toMatchObject({
        code: 'ERR_MICROVM_WAIT_TIMEOUT',
        message: expect.stringContaining('last: HTTP 200'),
      });
    } finally {
      server.close();
    }
  });
});

describe('usernetState (QEMU info usernet)', () => {
  const table = [
    'Hub -1 (n0):',
    '  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ',
    '  TCP[TIME_WAIT]     27       127.0.0.1 33723       10.0.2.15  8080     0     0',
    '  TCP[SYN_SENT]      28       127.0.0.1 33723       10.0.2.15  8080     0     0',
    '  TCP[ESTABLISHED]   29       127.0.0.1 40000       10.0.2.15    22     0     0',
    '  TCP[HOST_FORWARD]  13       127.0.0.1 33723       10.0.2.15  8080     0     0',
    '  TCP[HOST_FORWARD]  14       127.0.0.1 40000       10.0.2.15    22     0     0',
  ].join('\n');
  test('by the forward’s host port: established wins, else the pending state, else none', () => {
    expect(usernetState(table, 40000)).toBe('ESTABLISHED');
    expect(usernetState(table, 33723)).toBe('SYN_SENT');
    expect(usernetState(table.replace('SYN_SENT', 'TIME_WAIT'), 33723)).toBeUndefined();
    expect(usernetState(table, 1)).toBeUndefined();
  });
});
