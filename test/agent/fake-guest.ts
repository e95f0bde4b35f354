/**
 * A FAKE GUEST AGENT (a TEST DOUBLE): the guest's end of the agent channel over a unix socket in
 * this process, for tests of the host side that need a guest to lie, flood or answer on cue. The
 * real agent is tested on real QEMU boots (test/e2e/agent.test.ts).
 */
import * as net from 'node:net';
import { FRAME, GUEST_PROTO, HEADER_BYTES } from '../../lib/agent/protocol';

export interface HostFrame {
  type: number;
  stream: number;
  payload: Buffer;
}

/** The fake guest's end of one connection. */
export class FakeGuest {
  frames: HostFrame[] = [];
  #buf = Buffer.alloc(0);
  #waiters: Array<() => void> = [];
  constructor(readonly sock: net.Socket) {
    sock.on('data', (d: Buffer) => {
      this.#buf = Buffer.concat([this.#buf, d]);
      while (this.#buf.length >= HEADER_BYTES) {
        const len = this.#buf.readUInt32BE(0);
        if (this.#buf.length < HEADER_BYTES + len) break;
        this.frames.push({
          type: this.#buf[4],
          stream: this.#buf.readUInt32BE(5),
          payload: this.#buf.subarray(HEADER_BYTES, HEADER_BYTES + len),
        });
        this.#buf = this.#buf.subarray(HEADER_BYTES + len);
      }
      for (const w of this.#waiters.splice(0)) w();
    });
    sock.on('error', () => undefined);
  }
  send(type: number, stream: number, payload: Buffer | string = Buffer.alloc(0)): void {
    const body = typeof payload === 'string' ? Buffer.from(payload) : payload;
    const head = Buffer.alloc(HEADER_BYTES);
    head.writeUInt32BE(body.length, 0);
    head[4] = type;
    head.writeUInt32BE(stream, 5);
    this.sock.write(Buffer.concat([head, body]));
  }
  /** The next host frame of `type` (waits for it). */
  async next(type: number): Promise<HostFrame> {
    for (;;) {
      const i = this.frames.findIndex((f) => f.type === type);
      if (i >= 0) return this.frames.splice(i, 1)[0];
      await new Promise<void>((r) => this.#waiters.push(r));
    }
  }
  granted(stream: number): number {
    return this.frames
      .filter((f) => f.type === FRAME.GRANT && f.stream === stream)
      .reduce((n, f) => n + f.payload.readUInt32BE(0), 0);
  }
}

/**
 * A fake agent listening on `socketPath`: it answers each host's hello (with its nonce) and hands
 * every connection to `onGuest`. `close()` ends it and its connections.
 */
export async function fakeAgent(
  socketPath: string,
  onGuest: (g: FakeGuest) => void = () => undefined,
): Promise<{ guests: FakeGuest[]; close: () => Promise<void> }> {
  const guests: FakeGuest[] = [];
  const server = net.createServer((sock) => {
    const g = new FakeGuest(sock);
    guests.push(g);
    void g.next(FRAME.HELLO).then((h) => {
      const { nonce } = JSON.parse(h.payload.toString()) as { nonce: string };
      g.send(
        FRAME.HELLO,
        0,
        JSON.stringify({ proto: GUEST_PROTO, nonce, pid: 2, uptimeNs: 5e8, caps: ['exec', 'files'] }),
      );
      onGuest(g);
    });
  });
  await new Promise<void>((r) => server.listen(socketPath, r));
  return {
    guests,
    close: async () => {
      for (const g of guests) g.sock.destroy();
      await new Promise((r) => server.close(r));
    },
  };
}
