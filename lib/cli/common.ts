/** What the CLI's commands share: argument parsing, coded errors, tables, VM directories. */
import { VM_NAME, vmDir as vmDirOf, vmsDir } from '../vm-dir';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { type CollectedSpan } from '../telemetry/collector';
import { readExitPort } from '../backends/qemu';
import type { MicrovmErrorCode } from '../errors/codes';

export class UsageError extends Error {
  readonly code = 'ERR_MICROVM_USAGE';
}

type ParseConfig = {
  args: string[];
  options: Record<string, { type: 'string' | 'boolean'; short?: string; multiple?: boolean }>;
  allowPositionals: true;
};

/**
 * parseArgs (strict), and an option that takes one value given twice (`--name a --name b`) is a
 * usage error rather than the last one silently winning.
 */
export function parseStrict<T extends ParseConfig>(
  config: T,
): ReturnType<typeof parseArgs<T & { strict: true; tokens: true }>> {
  const r = parseArgs({ ...config, strict: true as const, tokens: true as const });
  const seen = new Set<string>();
  for (const t of r.tokens ?? []) {
    if (t.kind !== 'option' || config.options[t.name]?.multiple) continue;
    if (seen.has(t.name)) throw new UsageError(`--${t.name} was given twice`);
    seen.add(t.name);
  }
  return r;
}

/** Options every command takes, when given before the command (`microvm --data-dir X ps`). */
const LEADING_GLOBALS = new Set(['--data-dir', '--json']);

/** argv with global options given before the command moved after it. */
export function commandFirst(argv: string[]): string[] {
  const globals: string[] = [];
  let i = 0;
  while (i < argv.length && argv[i].startsWith('--')) {
    const name = argv[i].split('=')[0];
    if (!LEADING_GLOBALS.has(name)) break;
    const takesValue = name === '--data-dir' && !argv[i].includes('=');
    globals.push(...argv.slice(i, i + (takesValue ? 2 : 1)));
    i += takesValue ? 2 : 1;
  }
  return i < argv.length ? [argv[i], ...globals, ...argv.slice(i + 1)] : argv;
}

/** The code a usage error prints: node:util's ERR_PARSE_ARGS_* as it is, else ERR_MICROVM_USAGE. */
export function usageCode(err: unknown): string {
  const c = (err as { code?: unknown }).code;
  return typeof c === 'string' && c.startsWith('ERR_PARSE_ARGS') ? c : 'ERR_MICROVM_USAGE';
}

/** An Error with a code (the CLI's own conditions). */
export function coded(code: MicrovmErrorCode, message: string): Error & { code: MicrovmErrorCode } {
  return Object.assign(new Error(message), { code });
}

/** Columns padded to their widest cell, under a header line; no trailing spaces. */
export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  return [header, ...rows]
    .map((r) =>
      r
        .map((c, i) => c.padEnd(widths[i]))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

/** VM names in the data dir, sorted. */
export function vmNames(dataDir: string): string[] {
  const dir = vmsDir(dataDir);
  return fs.existsSync(dir) ? fs.readdirSync(dir).sort() : [];
}

/** The offset in `file` where its last `lines` lines start (reads from the end only). */
export function tailOffset(file: string, lines: number): number {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch {
    return 0;
  }
  try {
    const size = fs.fstatSync(fd).size;
    if (lines === 0) return size;
    const chunk = Buffer.alloc(64 * 1024);
    let pos = size;
    let seen = 0;
    while (pos > 0) {
      const n = Math.min(chunk.length, pos);
      pos -= n;
      fs.readSync(fd, chunk, 0, n, pos);
      for (let i = n - 1; i >= 0; i--) {
        // The newline at the very end closes the last line; it does not start another.
        if (chunk[i] !== 0x0a || pos + i === size - 1) continue;
        if (++seen === lines) return pos + i + 1;
      }
    }
    return 0;
  } finally {
    fs.closeSync(fd);
  }
}

export function spansJson(spans: readonly CollectedSpan[]): unknown[] {
  const t = (h: [number, number]): number => h[0] * 1e3 + h[1] / 1e6;
  return spans.map((s) => ({
    name: s.name,
    spanId: s.spanContext().spanId,
    parentSpanId: s.parentSpanContext?.spanId,
    traceId: s.spanContext().traceId,
    startMs: t(s.startTime),
    durationMs: t(s.endTime) - t(s.startTime),
    status: s.status,
    attributes: s.attributes,
    events: s.events.map((e) => ({ name: e.name, attributes: e.attributes })),
  }));
}

/** The exit code a VM's guest reported (QEMU backend: its exit port's file), or null. */
export function reportedExit(dir: string): number | null {
  try {
    const fd = fs.openSync(path.join(dir, 'exit-status'), 'r');
    try {
      const buf = Buffer.alloc(4096); // what readExitPort reads of it (the guest wrote it: hostile)
      const n = fs.readSync(fd, buf, 0, buf.length, 0);
      return readExitPort(buf.subarray(0, n).toString('utf8')).code ?? null;
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return null;
  }
}

export function vmDir(dataDir: string, name: string): string {
  if (!VM_NAME.test(name)) throw new UsageError(`bad VM name ${JSON.stringify(name)}`);
  return vmDirOf(dataDir, name);
}

export const signalNumber = (sig: NodeJS.Signals): number => os.constants.signals[sig] ?? 9;

const GLOBAL_OPTIONS = {
  'data-dir': { type: 'string' },
  json: { type: 'boolean' },
  help: { type: 'boolean' },
} as const;
/** Each command's own options (run and bench parse theirs in cmdRun/cmdBench). */
const COMMAND_OPTIONS: Record<
  string,
  Record<string, { type: 'string' | 'boolean'; short?: string; multiple?: boolean }>
> = {
  pull: {},
  images: { quiet: { type: 'boolean', short: 'q' } },
  cache: {},
  prune: {},
  ps: { all: { type: 'boolean', short: 'a' }, quiet: { type: 'boolean', short: 'q' } },
  inspect: {},
  port: {},
  stop: { time: { type: 'string', short: 't' } },
  rm: { force: { type: 'boolean', short: 'f' } },
  pause: {},
  unpause: {},
  stats: { 'no-stream': { type: 'boolean' } },
  exec: {
    interactive: { type: 'boolean', short: 'i' },
    tty: { type: 'boolean', short: 't' },
    env: { type: 'string', short: 'e', multiple: true },
    workdir: { type: 'string', short: 'w' },
    user: { type: 'string', short: 'u' },
  },
  cp: {},
  doctor: {},
  setup: {},
  logs: {
    follow: { type: 'boolean', short: 'f' },
    console: { type: 'boolean' },
    network: { type: 'boolean' },
    tail: { type: 'string', short: 'n' },
    since: { type: 'string' },
  },
};

/**
 * One parser for every command (node:util parseArgs, strict): `--opt=value` and `--opt value` mean
 * the same, an unknown option is a usage error, and nothing after `--` is ever read as ours.
 */
export function parseCommand(
  command: string,
  args: string[],
): { values: Record<string, string | boolean | string[] | undefined>; positionals: string[]; after: string[] } {
  const dash = args.indexOf('--');
  const own = COMMAND_OPTIONS[command] ?? {};
  const { values, positionals } = parseStrict({
    args: dash >= 0 ? args.slice(0, dash) : args,
    allowPositionals: true,
    options: { ...GLOBAL_OPTIONS, ...own },
  });
  return {
    values,
    positionals,
    after: dash >= 0 ? args.slice(dash + 1) : [],
  };
}

/** How a command prints its result: `o` as one JSON line with --json, else `text` (when not empty). */
export type Out = (o: unknown, text: string) => void;

/** What main() hands every command after parsing its arguments. */
export interface CommandContext {
  /** The command's name as typed (stop and rm share one function). */
  command: string;
  /** Its arguments as given (run and bench parse their own). */
  args: string[];
  values: Record<string, string | boolean | string[] | undefined>;
  positional: string[];
  /** The words after `--`. */
  after: string[];
  dataDir: string;
  cacheDir: string;
  json: boolean;
  out: Out;
}

/**
 * Runs `work` with a signal that Ctrl-C, SIGTERM or SIGHUP aborts. When `work` fails after one of
 * them, the result names the signal (the caller says what was left and exits 128+N); a failure
 * with no signal is thrown as it is.
 */
export async function untilInterrupted<T>(
  work: (signal: AbortSignal) => Promise<T>,
): Promise<{ value: T } | { interrupted: NodeJS.Signals }> {
  const ac = new AbortController();
  let interrupted: NodeJS.Signals | undefined;
  const onSignal = (sig: NodeJS.Signals): void => {
    interrupted ??= sig;
    ac.abort();
  };
  const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
  for (const sig of signals) process.on(sig, onSignal);
  try {
    return { value: await work(ac.signal) };
  } catch (err) {
    if (interrupted === undefined) throw err;
    return { interrupted };
  } finally {
    for (const sig of signals) process.removeListener(sig, onSignal);
  }
}
