/**
 * When the guest command's output arrived, for `microvm logs --since`.
 *
 * On the QEMU backend the guest init relays the command's stdout and stderr and, for each chunk it
 * copies, writes "<1|2> <offset> <ns>\n" to the port "microvm.logtimes" (the file OUTPUT_TIMES_FILE
 * in the VM's directory): the stream (1 stdout, 2 stderr), where the chunk starts in that stream's
 * log, and the guest's CLOCK_MONOTONIC when it arrived. The host maps the guest clock to epoch
 * milliseconds with GUEST_CLOCK_FILE, written when the init says UP (the mapping of
 * lib/telemetry/guest.ts). Chunk times: lines written together share one. The mapping is late by
 * however long the host took to read UP, and a chunk's time is when the init took it: times come
 * out late, never early, so --since may show output from just before T and never leaves out any
 * that came after it.
 *
 * Both files come from the guest side and are read as hostile: lines that do not parse, offsets
 * that go backwards or past the log's end are skipped, and the index is read in bounded pieces.
 */
import * as fs from 'node:fs';
import { parseMilestones } from './telemetry/guest';

export const OUTPUT_TIMES_FILE = 'output-times';
export const GUEST_CLOCK_FILE = 'guest-clock.json';

/**
 * Writes GUEST_CLOCK_FILE ({ zeroEpochMs }: the epoch time of the guest's CLOCK_MONOTONIC 0) once
 * the exit port's text has the "mounts" milestone; `upSeenAt` is performance.now() when UP was
 * read. Returns whether it was written (it is tried again on the next read otherwise).
 */
export function writeGuestClock(file: string, exitPortText: string, upSeenAt: number): boolean {
  const mounts = parseMilestones(exitPortText).mounts;
  if (mounts === undefined) return false;
  const zeroEpochMs = Date.now() - performance.now() + upSeenAt - mounts / 1e6;
  const tmp = `${file}.tmp`;
  try {
    fs.writeFileSync(tmp, `${JSON.stringify({ zeroEpochMs })}\n`, { mode: 0o600 });
    fs.renameSync(tmp, file);
  } catch {
    fs.rmSync(tmp, { force: true });
  }
  return true;
}

/** The epoch time of the guest's clock 0, or undefined when the file is missing or malformed. */
export function readGuestClock(file: string): number | undefined {
  try {
    const st = fs.lstatSync(file);
    if (!st.isFile() || st.size > 4096) return undefined;
    const v = (JSON.parse(fs.readFileSync(file, 'utf8')) as { zeroEpochMs?: unknown }).zeroEpochMs;
    return typeof v === 'number' && Number.isFinite(v) && v > 0 ? v : undefined;
  } catch {
    return undefined;
  }
}

const LINE = /^([12]) (\d{1,15}) (\d{1,19})$/;

/**
 * The init notes a chunk's time at most every NOTE_EVERY_MS per stream (native/guest/init.cc): a
 * chunk without a note arrived less than that after the last note.
 */
export const NOTE_EVERY_MS = 10;

/**
 * For each stream (index 0 stdout, 1 stderr), the offset in its log where the output that arrived at
 * or after `sinceMs` (epoch ms) starts: the first note at or after `sinceMs - NOTE_EVERY_MS`, so
 * nothing that recent is left out (up to NOTE_EVERY_MS of earlier output may be in). A stream with
 * no such note gets `sizes[i]`. `sizes`: the logs' current sizes, which no offset may pass.
 */
export function offsetsSince(
  timesFile: string,
  zeroEpochMs: number,
  sinceMs: number,
  sizes: [number, number],
): [number, number] {
  const found: [number | undefined, number | undefined] = [undefined, undefined];
  const last = [-1, -1];
  let fd: number;
  try {
    fd = fs.openSync(timesFile, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  } catch {
    return [...sizes];
  }
  try {
    const buf = Buffer.alloc(1 << 20);
    let pos = 0;
    let carry = '';
    for (;;) {
      const n = fs.readSync(fd, buf, 0, buf.length, pos);
      if (n === 0) break;
      pos += n;
      const lines = (carry + buf.toString('latin1', 0, n)).split('\n');
      carry = lines.pop() ?? '';
      if (carry.length > 64) carry = ''; // no valid line is that long
      for (const line of lines) {
        const m = LINE.exec(line);
        if (!m) continue;
        const s = Number(m[1]) - 1;
        const offset = Number(m[2]);
        // Out of order or past the log: not something the init wrote; skip it.
        if (found[s] !== undefined || offset <= last[s] || offset >= sizes[s]) continue;
        last[s] = offset;
        if (zeroEpochMs + Number(m[3]) / 1e6 >= sinceMs - NOTE_EVERY_MS) found[s] = offset;
      }
      if (found[0] !== undefined && found[1] !== undefined) break;
    }
  } finally {
    fs.closeSync(fd);
  }
  return [found[0] ?? sizes[0], found[1] ?? sizes[1]];
}

/**
 * The offset of the first line of an egress log (one JSON object per line, with an ISO `time`) at
 * or after `sinceMs`; the file's size when there is none.
 */
export function jsonLinesOffsetSince(file: string, sinceMs: number): number {
  let text: Buffer;
  try {
    text = fs.readFileSync(file);
  } catch {
    return 0;
  }
  let start = 0;
  while (start < text.length) {
    let end = text.indexOf(0x0a, start);
    if (end < 0) end = text.length;
    try {
      const t = Date.parse((JSON.parse(text.toString('utf8', start, end)) as { time?: string }).time ?? '');
      if (t >= sinceMs) return start;
    } catch {
      /* not a line the relays wrote: skip it */
    }
    start = end + 1;
  }
  return text.length;
}

const UNIT_MS: Record<string, number> = { ms: 1, s: 1e3, m: 60e3, h: 3600e3 };

/**
 * A `--since` value as epoch milliseconds: an RFC 3339 / ISO 8601 time ("2026-12-03T14:00:00Z"), a
 * Unix time in seconds ("1764770400", fractions allowed), or a duration back from `now` ("90s",
 * "10m", "1h30m", "250ms"). Undefined when it is none of these.
 */
export function parseSince(value: string, now = Date.now()): number | undefined {
  if (/^\d+(\.\d+)?$/.test(value)) return Number(value) * 1000;
  if (/^(\d+(\.\d+)?(ms|s|m|h))+$/.test(value)) {
    let ms = 0;
    for (const m of value.matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h)/g)) ms += Number(m[1]) * UNIT_MS[m[2]];
    return now - ms;
  }
  if (!/^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?$/.test(value)) return undefined;
  const t = Date.parse(value);
  return Number.isNaN(t) ? undefined : t;
}
