/** Bounded reads of the end of a log file (logs can be large and are written by the guest side). */
import * as fs from 'node:fs';

/**
 * The last `max` bytes of `file`, read from the end only; undefined when it cannot be opened
 * (absent, or a symlink: never followed).
 */
export function readTail(file: string, max: number): Buffer | undefined {
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  } catch {
    return undefined;
  }
  try {
    const size = fs.fstatSync(fd).size;
    const buf = Buffer.alloc(Math.min(max, size));
    const n = fs.readSync(fd, buf, 0, buf.length, size - buf.length);
    return buf.subarray(0, n);
  } catch {
    return undefined;
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Hands what was appended to `file` since `offset` (at most `max` bytes) to `sink`; returns the new
 * offset. A file not there yet is no error: the offset stays.
 */
export function readAppended(file: string, offset: number, sink: (buf: Buffer) => void, max = Infinity): number {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch {
    return offset; // not there yet
  }
  try {
    const size = fs.fstatSync(fd).size;
    if (size <= offset) return offset;
    const buf = Buffer.alloc(Math.min(size - offset, max));
    const n = fs.readSync(fd, buf, 0, buf.length, offset);
    sink(buf.subarray(0, n));
    return offset + n;
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Copies what was appended to `file` since `offset` to `out`, in pieces of at most `chunk` bytes,
 * waiting for `out` to drain whenever it asks to: constant memory whatever the file's size (a log
 * can be gigabytes). Resolves with the new offset; a file not there yet is no error.
 */
export async function copyAppended(
  file: string,
  offset: number,
  out: NodeJS.WritableStream,
  chunk = 1 << 20,
): Promise<number> {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch {
    return offset;
  }
  try {
    const buf = Buffer.alloc(chunk);
    for (;;) {
      const n = fs.readSync(fd, buf, 0, buf.length, offset);
      if (n === 0) return offset;
      offset += n;
      // A copy: `out` may hold the piece until it is written.
      if (!out.write(Buffer.from(buf.subarray(0, n)))) await new Promise((r) => out.once('drain', r));
    }
  } finally {
    fs.closeSync(fd);
  }
}
