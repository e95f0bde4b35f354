/**
 * One stream of the agent channel, host side: a guest process ({@link AgentProcess}) or a file
 * transfer ({@link OpStream}), with the credit the guest has on it and the window this side may
 * send into. What the guest sends is counted against the credit it was given; overdrawing it ends
 * the channel (lib/agent/client.ts says how).
 */

import { EventEmitter } from 'node:events';

import * as os from 'node:os';
import { Readable, Writable } from 'node:stream';
import { MicrovmError } from '../errors';
import { FRAME, type Frame, type FrameType, jsonPayload, MAX_PAYLOAD, protocolError, WINDOW } from './protocol';

/** What a stream needs of its channel (an {@link AgentClient}). */
export interface StreamChannel {
  send(type: FrameType, stream: number, payload?: Buffer | string): void;
  attach(id: number, handler: StreamHandler): void;
  detach(id: number): void;
  close(reason?: Error): void;
}

/** How a guest process ended: its exit code, or the signal that killed it. */
export interface AgentExit {
  exitCode: number | null;
  signal: NodeJS.Signals | null;
}

/**
 * How long the agent has to end a stream after this side killed or cancelled it (SIGKILL to the
 * guest process, a cancelled transfer) before the channel is closed: the agent is guest code, and a
 * guest that never answers must not keep a host wait open.
 */
export const KILL_GRACE_MS = 2000;

const SIGNALS = new Map(Object.entries(os.constants.signals).map(([name, n]) => [n, name as NodeJS.Signals]));

export interface StreamHandler {
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
    private readonly client: StreamChannel,
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
  #client: StreamChannel;
  #id: number;
  #credit = new Credit();
  #blocked = { out: false, err: false };
  #ended = false;
  #out: Outbox;

  /** @internal */
  constructor(client: StreamChannel, id: number, withStdin: boolean, hostWindow: number) {
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
  #client: StreamChannel;
  #id: number;
  #credit = new Credit();
  #out: Outbox;
  #ended = false;
  #queue: Promise<void> = Promise.resolve();
  #local: Error | undefined;
  #deadline: NodeJS.Timeout | undefined;

  /** @internal */
  constructor(
    client: StreamChannel,
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
