/**
 * The guest agent's wire format (docs/agent-protocol.md; the guest side is native/guest/agent.cc).
 *
 * A frame is a 9-byte header — u32 payload length, u8 type, u32 stream id, big-endian — and at most
 * {@link MAX_PAYLOAD} bytes of payload. Everything the guest sends is hostile input: the decoder
 * checks every header before it buffers a byte of payload, so it never holds more than one frame.
 */
import { MicrovmError } from '../errors';

export const FRAME = {
  HELLO: 1,
  EXEC: 2,
  DATA: 3,
  EOF: 4,
  STDOUT: 5,
  STDERR: 6,
  EXIT: 7,
  SIGNAL: 8,
  RESIZE: 9,
  GRANT: 10,
  ERROR: 11,
  OP: 12,
  INFO: 13,
} as const;

export type FrameType = (typeof FRAME)[keyof typeof FRAME];

/** Frame types the guest may send. */
const GUEST_TYPES = new Set<number>([
  FRAME.HELLO,
  FRAME.STDOUT,
  FRAME.STDERR,
  FRAME.EXIT,
  FRAME.GRANT,
  FRAME.ERROR,
  FRAME.INFO,
]);

export const HEADER_BYTES = 9;
/** The largest payload either side sends or accepts. */
export const MAX_PAYLOAD = 65536;
/** Bytes either side may send on a stream before the other grants more. */
export const WINDOW = 256 * 1024;
export const HOST_PROTO = 'microvm-host/1';
export const GUEST_PROTO = 'microvm-agent/1';
/** Every guest hello's payload starts with these bytes; the decoder looks for them to (re)sync. */
const GUEST_MARKER = Buffer.from(`{"proto":"${GUEST_PROTO}"`);
/** How much the decoder skips while looking for a hello before it gives up. */
const MAX_SYNC_SKIP = 1 << 20;

export interface Frame {
  type: FrameType;
  stream: number;
  payload: Buffer;
}

export function protocolError(message: string): MicrovmError {
  return new MicrovmError('ERR_MICROVM_AGENT_PROTOCOL', `The guest agent broke the protocol: ${message}`);
}

/** One frame, ready to write. */
export function encodeFrame(type: FrameType, stream: number, payload: Buffer | string = Buffer.alloc(0)): Buffer {
  const body = typeof payload === 'string' ? Buffer.from(payload) : payload;
  if (body.length > MAX_PAYLOAD) throw new RangeError(`frame payload of ${body.length} bytes exceeds ${MAX_PAYLOAD}`);
  const head = Buffer.allocUnsafe(HEADER_BYTES);
  head.writeUInt32BE(body.length, 0);
  head.writeUInt8(type, 4);
  head.writeUInt32BE(stream >>> 0, 5);
  return Buffer.concat([head, body]);
}

/**
 * Splits the guest's byte stream into frames. Until {@link FrameDecoder.synced} is set it only
 * looks for hello frames (skipping whatever a previous host left half-read on the port); after,
 * any header that is not a guest frame type or announces more than MAX_PAYLOAD bytes is a
 * protocol error (thrown as ERR_MICROVM_AGENT_PROTOCOL).
 */
export class FrameDecoder {
  synced = false;
  #buf: Buffer = Buffer.alloc(0);
  #skipped = 0;

  push(chunk: Buffer): Frame[] {
    this.#buf = this.#buf.length ? Buffer.concat([this.#buf, chunk]) : chunk;
    const out: Frame[] = [];
    for (;;) {
      if (!this.synced && !this.#seekHello()) break;
      if (this.#buf.length < HEADER_BYTES) break;
      const len = this.#buf.readUInt32BE(0);
      const type = this.#buf.readUInt8(4);
      if (!this.synced && (type !== FRAME.HELLO || len > MAX_PAYLOAD)) {
        this.#skip(1);
        continue;
      }
      if (!GUEST_TYPES.has(type)) throw protocolError(`unknown frame type ${type}`);
      if (len > MAX_PAYLOAD) throw protocolError(`a frame of ${len} bytes (at most ${MAX_PAYLOAD})`);
      if (this.#buf.length < HEADER_BYTES + len) break;
      const stream = this.#buf.readUInt32BE(5);
      const payload = Buffer.from(this.#buf.subarray(HEADER_BYTES, HEADER_BYTES + len));
      this.#buf = this.#buf.subarray(HEADER_BYTES + len);
      out.push({ type: type as FrameType, stream, payload });
      // Not synced yet: the caller checks this hello (its nonce) and sets `synced`; later frames
      // in this chunk wait for that decision.
      if (!this.synced) break;
    }
    return out;
  }

  /** Frames decoded from what is already buffered (after `synced` changed). */
  drain(): Frame[] {
    return this.push(Buffer.alloc(0));
  }

  /** Moves to the next candidate hello header; false when more bytes are needed. */
  #seekHello(): boolean {
    const at = this.#buf.indexOf(GUEST_MARKER, HEADER_BYTES);
    if (at < 0) {
      const keep = GUEST_MARKER.length + HEADER_BYTES;
      if (this.#buf.length > keep) this.#skip(this.#buf.length - keep);
      return false;
    }
    if (at > HEADER_BYTES) this.#skip(at - HEADER_BYTES);
    return true;
  }

  #skip(n: number): void {
    this.#skipped += n;
    this.#buf = this.#buf.subarray(n);
    if (this.#skipped > MAX_SYNC_SKIP) throw protocolError(`no hello in the first ${MAX_SYNC_SKIP} bytes`);
  }
}

/** Parses a JSON payload from the guest: an object, or a protocol error. */
export function jsonPayload(frame: Frame): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(frame.payload.toString('utf8'));
  } catch {
    throw protocolError(`frame type ${frame.type} carries malformed JSON`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw protocolError(`frame type ${frame.type} carries JSON that is not an object`);
  return value as Record<string, unknown>;
}
