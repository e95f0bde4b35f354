/**
 * Readiness strategies besides SSH, run in microvm.PostBoot, each in its own span:
 * - `{ log }`: a line of the guest's output matches (microvm.WaitForLog);
 * - `{ tcp }`: a forwarded guest port holds a connection open (microvm.WaitForTCP);
 * - `{ http }`: a GET on a forwarded guest port answers with the expected status (microvm.WaitForHTTP).
 * Each ends with ERR_MICROVM_WAIT_TIMEOUT after `timeoutMs`, and ends at once when `signal` aborts
 * (run() aborts it when the VM dies, so no wait outlives its VM).
 */
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import type { Span } from '@opentelemetry/api';
import { MicrovmError } from './errors';
import { ATTR, SPAN } from './telemetry/attributes';
import { inSpan, type SpanScope } from './telemetry/tracer';
import * as v from './validate';
import { systemClock } from './ssh/wait-ready';

/** One readiness condition; see {@link RunOptions.waitFor}. */
export type WaitStrategy =
  | {
      /** A line of output that contains this string or matches this expression. */
      log: string | RegExp;
      /** Which output: the command's `stdout` (default where the backend keeps it apart), `stderr`, or the `console`. */
      stream?: 'stdout' | 'stderr' | 'console';
      timeoutMs?: number;
    }
  | {
      /** A guest port (forwarded with `ports`) that accepts a connection and keeps it open. */
      tcp: number;
      timeoutMs?: number;
    }
  | {
      http: {
        /** A guest port forwarded with `ports`. */
        port: number;
        /** Request path ('/'). */
        path?: string;
        /** The status that means ready (default: any 2xx or 3xx). */
        status?: number;
      };
      timeoutMs?: number;
    };

/** A validated strategy. */
export type NormalizedWait =
  | {
      kind: 'log';
      match: (line: string) => boolean;
      pattern: string;
      stream?: 'stdout' | 'stderr' | 'console';
      timeoutMs: number;
    }
  | { kind: 'tcp'; port: number; timeoutMs: number }
  | { kind: 'http'; port: number; path: string; status?: number; timeoutMs: number };

const DEFAULT_TIMEOUT_MS = 60_000;
/** A line longer than this is matched on its first MAX_LINE bytes (guest output is hostile input). */
const MAX_LINE = 64 * 1024;
/** QEMU's user network accepts on the host side before it knows whether the guest listens. */
const TCP_HOLD_MS = 250;

/** Validates `waitFor` (one strategy or a list). */
export function normalizeWaitFor(value: unknown): NormalizedWait[] {
  const list = Array.isArray(value) ? value : [value];
  return list.map((item: unknown, i) => {
    const name = Array.isArray(value) ? `waitFor[${i}]` : 'waitFor';
    const o = v.object(name, item);
    const timeoutMs =
      o.timeoutMs === undefined ? DEFAULT_TIMEOUT_MS : v.integer(`${name}.timeoutMs`, o.timeoutMs, 1, 3_600_000);
    const kinds = ['log', 'tcp', 'http'].filter((k) => o[k] !== undefined);
    if (kinds.length !== 1) throw v.typeError(`Expected exactly one of log, tcp or http in ${name}`);
    if (o.log !== undefined) {
      v.knownKeys(name, o, ['log', 'stream', 'timeoutMs']);
      const stream =
        o.stream === undefined
          ? undefined
          : o.stream === 'stdout' || o.stream === 'stderr' || o.stream === 'console'
            ? o.stream
            : (() => {
                throw v.rangeError(
                  `Expected 'stdout', 'stderr' or 'console' for ${name}.stream but received ${v.describe(o.stream)}`,
                );
              })();
      if (o.log instanceof RegExp) {
        const re = new RegExp(o.log.source, o.log.flags.replace(/[gy]/g, '')); // no lastIndex state
        return { kind: 'log', match: (l: string) => re.test(l), pattern: String(re), stream, timeoutMs };
      }
      const text = v.string(`${name}.log`, o.log);
      return { kind: 'log', match: (l: string) => l.includes(text), pattern: JSON.stringify(text), stream, timeoutMs };
    }
    if (o.tcp !== undefined) {
      v.knownKeys(name, o, ['tcp', 'timeoutMs']);
      return { kind: 'tcp', port: v.integer(`${name}.tcp`, o.tcp, 1, 65535), timeoutMs };
    }
    v.knownKeys(name, o, ['http', 'timeoutMs']);
    const h = v.object(`${name}.http`, o.http);
    v.knownKeys(`${name}.http`, h, ['port', 'path', 'status']);
    const p = h.path === undefined ? '/' : v.string(`${name}.http.path`, h.path, { maxLength: 2048 });
    if (!p.startsWith('/') || /[\s\0]/.test(p))
      throw v.rangeError(`Expected a path starting with / and without white space for ${name}.http.path`);
    return {
      kind: 'http',
      port: v.integer(`${name}.http.port`, h.port, 1, 65535),
      path: p,
      status: h.status === undefined ? undefined : v.integer(`${name}.http.status`, h.status, 100, 599),
      timeoutMs,
    };
  });
}

/** What a wait needs from the VM. */
export interface WaitTarget {
  name: string;
  /** Host port for a guest port (throws ERR_MICROVM_PORT_NOT_FORWARDED). */
  port(guest: number): number;
  stdoutPath: string | undefined;
  stderrPath: string | undefined;
  consoleLogPath: string;
  /** See BackendHandle.tcpForwardState: the guest side of a forwarded connection. */
  tcpForwardState?: (hostPort: number) => Promise<string | undefined>;
}

/** Runs `fn` until it returns true; ERR_MICROVM_WAIT_TIMEOUT after timeoutMs. */
async function poll(
  span: Span,
  w: NormalizedWait,
  what: string,
  signal: AbortSignal,
  fn: (signal: AbortSignal) => Promise<boolean | string>,
): Promise<void> {
  const deadline = performance.now() + w.timeoutMs;
  const timeout = AbortSignal.timeout(w.timeoutMs);
  const both = AbortSignal.any([signal, timeout]);
  let attempts = 0;
  let last = '';
  let interval = 20;
  try {
    for (;;) {
      attempts++;
      const r = await fn(both).catch((err: unknown) => {
        if (signal.aborted) throw signal.reason;
        return timeout.aborted ? 'no answer before the deadline' : (err as Error).message;
      });
      if (r === true) return;
      // A probe the deadline cut short says less than the one before it.
      if (typeof r === 'string' && !(timeout.aborted && last)) last = r;
      if (signal.aborted) throw signal.reason;
      if (performance.now() >= deadline || timeout.aborted) {
        throw new MicrovmError(
          'ERR_MICROVM_WAIT_TIMEOUT',
          `${what} was not ready within ${w.timeoutMs} ms (${attempts} attempt${attempts === 1 ? '' : 's'}${last ? `; last: ${last}` : ''})`,
        );
      }
      await systemClock.sleep(Math.min(interval, Math.max(1, deadline - performance.now())), signal);
      interval = Math.min(250, Math.ceil(interval * 1.5));
    }
  } finally {
    span.setAttribute(ATTR.WAIT_ATTEMPTS, attempts);
  }
}

/** Reads `file` from `offset` and feeds complete lines to `onLine`; returns true when one matched. */
class LineReader {
  #offset = 0;
  #partial = '';
  /** The current line grew past MAX_LINE: the rest of it, up to its newline, is skipped. */
  #overflow = false;

  constructor(readonly file: string) {}

  read(match: (line: string) => boolean): boolean {
    let fd: number;
    try {
      fd = fs.openSync(this.file, 'r');
    } catch {
      return false; // not created yet
    }
    try {
      const buf = Buffer.alloc(64 * 1024);
      for (;;) {
        const n = fs.readSync(fd, buf, 0, buf.length, this.#offset);
        if (n <= 0) break;
        this.#offset += n;
        const pieces = buf.toString('utf8', 0, n).split('\n');
        for (let i = 0; i < pieces.length; i++) {
          const last = i === pieces.length - 1;
          if (!this.#overflow) this.#partial += pieces[i];
          if (this.#partial.length > MAX_LINE) {
            this.#partial = this.#partial.slice(0, MAX_LINE);
            this.#overflow = true;
          }
          if (last) break; // no newline yet
          const line = this.#partial.replace(/\r$/, '');
          this.#partial = '';
          this.#overflow = false;
          if (match(line)) return true;
        }
      }
      // A last line without its newline yet counts too (a prompt, "ready" without \n).
      return this.#partial !== '' && match(this.#partial);
    } finally {
      fs.closeSync(fd);
    }
  }
}

/**
 * One TCP probe of a forwarded port. Ready: the connection holds (TCP_HOLD_MS) and, where the
 * hypervisor can tell (QEMU), its guest side is ESTABLISHED: QEMU's user network accepts on the
 * host at once and keeps the connection open while its SYN to a guest that is not up yet goes
 * unanswered, so an open host connection alone proves nothing there.
 */
function tcpProbe(
  port: number,
  signal: AbortSignal,
  forwardState: WaitTarget['tcpForwardState'],
): Promise<boolean | string> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    let timer: NodeJS.Timeout | undefined;
    let settled = false;
    const done = (r: boolean | string): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      signal.removeEventListener('abort', onAbort);
      socket.destroy();
      resolve(r);
    };
    const onAbort = (): void => done('aborted');
    signal.addEventListener('abort', onAbort, { once: true });
    const closed = 'connection closed by the VM side (nothing listens in the guest)';
    socket.once('connect', () => {
      timer = setTimeout(() => {
        if (!forwardState) return done(true);
        forwardState(port).then(
          (state) => done(state === 'ESTABLISHED' ? true : `guest side ${state ?? 'closed'}`),
          (err: Error) => done(`cannot read the forward's state: ${err.message}`),
        );
      }, TCP_HOLD_MS);
    });
    socket.once('error', (e: NodeJS.ErrnoException) => done(e.code ?? e.message));
    socket.once('close', () => done(closed));
    socket.once('end', () => done(closed));
    socket.on('data', () => undefined);
  });
}

function httpProbe(
  port: number,
  pathName: string,
  status: number | undefined,
  span: Span,
  signal: AbortSignal,
): Promise<boolean | string> {
  return new Promise((resolve) => {
    const req = http.get({ host: '127.0.0.1', port, path: pathName, timeout: 2000, signal, agent: false }, (res) => {
      res.resume(); // the body is not read: only the status counts
      const code = res.statusCode ?? 0;
      span.setAttribute(ATTR.HTTP_STATUS, code);
      const ok = status === undefined ? code >= 200 && code < 400 : code === status;
      resolve(ok ? true : `HTTP ${code}`);
      req.destroy();
    });
    req.once('timeout', () => req.destroy(new Error('no response within 2000 ms')));
    req.once('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? e.message));
  });
}

/** Waits until `w` holds for `target`, in a span under `scope`. */
export function waitFor(w: NormalizedWait, target: WaitTarget, scope: SpanScope, signal: AbortSignal): Promise<void> {
  if (w.kind === 'log') {
    const stream = w.stream ?? (target.stdoutPath ? 'stdout' : 'console');
    const file =
      stream === 'stdout'
        ? (target.stdoutPath ?? target.consoleLogPath)
        : stream === 'stderr'
          ? (target.stderrPath ?? target.consoleLogPath)
          : target.consoleLogPath;
    return inSpan(
      scope,
      SPAN.WAIT_FOR_LOG,
      { [ATTR.WAIT_PATTERN]: w.pattern.slice(0, 200), [ATTR.WAIT_STREAM]: stream },
      async (span) => {
        const reader = new LineReader(file);
        await poll(span, w, `the ${stream} of ${target.name} (waiting for ${w.pattern.slice(0, 80)})`, signal, () =>
          Promise.resolve(reader.read(w.match)),
        );
      },
    );
  }
  const host = target.port(w.port); // throws when the guest port is not forwarded
  if (w.kind === 'tcp') {
    return inSpan(
      scope,
      SPAN.WAIT_FOR_TCP,
      { [ATTR.WAIT_GUEST_PORT]: w.port, [ATTR.SERVER_ADDRESS]: '127.0.0.1', [ATTR.SERVER_PORT]: host },
      async (span) => {
        await poll(span, w, `guest port ${w.port} of ${target.name}`, signal, (s) =>
          tcpProbe(host, s, target.tcpForwardState),
        );
      },
    );
  }
  return inSpan(
    scope,
    SPAN.WAIT_FOR_HTTP,
    {
      [ATTR.WAIT_GUEST_PORT]: w.port,
      [ATTR.SERVER_ADDRESS]: '127.0.0.1',
      [ATTR.SERVER_PORT]: host,
      [ATTR.URL_PATH]: w.path,
    },
    async (span) => {
      await poll(span, w, `http://127.0.0.1:${host}${w.path} (guest port ${w.port} of ${target.name})`, signal, (s) =>
        httpProbe(host, w.path, w.status, span, s),
      );
    },
  );
}
