/**
 * microvm.SSHWaitReady: polls until the guest's SSH server completes a handshake with key
 * authentication (a bare TCP connect proves nothing behind QEMU's user-mode NAT, which accepts
 * before the guest is up). One probe at a time (dropbear drops a source address with more than 5
 * pending connections, and behind the NAT every probe has the same source). The first probe runs at
 * once; then the interval grows from `initialIntervalMs` by `backoff` up to `maxIntervalMs`.
 * Each failed probe is an `ssh.probe_failed` event on the span.
 */
import { context, type Span } from '@opentelemetry/api';
import { MicrovmError } from '../errors';
import { ATTR, EVENT, SPAN } from '../telemetry/attributes';
import { getTracer, inSpan, type SpanScope } from '../telemetry/tracer';
import * as v from '../validate';
import { type SshConnectOptions, SshClient } from './client';

/** The passage of time, injectable for tests. */
export interface Clock {
  now(): number;
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

export const systemClock: Clock = {
  now: () => performance.now(),
  sleep: (ms, signal) =>
    new Promise((resolve, reject) => {
      if (signal?.aborted) return reject(signal.reason);
      const t = setTimeout(() => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      }, ms);
      const onAbort = (): void => {
        clearTimeout(t);
        reject(signal?.reason);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
    }),
};

/** Options of {@link waitForReady}. */
export interface WaitForReadyOptions extends Omit<SshConnectOptions, 'signal'> {
  /** Give up after this long (60000 ms). */
  timeoutMs?: number;
  /** First retry interval (10 ms). */
  initialIntervalMs?: number;
  /** Interval cap (50 ms). */
  maxIntervalMs?: number;
  /** Interval growth factor (1.5). */
  backoff?: number;
  /** Per probe: how long to wait for the server's identification line (300 ms; see SshConnectOptions). */
  bannerTimeoutMs?: number;
  signal?: AbortSignal;
  clock?: Clock;
  /** Parent for the span; without it the global tracer provider's no-op or real tracer is used. */
  scope?: SpanScope;
  /** Connect function (tests, benchmarks). Default: SshClient.connect. */
  connect?: (options: SshConnectOptions) => Promise<SshClient>;
}

/** Resolves with a connected client once the server is ready; ERR_MICROVM_SSH_TIMEOUT otherwise. */
export async function waitForReady(options: WaitForReadyOptions, scope?: SpanScope): Promise<SshClient> {
  const o = v.object('options', options);
  const timeoutMs = o.timeoutMs === undefined ? 60000 : v.integer('timeoutMs', o.timeoutMs, 1, 3_600_000);
  const initial =
    o.initialIntervalMs === undefined ? 10 : v.integer('initialIntervalMs', o.initialIntervalMs, 0, 600000);
  const max = o.maxIntervalMs === undefined ? 50 : v.integer('maxIntervalMs', o.maxIntervalMs, 0, 600000);
  const backoff = o.backoff === undefined ? 1.5 : (o.backoff as number);
  if (typeof backoff !== 'number' || !(backoff >= 1))
    throw v.rangeError(`Expected a number >= 1 for backoff but received ${v.describe(o.backoff)}`);
  const clock = options.clock ?? systemClock;
  const connect = options.connect ?? ((c: SshConnectOptions) => SshClient.connect(c));
  const {
    timeoutMs: _t,
    initialIntervalMs: _i,
    maxIntervalMs: _m,
    backoff: _b,
    clock: _c,
    scope: _s,
    connect: _k,
    signal,
    bannerTimeoutMs: _bt,
    ...connectOptions
  } = options;
  const bannerTimeoutMs =
    o.bannerTimeoutMs === undefined ? 300 : v.integer('bannerTimeoutMs', o.bannerTimeoutMs, 1, 600000);
  const s = scope ?? options.scope ?? { tracer: getTracer(), ctx: context.active() };
  // go-microvm's keys, and the OpenTelemetry semantic-convention ones beside them.
  const attrs = {
    [ATTR.SSH_HOST]: options.host,
    [ATTR.SSH_PORT]: options.port,
    [ATTR.SSH_USER]: options.username,
    [ATTR.SERVER_ADDRESS]: options.host,
    [ATTR.SERVER_PORT]: options.port,
  };
  const body = async (span: Span): Promise<SshClient> => {
    const deadline = clock.now() + timeoutMs;
    let interval = initial;
    let probes = 0;
    let lastError: Error | undefined;
    try {
      for (;;) {
        signal?.throwIfAborted();
        probes++;
        try {
          const readyTimeoutMs = Math.max(
            1,
            Math.min(options.readyTimeoutMs ?? 5000, Math.ceil(deadline - clock.now())),
          );
          const client = await connect({
            ...connectOptions,
            readyTimeoutMs,
            bannerTimeoutMs: Math.min(bannerTimeoutMs, readyTimeoutMs),
            signal,
          });
          return client;
        } catch (err) {
          const code = (err as MicrovmError).code;
          // A wrong host key or refused key will not fix itself: stop at once.
          if (
            code === 'ERR_MICROVM_SSH_HOSTKEY' ||
            code === 'ERR_MICROVM_SSH_AUTH' ||
            (err as Error).name === 'AbortError'
          )
            throw err;
          lastError = err as Error;
          span.addEvent(EVENT.SSH_PROBE_FAILED, {
            [ATTR.SSH_PROBE_COUNT]: probes,
            [ATTR.SSH_PROBE_ERROR]: lastError.message,
          });
        }
        const left = deadline - clock.now();
        if (left <= 0) {
          throw new MicrovmError(
            'ERR_MICROVM_SSH_TIMEOUT',
            `SSH on ${options.username}@${options.host}:${options.port} was not ready after ${timeoutMs} ms and ${probes} probes; last error: ${lastError?.message ?? 'none'}`,
            { cause: lastError },
          );
        }
        await clock.sleep(Math.min(interval, left), signal);
        interval = Math.min(max, Math.max(1, interval * backoff));
      }
    } finally {
      span.setAttribute(ATTR.SSH_PROBES_TOTAL, probes);
    }
  };
  return inSpan(s, SPAN.SSH_WAIT_READY, attrs, (span) => body(span));
}
