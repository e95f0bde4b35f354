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
