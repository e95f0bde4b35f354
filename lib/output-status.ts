/**
 * What became of a VM's output (QEMU backend): its output ports go through a sink on the host
 * (native/runner/runner.cc `--log-sink`) that bounds each file and reports, per stream, in the VM's
 * `output-status` file: the bytes written, and whether the rest was cut at the limit
 * (`truncated`, a marker line ends the file) or lost because the disk refused it (`lost`).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

export const OUTPUT_STATUS_FILE = 'output-status';
/** `logMaxBytes`' default: the most each of console, stdout and stderr keeps (64 MiB). */
export const DEFAULT_LOG_MAX_BYTES = 64 * 2 ** 20;

export type OutputStream = 'console' | 'stdout' | 'stderr' | 'exit' | 'times';

export interface StreamStatus {
  /** Bytes written to the file. */
  bytes: number;
  /** 'ok'; 'truncated': the limit was reached; 'lost': the disk refused a write (full, quota). */
  state: 'ok' | 'truncated' | 'lost';
  /** Bytes the guest sent that are not in the file. */
  discardedBytes: number;
}

const STREAMS = new Set<string>(['console', 'stdout', 'stderr', 'exit', 'times']);

/** The sink's report for the VM directory `dir`; undefined when there is none (libkrun, older VMs). */
export function readOutputStatus(dir: string): Partial<Record<OutputStream, StreamStatus>> | undefined {
  return readReport(dir)?.streams;
}

/** The report as written: the sink's pid, the streams, and whether it has finished. */
function readReport(
  dir: string,
): { pid: number; ended: boolean; streams: Partial<Record<OutputStream, StreamStatus>> } | undefined {
  let text: string;
  try {
    const fd = fs.openSync(path.join(dir, OUTPUT_STATUS_FILE), fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
    try {
      const buf = Buffer.alloc(4096);
      text = buf.subarray(0, fs.readSync(fd, buf, 0, buf.length, 0)).toString('latin1');
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return undefined;
  }
  const out: Partial<Record<OutputStream, StreamStatus>> = {};
  const lines = text.split('\n').map((l) => l.trim());
  const pid = Number(/^pid (\d{1,10})$/.exec(lines[0] ?? '')?.[1] ?? 0);
  for (const line of lines) {
    const m = /^(\w+) (\d{1,16}) (ok|truncated|lost) (\d{1,16})$/.exec(line.trim());
    if (m && STREAMS.has(m[1]))
      out[m[1] as OutputStream] = {
        bytes: Number(m[2]),
        state: m[3] as StreamStatus['state'],
        discardedBytes: Number(m[4]),
      };
  }
  return { pid, ended: lines.includes('end'), streams: out };
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return !/^\d+ \(.*\) Z/.test(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

/**
 * Waits (at most `timeoutMs`) until the sink of the VM directory `dir` has written everything the
 * VMM sent before it exited and is gone (its report says "end" just before it exits). Called once the VMM exited, so
 * that the output files are complete when the VM's end is reported.
 */
export async function sinkFinished(dir: string, timeoutMs = 2000): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const r = readReport(dir);
    // Gone, not only "end": it exits right after, and nothing of the VM should be left running.
    if (!r || !r.pid || !alive(r.pid) || Date.now() >= until) return;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
