/**
 * The host end of the guest agent's channel (lib/agent/protocol.ts, native/guest/agent.cc):
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
  protocolError,
  WINDOW,
} from './protocol';
import { AgentProcess, OpStream, type StreamChannel, type StreamHandler } from './streams';

export { type AgentExit, AgentProcess, GuestError, KILL_GRACE_MS, OpStream } from './streams';

/** What the agent said when the channel opened. */
export interface AgentHello {
  /** The agent's PID in the guest. */
  pid: number;
  /** The guest's CLOCK_MONOTONIC when it answered (ns since its kernel started timekeeping). */
  uptimeNs: number;
  caps: string[];
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

/** Marks a connection attempt that failed because nothing listened yet. */
const NOT_YET = Symbol('microvm.agent.notYet');

/** A connected agent channel. One host process at a time may hold a VM's channel. */
export class AgentClient extends EventEmitter<{ close: [Error] }> implements StreamChannel {
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
