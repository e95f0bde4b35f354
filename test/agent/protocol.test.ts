/** The agent's frame codec: exact bytes, strict checks, resync, and a fuzz of the decoder. */
import { randomBytes } from 'node:crypto';
import {
  encodeFrame,
  FRAME,
  FrameDecoder,
  GUEST_PROTO,
  HEADER_BYTES,
  jsonPayload,
  MAX_PAYLOAD,
} from '../../lib/agent/protocol';

const hello = (nonce: string): Buffer =>
  encodeFrame(FRAME.HELLO, 0, JSON.stringify({ proto: GUEST_PROTO, nonce, pid: 7, uptimeNs: 1 }));

function synced(): FrameDecoder {
  const d = new FrameDecoder();
  const [h] = d.push(hello('n'));
  expect(h.type).toBe(FRAME.HELLO);
  d.synced = true;
  return d;
}

describe('encodeFrame', () => {
  test('writes length, type and stream id big-endian before the payload', () => {
    expect([...encodeFrame(FRAME.STDOUT, 0x01020304, Buffer.from('hi'))]).toEqual([
      0, 0, 0, 2, 5, 1, 2, 3, 4, 0x68, 0x69,
    ]);
    expect(encodeFrame(FRAME.EOF, 1).length).toBe(HEADER_BYTES);
  });

  test('refuses a payload over the cap', () => {
    expect(() => encodeFrame(FRAME.DATA, 1, Buffer.alloc(MAX_PAYLOAD + 1))).toThrow(RangeError);
    expect(encodeFrame(FRAME.DATA, 1, Buffer.alloc(MAX_PAYLOAD)).length).toBe(HEADER_BYTES + MAX_PAYLOAD);
  });
});

describe('FrameDecoder', () => {
  test('reassembles frames split at every byte', () => {
    const d = synced();
    const bytes = Buffer.concat([encodeFrame(FRAME.STDOUT, 3, 'abc'), encodeFrame(FRAME.EXIT, 3, '{"code":0}')]);
    const got = [];
    for (const b of bytes) got.push(...d.push(Buffer.from([b])));
    expect(got.map((f) => [f.type, f.stream, f.payload.toString()])).toEqual([
      [FRAME.STDOUT, 3, 'abc'],
      [FRAME.EXIT, 3, '{"code":0}'],
    ]);
  });

  test('an unknown type or an oversized length is ERR_MICROVM_AGENT_PROTOCOL before any payload is buffered', () => {
    const bad = Buffer.from([0, 0, 0, 1, 99, 0, 0, 0, 1]);
    expect(() => synced().push(bad)).toThrow(expect.objectContaining({ code: 'ERR_MICROVM_AGENT_PROTOCOL' }));
    const huge = Buffer.from([0xff, 0xff, 0xff, 0xff, FRAME.STDOUT, 0, 0, 0, 1]);
    expect(() => synced().push(huge)).toThrow(/4294967295 bytes/);
    // a host-only type from the guest
    expect(() => synced().push(encodeFrame(FRAME.EXEC, 1, '{}'))).toThrow(/unknown frame type 2/);
  });

  test('before the hello, anything else is skipped (a previous host left half a frame)', () => {
    const d = new FrameDecoder();
    const junk = Buffer.concat([randomBytes(100), encodeFrame(FRAME.STDOUT, 9, 'old'), Buffer.from('{"proto":"x"')]);
    const frames = d.push(Buffer.concat([junk, hello('abc'), encodeFrame(FRAME.STDOUT, 1, 'new')]));
    expect(frames).toHaveLength(1);
    expect(jsonPayload(frames[0]).nonce).toBe('abc');
    d.synced = true;
    expect(d.drain().map((f) => f.payload.toString())).toEqual(['new']);
  });

  test('gives up when no hello comes in the first MiB', () => {
    const d = new FrameDecoder();
    expect(() => {
      for (let i = 0; i < 20; i++) d.push(Buffer.alloc(64 * 1024, 0x41));
    }).toThrow(expect.objectContaining({ code: 'ERR_MICROVM_AGENT_PROTOCOL' }));
  });

  test('jsonPayload refuses malformed JSON and non-objects', () => {
    expect(() => jsonPayload({ type: FRAME.EXIT, stream: 1, payload: Buffer.from('{') })).toThrow(/malformed JSON/);
    expect(() => jsonPayload({ type: FRAME.EXIT, stream: 1, payload: Buffer.from('[1]') })).toThrow(/not an object/);
  });

  test('fuzz: random and mutated streams end in frames or ERR_MICROVM_AGENT_PROTOCOL, never anything else', () => {
    const valid = Buffer.concat([
      encodeFrame(FRAME.STDOUT, 1, randomBytes(300)),
      encodeFrame(FRAME.GRANT, 1, Buffer.from([0, 0, 1, 0])),
      encodeFrame(FRAME.EXIT, 1, '{"code":1}'),
    ]);
    let protocolErrors = 0;
    let framesSeen = 0;
    for (let i = 0; i < 3000; i++) {
      const d = synced();
      const input = Buffer.from(i % 2 ? randomBytes(1 + (i % 500)) : valid);
      if (i % 2 === 0)
        for (let k = 0; k < 1 + (i % 4); k++) input[(i * 7919 + k * 104729) % input.length] ^= 1 << (k % 8);
      try {
        let off = 0;
        while (off < input.length) {
          const n = 1 + ((i + off) % 97);
          for (const f of d.push(input.subarray(off, off + n))) {
            framesSeen++;
            expect(f.payload.length).toBeLessThanOrEqual(MAX_PAYLOAD);
          }
          off += n;
        }
      } catch (err) {
        expect((err as { code?: string }).code).toBe('ERR_MICROVM_AGENT_PROTOCOL');
        protocolErrors++;
      }
    }
    // Both outcomes happen: the fuzz reaches the checks and the happy path.
    expect(protocolErrors).toBeGreaterThan(1000);
    expect(framesSeen).toBeGreaterThan(100);
  });
});
