/**
 * The registry's HTTP transport, on node:http/https rather than fetch: a layer body arrives as a
 * Node stream straight from the socket. Through fetch (undici's web streams, then
 * Readable.fromWeb) the same download cost about twice the JS-thread CPU per byte, and that
 * thread also parses the layer (bench/pull.js). Redirects are followed (registries send blobs to
 * object storage), credentials are dropped when a redirect leaves the origin, an https -> http
 * downgrade is refused, and a silent connection times out.
 */
import { createHash, type Hash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import * as http from 'node:http';
import * as https from 'node:https';
import * as net from 'node:net';
import { type Span, SpanKind, SpanStatusCode } from '@opentelemetry/api';
import { MicrovmError } from '../errors';
import { ATTR } from '../telemetry/attributes';
import type { SpanScope } from '../telemetry/tracer';
import { VERIFIES_DIGEST } from './oci';

/** A response whose body has not been read yet. */
export interface HttpResponse {
  status: number;
  ok: boolean;
  /** The URL that answered (after redirects). */
  url: string;
  header(name: string): string | undefined;
  body: http.IncomingMessage;
  /**
   * The whole body, refusing more than `max` bytes; with `deadlineMs`, the whole body must arrive
   * within that time (a server dripping a byte a second is ERR_MICROVM_REGISTRY_TIMEOUT, not a wait).
   */
  buffer(max: number, deadlineMs?: number): Promise<Buffer>;
  /** Drops the body (the connection is closed rather than drained). */
  discard(): void;
}

export interface HttpRequest {
  method?: 'GET' | 'POST';
  headers?: Record<string, string>;
  body?: string;
  signal?: AbortSignal;
  /** Socket inactivity limit, ms (60 s). */
  idleTimeoutMs?: number;
  /** Redirects followed (10). */
  maxRedirects?: number;
  /** Where each request's CLIENT span goes (one per hop of a redirect chain); none without it. */
  scope?: SpanScope;
}

/**
 * `url` for a span: no user or password, every query value `REDACTED` (object-storage redirects
 * carry signatures there, token requests their scope), per the semantic conventions' guidance.
 */
export function redactedUrl(url: URL): string {
  const c = new URL(url.toString());
  c.username = '';
  c.password = '';
  for (const k of new Set(c.searchParams.keys())) c.searchParams.set(k, 'REDACTED');
  return c.toString();
}

/**
 * Starts an HTTP CLIENT span (semantic conventions: named by the method; `http.request.method`,
 * `url.full` redacted, `server.address`, `server.port`). `startTime` lets a span begin before
 * the decision to record it.
 */
export function clientSpan(
  scope: SpanScope | undefined,
  method: string,
  url: URL,
  startTime?: number,
): Span | undefined {
  if (!scope) return undefined;
  return scope.tracer.startSpan(
    method,
    {
      kind: SpanKind.CLIENT,
      startTime,
      attributes: {
        [ATTR.HTTP_REQUEST_METHOD]: method,
        [ATTR.URL_FULL]: redactedUrl(url),
        [ATTR.SERVER_ADDRESS]: url.hostname,
        [ATTR.SERVER_PORT]: Number(url.port) || (url.protocol === 'https:' ? 443 : 80),
      },
    },
    scope.ctx,
  );
}

/** Ends a client span with the response status (4xx/5xx: an error, `error.type` the status). */
export function endClientSpan(span: Span | undefined, status: number | undefined, err?: Error): void {
  if (!span) return;
  if (status !== undefined) span.setAttribute(ATTR.HTTP_STATUS, status);
  if (err) {
    span.setAttribute(ATTR.ERROR_TYPE, (err as { code?: string }).code ?? err.name);
    span.setStatus({ code: SpanStatusCode.ERROR, message: err.message });
  } else if (status !== undefined && status >= 400) {
    span.setAttribute(ATTR.ERROR_TYPE, String(status));
    span.setStatus({ code: SpanStatusCode.ERROR });
  }
  span.end();
}

const agents = { http: new http.Agent({ keepAlive: true }), https: new https.Agent({ keepAlive: true }) };

function once(
  url: URL,
  init: HttpRequest,
  headers: Record<string, string>,
  method: string,
  body: string | undefined,
): Promise<http.IncomingMessage> {
  return new Promise((resolve, reject) => {
    const secure = url.protocol === 'https:';
    const req = (secure ? https : http).request(
      url,
      { method, headers, agent: secure ? agents.https : agents.http, signal: init.signal },
      resolve,
    );
    req.setTimeout(init.idleTimeoutMs ?? 60_000, () =>
      req.destroy(new Error(`no data from ${url.host} for ${Math.round((init.idleTimeoutMs ?? 60_000) / 1000)} s`)),
    );
    req.on('error', reject);
    req.end(body);
  });
}

/** Sends a request, following redirects; resolves once the final response's headers arrived. */
export async function request(target: string, init: HttpRequest = {}): Promise<HttpResponse> {
  let url = new URL(target);
  let method: string = init.method ?? 'GET';
  let body = init.body;
  const headers = { ...init.headers };
  if (body !== undefined) headers['content-length'] = String(Buffer.byteLength(body));
  for (let redirects = 0; ; redirects++) {
    if (url.protocol !== 'http:' && url.protocol !== 'https:')
      throw new MicrovmError('ERR_MICROVM_REGISTRY', `Refusing a ${url.protocol} URL from the registry`);
    const span = clientSpan(init.scope, method, url);
    let res: http.IncomingMessage;
    try {
      res = await once(url, init, headers, method, body);
    } catch (err) {
      endClientSpan(span, undefined, err as Error);
      throw err;
    }
    const status = res.statusCode ?? 0;
    if (span) {
      // The span lasts until the body is read, dropped or fails.
      let ended = false;
      const end = (err?: Error): void => {
        if (ended) return;
        ended = true;
        endClientSpan(span, status, err);
      };
      res.once('end', () => end());
      res.once('error', (e) => end(e));
      res.once('close', () => end());
    }
    const location = res.headers.location;
    if ([301, 302, 303, 307, 308].includes(status) && location) {
      res.destroy();
      if (redirects >= (init.maxRedirects ?? 10))
        throw new MicrovmError('ERR_MICROVM_REGISTRY', `Too many redirects from ${url.host}`);
      const next = new URL(location, url);
      if (url.protocol === 'https:' && next.protocol === 'http:')
        throw new MicrovmError('ERR_MICROVM_REGISTRY', `Refusing a redirect from https to http (${next.host})`);
      if (next.origin !== url.origin) delete headers.authorization; // never hand credentials to another host
      if (status === 303 || ((status === 301 || status === 302) && method === 'POST')) {
        method = 'GET';
        body = undefined;
        delete headers['content-length'];
        delete headers['content-type'];
      }
      url = next;
      continue;
    }
    const answered = url.toString();
    return {
      status,
      ok: status >= 200 && status < 300,
      url: answered,
      header: (name) => {
        const v = res.headers[name.toLowerCase()];
        return Array.isArray(v) ? v.join(', ') : v;
      },
      body: res,
      buffer: (max, deadlineMs) =>
        new Promise<Buffer>((resolve, reject) => {
          const chunks: Buffer[] = [];
          let n = 0;
          let settled = false;
          let timer: NodeJS.Timeout | undefined;
          const fail = (err: Error): void => {
            if (settled) return;
            settled = true;
            clearTimeout(timer);
            reject(err);
            res.destroy();
          };
          const tooBig = (): MicrovmError =>
            new MicrovmError(
              'ERR_MICROVM_REGISTRY',
              `${url.host} sent more than ${max} bytes where a small document was expected`,
            );
          if (Number(res.headers['content-length']) > max) return fail(tooBig());
          if (deadlineMs !== undefined) {
            timer = setTimeout(
              () =>
                fail(
                  new MicrovmError(
                    'ERR_MICROVM_REGISTRY_TIMEOUT',
                    `${url.host} did not send the whole document within ${deadlineMs} ms (${n} bytes so far)`,
                  ),
                ),
              deadlineMs,
            );
          }
          res.on('data', (c: Buffer) => {
            n += c.length;
            if (n > max) return fail(tooBig());
            chunks.push(c);
          });
          res.on('end', () => {
            if (settled) return;
            settled = true;
            clearTimeout(timer);
            resolve(Buffer.concat(chunks));
          });
          res.on('error', (err) => fail(err));
          res.on('aborted', () =>
            fail(new MicrovmError('ERR_MICROVM_REGISTRY', `${url.host} closed the connection mid-response`)),
          );
        }),
      discard: () => res.destroy(),
    };
  }
}

/**
 * A blob body read straight off a plain-HTTP socket into one reused buffer. Each 'data' chunk is
 * valid only during its handler (`transient`): consumers copy what they keep. Bytes are hashed
 * and counted on the way; 'end' comes only once `size` bytes hashed to `digest`, else 'error'.
 * Starts paused: attach listeners, then resume().
 *
 * Why: every byte that node:http hands over lands in freshly allocated memory twice (the
 * socket read and the parser's body copy), and a first touch of a page costs more here than
 * inflating into it (bench/pull.js); a loopback registry or mirror is where that shows.
 */
export class SocketBody extends EventEmitter {
  readonly transient = true;
  readonly [VERIFIES_DIGEST] = true;
  /** A copy of the bytes for the blob cache, written by whoever consumes them (see applyLayer). */
  tee?: { fd: number; commit(ok: boolean): void };
  #socket: net.Socket;
  #hash: Hash;
  #want: string;
  #size: number;
  #got = 0;
  #paused = true;
  #leftover: Buffer | undefined;
  #done = false;
  #watchdog: NodeJS.Timeout | undefined;
  #minimum: { windowMs: number; bytes: number } | undefined;

  constructor(socket: net.Socket, leftover: Buffer, size: number, digest: string) {
    super();
    this.#socket = socket;
    const [alg, want] = digest.split(':');
    this.#hash = createHash(alg);
    this.#want = want;
    this.#size = size;
    this.#leftover = leftover.length ? leftover : undefined;
  }

  /** Called by the socket's onread with a view of the shared buffer; false pauses the socket. */
  onRead(chunk: Buffer): boolean {
    if (this.#done) return false;
    this.#got += chunk.length;
    if (this.#got > this.#size) {
      this.#fail(
        new MicrovmError(
          'ERR_MICROVM_IMAGE_DIGEST',
          `blob ${this.#want.slice(0, 12)}: more than the ${this.#size} bytes its descriptor states`,
        ),
      );
      return false;
    }
    this.#hash.update(chunk);
    this.emit('data', chunk);
    if (this.#got === this.#size) this.#finish();
    return !this.#paused;
  }

  /** The socket ended or closed. */
  onClose(err?: Error): void {
    if (this.#done) return;
    this.#fail(
      new MicrovmError(
        'ERR_MICROVM_REGISTRY',
        `the registry closed the connection after ${this.#got} of ${this.#size} bytes${err ? ` (${err.message})` : ''}`,
        { cause: err },
      ),
    );
  }

  /**
   * Fails with ERR_MICROVM_REGISTRY_TIMEOUT when, while the consumer is reading, fewer than
   * `minBytesPerSecond` arrive on average over a `windowMs` window (a registry that drips bytes).
   */
  watchThroughput(windowMs: number, minBytesPerSecond: number): this {
    this.#minimum = { windowMs, bytes: Math.ceil((minBytesPerSecond * windowMs) / 1000) };
    return this;
  }

  #startWatchdog(): void {
    const m = this.#minimum;
    if (!m || this.#watchdog || this.#done) return;
    let base = this.#got;
    this.#watchdog = setInterval(() => {
      if (this.#done) return this.#stopWatchdog();
      if (!this.#paused && this.#got - base < m.bytes)
        this.#fail(
          new MicrovmError(
            'ERR_MICROVM_REGISTRY_TIMEOUT',
            `blob ${this.#want.slice(0, 12)}: ${this.#got - base} bytes in ${m.windowMs} ms, below the minimum of ${m.bytes} (${this.#got} of ${this.#size} received)`,
          ),
        );
      base = this.#got;
    }, m.windowMs);
    this.#watchdog.unref();
  }

  #stopWatchdog(): void {
    clearInterval(this.#watchdog);
    this.#watchdog = undefined;
  }

  #finish(): void {
    this.#done = true;
    this.#stopWatchdog();
    this.#socket.destroy();
    const got = this.#hash.digest('hex');
    if (got !== this.#want) {
      this.emit(
        'error',
        new MicrovmError('ERR_MICROVM_IMAGE_DIGEST', `blob: digest mismatch (expected ${this.#want}, got ${got})`),
      );
      return;
    }
    this.emit('end');
  }

  #fail(err: Error): void {
    this.#done = true;
    this.#stopWatchdog();
    this.#socket.destroy();
    this.emit('error', err);
  }

  pause(): this {
    this.#paused = true;
    this.#socket.pause();
    return this;
  }

  resume(): this {
    if (this.#done) return this;
    this.#paused = false;
    this.#startWatchdog();
    const first = this.#leftover;
    this.#leftover = undefined;
    if (first && !this.onRead(first)) return this;
    if (!this.#done && !this.#paused) this.#socket.resume();
    return this;
  }

  destroy(): this {
    this.#stopWatchdog();
    if (!this.#done) {
      this.#done = true;
      this.#socket.destroy();
    }
    return this;
  }
}

/**
 * GET over plain HTTP into a SocketBody, when the answer is a plain 200 with a Content-Length
 * that matches `size`. Anything else (a redirect, 401, an error status, chunked or encoded
 * bodies) resolves undefined, and the caller takes the general path.
 */
export function fastGet(
  target: URL,
  headers: Record<string, string>,
  size: number,
  digest: string,
  signal?: AbortSignal,
): Promise<SocketBody | undefined> {
  return new Promise((resolve, reject) => {
    if (target.protocol !== 'http:' || Object.values(headers).some((v) => /[\r\n]/.test(v))) return resolve(undefined);
    let head: Buffer[] = [];
    let headBytes = 0;
    let body: SocketBody | undefined;
    let settled = false;
    const settle = (v: SocketBody | undefined, err?: Error): void => {
      if (settled) return;
      settled = true;
      signal?.removeEventListener('abort', onAbort);
      if (err) reject(err);
      else resolve(v);
    };
    const onAbort = (): void => {
      socket.destroy();
      body?.destroy();
      settle(
        undefined,
        signal?.reason instanceof Error ? signal.reason : new DOMException('The operation was aborted', 'AbortError'),
      );
    };
    const socket = net.connect({
      host: target.hostname.replace(/^\[|\]$/g, ''),
      port: Number(target.port || 80),
      noDelay: true,
      onread: {
        buffer: Buffer.allocUnsafe(256 * 1024),
        callback: (n: number, buf: Uint8Array): boolean => {
          const chunk = Buffer.from(buf.buffer, buf.byteOffset, n);
          if (body) return body.onRead(chunk);
          head.push(Buffer.from(chunk)); // the header is small: copied
          headBytes += n;
          const all = Buffer.concat(head);
          const end = all.indexOf('\r\n\r\n');
          if (end < 0) {
            if (headBytes > 64 * 1024) {
              socket.destroy();
              settle(undefined);
            }
            return true;
          }
          head = [];
          const lines = all.toString('latin1', 0, end).split('\r\n');
          const status = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0] ?? '');
          const h: Record<string, string> = {};
          for (const l of lines.slice(1)) {
            const i = l.indexOf(':');
            if (i > 0) h[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
          }
          const plain =
            status?.[1] === '200' &&
            h['content-length'] === String(size) &&
            !h['transfer-encoding'] &&
            (!h['content-encoding'] || h['content-encoding'] === 'identity');
          if (!plain) {
            socket.destroy();
            settle(undefined);
            return false;
          }
          body = new SocketBody(socket, all.subarray(end + 4), size, digest);
          socket.on('close', () => body?.onClose());
          settle(body);
          return false; // paused until the consumer resumes
        },
      },
    } as net.NetConnectOpts);
    socket.setTimeout(60_000, () => socket.destroy(new Error('no data for 60 s')));
    socket.on('error', (e) => {
      if (body) body.onClose(e);
      else settle(undefined); // the general path will report it (with retries)
    });
    socket.on('close', () => settle(undefined));
    signal?.addEventListener('abort', onAbort, { once: true });
    const path = `${target.pathname}${target.search}`;
    const lines = [
      `GET ${path} HTTP/1.1`,
      `Host: ${target.host}`,
      'User-Agent: node-microvm',
      'Accept-Encoding: identity',
      'Connection: close',
    ];
    for (const [k, v] of Object.entries(headers)) lines.push(`${k}: ${v}`);
    socket.write(`${lines.join('\r\n')}\r\n\r\n`);
  });
}
