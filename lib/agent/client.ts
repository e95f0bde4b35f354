/**
 * The host end of the guest agent's channel (lib/agent/protocol.ts, native/guest_agent.cc):
 * processes in the guest with their streams kept apart, and file transfers, over one socket.
 *
 * Memory is bounded by the protocol, not by the guest's goodwill: the guest may send at most
 * {@link WINDOW} bytes on a stream before this side grants more, and this side grants only what
 * its consumer has taken (a Readable below its high-water mark, a file write that completed). A
 * guest that sends beyond its grant, an unknown frame, or an oversized one ends the channel with
 * ERR_MICROVM_AGENT_PROTOCOL; the VM itself stays controllable (stop/remove do not use it).
 */
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import * as net from 'node:net';
import * as os from 'node:os';
import { Readable, Writable } from 'node:stream';
import { MicrovmError } from '../errors';
import {
  encodeFrame,
  FRAME,
  type Frame,
  FrameDecoder,
  type FrameType,
  GUEST_PROTO,
  HOST_PROTO,
  jsonPayload,
  MAX_PAYLOAD,
  protocolError,
  WINDOW,
} from './protocol';

/** What the agent said when the channel opened. */
export interface AgentHello {
  /** The agent's PID in the guest. */
  pid: number;
  /** The guest's CLOCK_MONOTONIC when it answered (ns since its kernel started timekeeping). */
  uptimeNs: number;
  caps: string[];
}

/** How a guest process ended: its exit code, or the signal that killed it. */
export interface AgentExit {
  exitCode: number | null;
  signal: NodeJS.Signals | null;
}

/** Options of {@link AgentClient.spawn}. */
export interface AgentSpawnOptions {
  /** Added to (and overriding) the image's Env and run()'s env. */
  env?: Record<string, string>;
  /** Working directory; default the image's WorkingDir. */
  cwd?: string;
  /** "name", "uid" or "uid:gid" from the guest's /etc/passwd; default the agent's (root). */
  user?: string;
  /** A pseudo-terminal (stdout and stderr merged, as on a terminal), with its size. */
  tty?: { rows: number; cols: number };
  /** Keep stdin open for writing (`proc.stdin`); otherwise the process reads /dev/null. */
  stdin?: boolean;
}

const SIGNALS = new Map(Object.entries(os.constants.signals).map(([name, n]) => [n, name as NodeJS.Signals]));

interface StreamHandler {
  frame(f: Frame): void;
  fail(err: Error): void;
}

/** A guest errno answer as a coded error; `guestCode` is the errno name ("ENOENT"). */
export class GuestError extends MicrovmError {
  readonly guestCode: string;
  constructor(code: 'ERR_MICROVM_GUEST_FILE' | 'ERR_MICROVM_AGENT_REFUSED', guestCode: string, message: string) {
    super(code, message);
    this.guestCode = guestCode;
  }
}

function errorFrame(f: Frame, code: 'ERR_MICROVM_GUEST_FILE' | 'ERR_MICROVM_AGENT_REFUSED'): GuestError {
  const j = jsonPayload(f);
  const guestCode = typeof j.code === 'string' ? j.code.slice(0, 32) : 'EIO';
  const message = typeof j.message === 'string' ? j.message.slice(0, 500) : 'failed';
  return new GuestError(code, guestCode, `The guest agent answered ${guestCode}: ${message}`);
}

/** Credit the guest has on one stream; a guest that overdraws it broke the protocol. */
class Credit {
  #left = WINDOW;
  #ungranted = 0;
  take(n: number): void {
    this.#left -= n;
    if (this.#left < 0) throw protocolError('output beyond the granted window');
  }
  /** Records `n` consumed bytes to grant later. */
  record(n: number): void {
    this.#ungranted += n;
  }
  /** Records `n` consumed bytes; returns what to grant now (0: not yet, batch it). */
  consumed(n: number, now = false): number {
    this.#ungranted += n;
    if (this.#ungranted === 0 || (!now && this.#ungranted < WINDOW / 4)) return 0;
    const g = this.#ungranted;
    this.#ungranted = 0;
    this.#left += g;
    return g;
  }
}

/** Data this side sends on one stream, within what the other side granted. */
class Outbox {
  #credit: number;
  #wake: (() => void) | undefined;
  constructor(
    private readonly client: AgentClient,
    private readonly id: number,
    credit: number,
  ) {
    this.#credit = credit;
  }
  grant(n: number): void {
    this.#credit += n;
    this.#wake?.();
  }
  /** Wakes a send waiting for credit (the stream ended). */
  wake(): void {
    this.#wake?.();
  }
  /** Sends `chunk` in frames as credit allows; false when `ended()` stopped it first. */
  async send(chunk: Buffer, ended: () => boolean): Promise<boolean> {
    let off = 0;
    while (off < chunk.length) {
      if (ended()) return false;
      if (this.#credit === 0) {
        await new Promise<void>((resolve) => (this.#wake = resolve));
        this.#wake = undefined;
        continue;
      }
      const n = Math.min(chunk.length - off, MAX_PAYLOAD, this.#credit);
      this.client.send(FRAME.DATA, this.id, chunk.subarray(off, off + n));
      this.#credit -= n;
      off += n;
    }
    return true;
  }
}

/**
 * A process in the guest: `stdout`/`stderr` (Readable), `stdin` (Writable, when asked for),
 * `exited`, `kill()`, `resize()`.
 */
export class AgentProcess extends EventEmitter<{ exit: [AgentExit] }> {
  readonly stdout: Readable;
  readonly stderr: Readable;
  readonly stdin: Writable | null;
  readonly exited: Promise<AgentExit>;
  #client: AgentClient;
  #id: number;
  #credit = new Credit();
  #blocked = { out: false, err: false };
  #ended = false;
  #out: Outbox;

  /** @internal */
  constructor(client: AgentClient, id: number, withStdin: boolean, hostWindow: number) {
    super();
    this.#client = client;
    this.#id = id;
    this.#out = new Outbox(client, id, hostWindow);
    const reader = (which: 'out' | 'err'): Readable =>
      new Readable({
        read: () => {
          this.#blocked[which] = false;
          this.#grant(0, true);
        },
      });
    this.stdout = reader('out');
    this.stderr = reader('err');
    this.stdin = withStdin
      ? new Writable({
          write: (chunk: Buffer, _enc, cb) => {
            // Once the process is gone its stdin swallows the rest, as a closed pipe would.
            this.#out.send(chunk, () => this.#ended).then(() => cb(), cb);
          },
          final: (cb) => {
            if (!this.#ended) client.send(FRAME.EOF, id);
            cb();
          },
        })
      : null;
    this.exited = new Promise<AgentExit>((resolve, reject) => {
      client.attach(id, {
        frame: (f) => {
          if (f.type === FRAME.STDOUT || f.type === FRAME.STDERR) {
            this.#credit.take(f.payload.length);
            const which = f.type === FRAME.STDOUT ? 'out' : 'err';
            if (!(which === 'out' ? this.stdout : this.stderr).push(f.payload)) this.#blocked[which] = true;
            this.#grant(f.payload.length, false);
          } else if (f.type === FRAME.GRANT) {
            if (f.payload.length !== 4) throw protocolError('a grant frame of the wrong size');
            this.#out.grant(f.payload.readUInt32BE(0));
          } else if (f.type === FRAME.EXIT) {
            const j = jsonPayload(f);
            const exit: AgentExit =
              typeof j.signal === 'number'
                ? { exitCode: null, signal: SIGNALS.get(j.signal) ?? 'SIGKILL' }
                : { exitCode: typeof j.code === 'number' ? j.code : null, signal: null };
            this.#finish();
            resolve(exit);
            this.emit('exit', exit);
          } else if (f.type === FRAME.ERROR) {
            this.#finish();
            reject(errorFrame(f, 'ERR_MICROVM_AGENT_REFUSED'));
          } else {
            throw protocolError(`frame type ${f.type} on a process stream`);
          }
        },
        fail: (err) => {
          this.#finish(err);
          reject(err);
        },
      });
    });
    this.exited.catch(() => undefined); // the caller's `await` sees it; no unhandled rejection
  }

  #grant(n: number, now: boolean): void {
    if (this.#ended || this.#blocked.out || this.#blocked.err) {
      this.#credit.record(n); // granted once the reader takes it
      return;
    }
    const g = this.#credit.consumed(n, now);
    if (g) {
      const b = Buffer.allocUnsafe(4);
      b.writeUInt32BE(g, 0);
      this.#client.send(FRAME.GRANT, this.#id, b);
    }
  }

  #finish(err?: Error): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#client.detach(this.#id);
    this.#out.wake();
    if (err) {
      // The error is `exited`'s; streams just end (an 'error' nobody listens to would throw).
      this.stdout.destroy();
      this.stderr.destroy();
    } else {
      this.stdout.push(null);
      this.stderr.push(null);
    }
    this.stdin?.destroy();
  }

  /** Sends a signal to the process's group (default SIGTERM). */
  kill(signal: NodeJS.Signals | number = 'SIGTERM'): boolean {
    if (this.#ended) return false;
    const n = typeof signal === 'number' ? signal : os.constants.signals[signal];
    if (n === undefined) throw new RangeError(`Unknown signal ${String(signal)}`);
    this.#client.send(FRAME.SIGNAL, this.#id, JSON.stringify({ signal: n }));
    return true;
  }

  /** Sets the terminal's size (a tty process only). */
  resize(rows: number, cols: number): void {
    if (!this.#ended) this.#client.send(FRAME.RESIZE, this.#id, JSON.stringify({ rows, cols }));
  }
}

/**
 * One request/answer file operation: `infos` (metadata frames), data (`onData`), then done or a
 * GuestError. Data is granted back once `onData`'s promise settles, so a slow disk slows the guest.
 */
export class OpStream {
  readonly done: Promise<void>;
  #client: AgentClient;
  #id: number;
  #credit = new Credit();
  #out: Outbox;
  #ended = false;
  #queue: Promise<void> = Promise.resolve();
  #local: Error | undefined;
  #deadline: NodeJS.Timeout | undefined;

  /** @internal */
  constructor(
    client: AgentClient,
    id: number,
    hostWindow: number,
    handlers: { onInfo?: (j: Record<string, unknown>) => void; onData?: (b: Buffer) => Promise<void> | void } = {},
  ) {
    this.#client = client;
    this.#id = id;
    this.#out = new Outbox(client, id, hostWindow);
    this.done = new Promise<void>((resolve, reject) => {
      const end = (err?: Error): void => {
        if (this.#ended) return;
        this.#ended = true;
        clearTimeout(this.#deadline);
        client.detach(id);
        this.#out.wake();
        // Data still being written finishes (or fails) first.
        void this.#queue.then(() => {
          // A local failure (a limit, a full disk) is the reason, also when the channel then closed.
          const e = this.#local ?? err;
          if (e) reject(e);
          else resolve();
        });
      };
      // A handler's own failure (a limit, a disk error) cancels the transfer; the stream stays
      // attached until the guest's last frame for it, so nothing it still sends is unexpected.
      const failLocally = (err: unknown): void => {
        if (this.#local) return;
        this.#local = err instanceof Error ? err : new Error(String(err));
        this.cancel();
      };
      client.attach(id, {
        frame: (f) => {
          if (f.type === FRAME.INFO || f.type === FRAME.STDOUT) {
            this.#credit.take(f.payload.length);
            if (this.#local) return;
            if (f.type === FRAME.INFO) {
              const j = jsonPayload(f);
              try {
                handlers.onInfo?.(j);
              } catch (err) {
                failLocally(err);
                return;
              }
              this.#grant(f.payload.length);
            } else {
              const data = f.payload;
              this.#queue = this.#queue.then(async () => {
                if (this.#local) return;
                try {
                  await handlers.onData?.(data);
                } catch (err) {
                  failLocally(err);
                  return;
                }
                this.#grant(data.length);
              });
            }
          } else if (f.type === FRAME.GRANT) {
            if (f.payload.length !== 4) throw protocolError('a grant frame of the wrong size');
            this.#out.grant(f.payload.readUInt32BE(0));
          } else if (f.type === FRAME.EXIT) {
            end();
          } else if (f.type === FRAME.ERROR) {
            end(this.#local ? undefined : errorFrame(f, 'ERR_MICROVM_GUEST_FILE'));
          } else {
            throw protocolError(`frame type ${f.type} on a file stream`);
          }
        },
        fail: (err) => end(err),
      });
    });
    this.done.catch(() => undefined);
  }

  #grant(n: number): void {
    if (this.#ended) return;
    const g = this.#credit.consumed(n);
    if (g) {
      const b = Buffer.allocUnsafe(4);
      b.writeUInt32BE(g, 0);
      this.#client.send(FRAME.GRANT, this.#id, b);
    }
  }

  /** Sends input (a file being written), waiting for the guest's grants. */
  async write(chunk: Buffer): Promise<void> {
    if (!(await this.#out.send(chunk, () => this.#ended)))
      throw await this.done.then(
        () => new Error('the transfer ended early'),
        (e: Error) => e,
      );
  }

  end(): void {
    if (!this.#ended) this.#client.send(FRAME.EOF, this.#id);
  }

  /**
   * Abandons the transfer: the guest drops what it wrote (ECANCELED). A guest that does not end
   * the stream within {@link KILL_GRACE_MS} loses the channel (`done` then rejects).
   */
  cancel(): void {
    if (this.#ended) return;
    this.#client.send(FRAME.SIGNAL, this.#id, '{"signal":9}');
    this.#deadline ??= setTimeout(() => {
      if (!this.#ended)
        this.#client.close(
          new MicrovmError(
            'ERR_MICROVM_AGENT_UNAVAILABLE',
            `The guest agent did not end a cancelled transfer within ${KILL_GRACE_MS} ms; the channel was closed`,
          ),
        );
    }, KILL_GRACE_MS);
    this.#deadline.unref();
  }
}

/** Options of {@link AgentClient.connect}. */
export interface AgentConnectOptions {
  /** How long the agent may take to answer. Default 10000 ms. */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Settles when the VM ends: the wait stops at once (ERR_MICROVM_AGENT_UNAVAILABLE). */
  vmEnded?: Promise<unknown>;
  /**
   * The socket may exist (or not yet) before the agent listens behind it, and a connection closed
   * before any frame means "not yet" (libkrun's vsock bridge): try again every 20 ms until the
   * timeout, the VM's end or the signal.
   */
  acceptsLate?: boolean;
  /**
   * With `acceptsLate`: asked before each new try; an error it returns ends the wait with it (the
   * guest said its agent will not come, say).
   */
  notComing?: () => Error | undefined;
}

/**
 * How long the agent has to end a stream after this side killed or cancelled it (SIGKILL to the
 * guest process, a cancelled transfer) before the channel is closed: the agent is guest code, and a
 * guest that never answers must not keep a host wait open.
 */
export const KILL_GRACE_MS = 2000;

/** Marks a connection attempt that failed because nothing listened yet. */
const NOT_YET = Symbol('microvm.agent.notYet');

/** A connected agent channel. One host process at a time may hold a VM's channel. */
export class AgentClient extends EventEmitter<{ close: [Error] }> {
  readonly hello: AgentHello;
  readonly socketPath: string;
  #sock: net.Socket;
  #decoder: FrameDecoder;
  #streams = new Map<number, StreamHandler>();
  #nextId = 1;
  #closed: Error | undefined;

  readonly #nonce: string;

  private constructor(sock: net.Socket, decoder: FrameDecoder, hello: AgentHello, socketPath: string, nonce: string) {
    super();
    this.#nonce = nonce;
    this.#sock = sock;
    this.#decoder = decoder;
    this.hello = hello;
    this.socketPath = socketPath;
    sock.unref();
    sock.on('data', (chunk: Buffer) => this.#receive(chunk));
    sock.on('error', () => undefined); // 'close' follows
    sock.on('close', () =>
      this.#fatal(
        new MicrovmError(
          'ERR_MICROVM_AGENT_UNAVAILABLE',
          `The guest agent's channel closed (${socketPath}): the VM ended?`,
        ),
      ),
    );
    this.#receive(Buffer.alloc(0)); // frames that came with the hello
  }

  /**
   * Connects to the agent's socket and exchanges hellos. Fails with ERR_MICROVM_AGENT_TIMEOUT when
   * no answer comes in time (the agent is not running, or another process holds the channel),
   * ERR_MICROVM_AGENT_UNAVAILABLE when the socket is gone or the VM ended.
   */
  static async connect(socketPath: string, options: AgentConnectOptions = {}): Promise<AgentClient> {
    if (!options.acceptsLate) return AgentClient.#attempt(socketPath, options);
    const timeoutMs = options.timeoutMs ?? 10_000;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        return await AgentClient.#attempt(socketPath, { ...options, timeoutMs: Math.max(1, deadline - Date.now()) });
      } catch (err) {
        // The VM's end and an abort come as errors of their own (without NOT_YET) from the attempt.
        if (!(err as { [NOT_YET]?: boolean })[NOT_YET] || options.signal?.aborted) throw err;
        const why = options.notComing?.();
        if (why) throw why;
        if (Date.now() + 20 >= deadline)
          throw new MicrovmError(
            'ERR_MICROVM_AGENT_TIMEOUT',
            `The guest agent did not answer within ${timeoutMs} ms (${socketPath}): nothing listened in the guest (last: ${(err as Error).message})`,
          );
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }

  static #attempt(socketPath: string, options: AgentConnectOptions): Promise<AgentClient> {
    const timeoutMs = options.timeoutMs ?? 10_000;
    const nonce = randomBytes(12).toString('hex');
    const helloFrame = encodeFrame(FRAME.HELLO, 0, JSON.stringify({ proto: HOST_PROTO, nonce }));
    let resent = 0;
    return new Promise<AgentClient>((resolve, reject) => {
      const decoder = new FrameDecoder();
      const sock = net.createConnection(socketPath);
      let settled = false;
      const finish = (err: Error | undefined, hello?: AgentHello): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        options.signal?.removeEventListener('abort', onAbort);
        sock.off('data', onData);
        if (err) {
          sock.destroy();
          reject(err);
        } else {
          sock.off('error', onError);
          sock.off('close', onClose);
          resolve(new AgentClient(sock, decoder, hello as AgentHello, socketPath, nonce));
        }
      };
      const onAbort = (): void => finish(options.signal?.reason as Error);
      let heard = false;
      const onError = (err: NodeJS.ErrnoException): void =>
        finish(
          Object.assign(
            new MicrovmError(
              'ERR_MICROVM_AGENT_UNAVAILABLE',
              `Cannot connect to the guest agent at ${socketPath}: ${err.code ?? err.message}`,
              { cause: err },
            ),
            {
              // Nothing there yet, or libkrun closed the connection under our hello (EPIPE).
              [NOT_YET]: !heard && ['ENOENT', 'ECONNREFUSED', 'ECONNRESET', 'EPIPE'].includes(err.code ?? ''),
            },
          ),
        );
      const onClose = (): void =>
        finish(
          Object.assign(
            new MicrovmError('ERR_MICROVM_AGENT_UNAVAILABLE', `The guest agent's channel closed (${socketPath})`),
            { [NOT_YET]: !heard },
          ),
        );
      const onData = (chunk: Buffer): void => {
        heard = true;
        try {
          // Until synced the decoder yields one hello at a time: look at each.
          for (let frames = decoder.push(chunk); frames.length > 0; frames = decoder.drain())
            for (const f of frames) {
              const j = jsonPayload(f);
              if (j.proto === GUEST_PROTO && j.nonce === '' && resent < 4) {
                // An agent's own hello: the one it was blocked writing until we connected, or one
                // that (re)started after our hello went to its predecessor. Say ours again; the
                // duplicate answer is ignored once synced.
                resent++;
                sock.write(helloFrame);
              }
              if (j.proto === GUEST_PROTO && j.nonce === nonce) {
                decoder.synced = true;
                finish(undefined, {
                  pid: typeof j.pid === 'number' ? j.pid : 0,
                  uptimeNs: typeof j.uptimeNs === 'number' ? j.uptimeNs : 0,
                  caps: Array.isArray(j.caps) ? j.caps.filter((c): c is string => typeof c === 'string') : [],
                });
                return;
              }
            }
        } catch (err) {
          finish(err as Error);
        }
      };
      const timer = setTimeout(
        () =>
          finish(
            new MicrovmError(
              'ERR_MICROVM_AGENT_TIMEOUT',
              `The guest agent did not answer within ${timeoutMs} ms (${socketPath}); is another process connected to it? One host process at a time can hold a VM's agent channel.`,
            ),
          ),
        timeoutMs,
      );
      if (options.signal?.aborted) return onAbort();
      options.signal?.addEventListener('abort', onAbort, { once: true });
      options.vmEnded?.then(
        () => finish(new MicrovmError('ERR_MICROVM_AGENT_UNAVAILABLE', 'The VM ended before its guest agent answered')),
        () => undefined,
      );
      sock.on('error', onError);
      sock.on('close', onClose);
      sock.on('data', onData);
      sock.on('connect', () => sock.write(helloFrame));
    });
  }

  /** Why the channel is closed, or undefined while it is open. */
  get closedReason(): Error | undefined {
    return this.#closed;
  }

  /** Starts `argv` in the guest. */
  spawn(argv: readonly string[], options: AgentSpawnOptions = {}): AgentProcess {
    const id = this.#open();
    const proc = new AgentProcess(this, id, options.stdin === true || options.tty !== undefined, WINDOW);
    this.send(
      FRAME.EXEC,
      id,
      JSON.stringify({
        argv,
        env: Object.entries(options.env ?? {}).map(([k, val]) => `${k}=${val}`),
        cwd: options.cwd ?? null,
        user: options.user ?? null,
        tty: options.tty ?? null,
        stdin: options.stdin === true,
        window: WINDOW,
      }),
    );
    return proc;
  }

  /** Starts a file operation (`op` is put, get, list, stat, mkdir, symlink, attr, rename, remove). */
  op(
    request: { op: string; path: string } & Record<string, unknown>,
    handlers?: ConstructorParameters<typeof OpStream>[3],
  ): OpStream {
    const id = this.#open();
    const stream = new OpStream(this, id, WINDOW, handlers);
    this.send(FRAME.OP, id, JSON.stringify({ ...request, window: WINDOW }));
    return stream;
  }

  /** Closes the channel (the agent ends what this client started); what is in flight fails with `reason`. */
  close(reason?: Error): void {
    this.#fatal(reason ?? new MicrovmError('ERR_MICROVM_AGENT_UNAVAILABLE', 'The agent channel was closed'));
  }

  #open(): number {
    if (this.#closed) throw this.#closed;
    const id = this.#nextId;
    this.#nextId = this.#nextId >= 0xfffffffe ? 1 : this.#nextId + 1;
    return id;
  }

  /** @internal */
  send(type: FrameType, stream: number, payload?: Buffer | string): void {
    if (!this.#closed) this.#sock.write(encodeFrame(type, stream, payload));
  }

  /** @internal */
  attach(id: number, handler: StreamHandler): void {
    if (this.#closed) queueMicrotask(() => handler.fail(this.#closed as Error));
    else {
      this.#streams.set(id, handler);
      this.#sock.ref(); // work in flight keeps this process alive; an idle channel does not
    }
  }

  /** @internal */
  detach(id: number): void {
    this.#streams.delete(id);
    if (this.#streams.size === 0) this.#sock.unref();
  }

  #receive(chunk: Buffer): void {
    if (this.#closed) return;
    try {
      for (const f of this.#decoder.push(chunk)) this.#dispatch(f);
    } catch (err) {
      this.#fatal(err as Error);
    }
  }

  #dispatch(f: Frame): void {
    if (f.type === FRAME.HELLO) {
      // Another answer to our own hello (we said it twice) is harmless; anything else means the
      // agent started over and what ran on this channel is gone.
      if (jsonPayload(f).nonce === this.#nonce) return;
      throw protocolError('the agent restarted (a hello in mid-session)');
    }
    const handler = this.#streams.get(f.stream);
    if (!handler) throw protocolError(`a frame for stream ${f.stream}, which is not open`);
    handler.frame(f);
  }

  #fatal(err: Error): void {
    if (this.#closed) return;
    this.#closed = err;
    this.#sock.destroy();
    const handlers = [...this.#streams.values()];
    this.#streams.clear();
    for (const h of handlers) h.fail(err);
    this.emit('close', err);
  }
}
