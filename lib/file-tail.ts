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
