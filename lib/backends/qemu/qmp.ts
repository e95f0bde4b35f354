/**
 * A minimal QMP (QEMU Machine Protocol) client: newline-delimited JSON over QEMU's unix socket.
 * The backend uses it to watch the hypervisor for its whole life (events STOP, GUEST_PANICKED,
 * SHUTDOWN; `query-status`), which process exit alone cannot show: a KVM emulation failure pauses
 * the guest and QEMU stays alive.
 *
 * Written here rather than taken from npm: the QMP packages there are unmaintained or pull in
 * much more than the three messages we need; this one caps every input line and every wait.
 */
import { EventEmitter } from 'node:events';
import * as net from 'node:net';
import { MicrovmError } from '../../errors';

/** Longest QMP line accepted (QEMU's replies here are a few hundred bytes). */
const MAX_LINE = 1024 * 1024;

/** An asynchronous QMP event. */
export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
}

interface Pending {
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
}

/** A connected QMP session (capabilities negotiated). Emits 'event' (QmpEvent) and 'close'. */
export class QmpClient extends EventEmitter {
  readonly #socket: net.Socket;
  readonly #pending: Pending[] = [];
  #buffer = '';
  #closed = false;

  private constructor(socket: net.Socket) {
    super();
    this.#socket = socket;
  }

  /** Connects to `socketPath`, reads the greeting and negotiates capabilities within `timeoutMs`. */
  static async connect(socketPath: string, timeoutMs = 5000): Promise<QmpClient> {
    const socket = net.createConnection(socketPath);
    const client = new QmpClient(socket);
    socket.setEncoding('utf8');
    let onGreeting: (() => void) | undefined;
    const greeted = new Promise<void>((resolve) => (onGreeting = resolve));
    let greetingSeen = false;
    socket.on('data', (chunk: string) =>
      client.#onData(chunk, () => {
        if (!greetingSeen) {
          greetingSeen = true;
          onGreeting?.();
          return true;
        }
        return false;
      }),
    );
    const failed = new Promise<never>((_, reject) => {
      socket.once('error', (err) => reject(err));
      socket.once('close', () => reject(new Error('QMP socket closed')));
    });
    failed.catch(() => undefined);
    socket.on('error', () => undefined);
    socket.on('close', () => client.#onClose());
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no QMP greeting within ${timeoutMs} ms`)), timeoutMs);
    });
    try {
      await Promise.race([greeted, failed, timeout]);
      await Promise.race([client.execute('qmp_capabilities'), failed, timeout]);
    } catch (err) {
      socket.destroy();
      throw new MicrovmError('ERR_MICROVM_QMP', `Cannot talk QMP on ${socketPath}: ${(err as Error).message}`, {
        cause: err,
      });
    } finally {
      clearTimeout(timer);
    }
    return client;
  }

  #onData(chunk: string, greeting: () => boolean): void {
    this.#buffer += chunk;
    if (this.#buffer.length > MAX_LINE && !this.#buffer.includes('\n')) {
      this.#socket.destroy(new Error('QMP line too long'));
      return;
    }
    let nl: number;
    while ((nl = this.#buffer.indexOf('\n')) >= 0) {
      const line = this.#buffer.slice(0, nl).trim();
      this.#buffer = this.#buffer.slice(nl + 1);
      if (!line) continue;
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue;
      }
      if (typeof msg !== 'object' || msg === null) continue;
      if ('QMP' in msg && greeting()) continue;
      if (typeof msg.event === 'string') {
        this.emit('event', {
          event: msg.event,
          data: msg.data as Record<string, unknown> | undefined,
        } satisfies QmpEvent);
      } else if ('return' in msg || 'error' in msg) {
        const p = this.#pending.shift();
        if (!p) continue;
        if ('error' in msg) {
          const e = msg.error as { class?: string; desc?: string } | undefined;
          p.reject(new Error(`${e?.class ?? 'QMP error'}: ${e?.desc ?? ''}`));
        } else p.resolve(msg.return);
      }
    }
  }

  #onClose(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const p of this.#pending.splice(0)) p.reject(new Error('QMP socket closed'));
    this.emit('close');
  }

  /** Sends a command and resolves with its `return` value. */
  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.#closed) return Promise.reject(new Error('QMP socket closed'));
    return new Promise((resolve, reject) => {
      this.#pending.push({ resolve, reject });
      this.#socket.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
    });
  }

  /** Lets the process exit while this connection is open. */
  unref(): void {
    this.#socket.unref();
  }

  /** Closes the connection. */
  close(): void {
    this.#socket.destroy();
  }
}
