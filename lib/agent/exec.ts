/**
 * `vm.exec()` over the agent: runs a command to its end and returns its output, with a deadline,
 * cancellation and a cap on what is kept. The process group in the guest is killed on abort and
 * on timeout.
 */
import { finished } from 'node:stream/promises';
import { MicrovmError } from '../errors';
import * as v from '../validate';
import { type AgentClient, type AgentSpawnOptions, KILL_GRACE_MS } from './client';

/** Options of {@link execBuffered} (and `vm.exec()` with an agent). */
export interface AgentExecOptions extends Omit<AgentSpawnOptions, 'stdin'> {
  /** Written to the command's stdin, then closed. */
  stdin?: string | Buffer;
  signal?: AbortSignal;
  /** Kills the command (its process group) after this many ms: ERR_MICROVM_EXEC_TIMEOUT. */
  timeoutMs?: number;
  /** Most bytes kept of stdout and of stderr each (default 64 MiB): ERR_MICROVM_EXEC_MAX_BUFFER. */
  maxBuffer?: number;
}

/** What a finished command produced. */
export interface AgentExecResult {
  stdout: string;
  stderr: string;
  /** Exit code, or null when a signal killed it. */
  exitCode: number | null;
  /** The signal's name ("SIGKILL") when one killed it. */
  signal: string | null;
}

const EXEC_KEYS = ['env', 'cwd', 'user', 'tty', 'stdin', 'signal', 'timeoutMs', 'maxBuffer'] as const;

/** The argv of `command`: an array as it is, a string through `/bin/sh -c`. */
export function toArgv(command: string | readonly string[]): string[] {
  if (typeof command === 'string') {
    if (command.length === 0) throw v.rangeError('Expected a non-empty command');
    return ['/bin/sh', '-c', command];
  }
  const list: unknown = command;
  if (!Array.isArray(list) || list.length === 0 || list.some((a) => typeof a !== 'string'))
    throw v.typeError('Expected a command string or a non-empty array of strings');
  return list as string[];
}

/** Validates exec options (shared by the agent and the CLI). */
export function execOptions(options: unknown): AgentExecOptions {
  const o = v.object('options', options);
  v.knownKeys('options', o, EXEC_KEYS);
  const out: AgentExecOptions = {};
  if (o.env !== undefined) {
    const env = v.object('options.env', o.env);
    for (const [k, val] of Object.entries(env)) {
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k))
        throw v.rangeError(`options.env has an invalid name ${JSON.stringify(k)}`);
      v.string(`options.env.${k}`, val, { allowEmpty: true }); // FOO= is a value too
    }
    out.env = env as Record<string, string>;
  }
  if (o.cwd !== undefined) out.cwd = v.string('options.cwd', o.cwd);
  if (o.user !== undefined) out.user = v.string('options.user', o.user);
  if (o.tty !== undefined) {
    const t = v.object('options.tty', o.tty);
    out.tty = {
      rows: v.integer('options.tty.rows', t.rows, 1, 65535),
      cols: v.integer('options.tty.cols', t.cols, 1, 65535),
    };
  }
  if (o.stdin !== undefined) {
    if (typeof o.stdin !== 'string' && !Buffer.isBuffer(o.stdin))
      throw v.typeError(`Expected a string or Buffer for options.stdin but received ${v.describe(o.stdin)}`);
    out.stdin = o.stdin;
  }
  if (o.signal !== undefined) {
    if (!(o.signal instanceof AbortSignal)) throw v.typeError('Expected an AbortSignal for options.signal');
    out.signal = o.signal;
  }
  if (o.timeoutMs !== undefined) out.timeoutMs = v.integer('options.timeoutMs', o.timeoutMs, 1, 2 ** 31 - 1);
  if (o.maxBuffer !== undefined) out.maxBuffer = v.integer('options.maxBuffer', o.maxBuffer, 1, 2 ** 31 - 1);
  return out;
}

/** Runs `command` to its end and returns its output. */
export async function execBuffered(
  agent: AgentClient,
  command: string | readonly string[],
  options: AgentExecOptions = {},
): Promise<AgentExecResult> {
  const argv = toArgv(command);
  const o = execOptions(options);
  o.signal?.throwIfAborted();
  const maxBuffer = o.maxBuffer ?? 64 * 2 ** 20;
  const proc = agent.spawn(argv, {
    env: o.env,
    cwd: o.cwd,
    user: o.user,
    tty: o.tty,
    stdin: o.stdin !== undefined,
  });
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  const sizes = { out: 0, err: 0 };
  let why: Error | undefined; // set when this side ended it (abort, timeout, too much output)
  let grace: NodeJS.Timeout | undefined;
  const stopWith = (e: Error): void => {
    if (why) return;
    why = e;
    proc.kill('SIGKILL');
    // The agent is guest code: one that never reports the kill loses the channel, and the call
    // ends with its reason all the same.
    grace = setTimeout(
      () =>
        agent.close(
          new MicrovmError(
            'ERR_MICROVM_AGENT_UNAVAILABLE',
            `The guest agent did not report a killed command within ${KILL_GRACE_MS} ms; the channel was closed`,
          ),
        ),
      KILL_GRACE_MS,
    );
  };
  const collect = (which: 'out' | 'err', into: Buffer[]) => (d: Buffer) => {
    sizes[which] += d.length;
    if (sizes[which] > maxBuffer)
      stopWith(
        new MicrovmError(
          'ERR_MICROVM_EXEC_MAX_BUFFER',
          `The command's std${which} exceeded maxBuffer (${maxBuffer} bytes)`,
        ),
      );
    else into.push(d);
  };
  proc.stdout.on('data', collect('out', out));
  proc.stderr.on('data', collect('err', err));
  proc.stdout.on('error', () => undefined);
  proc.stderr.on('error', () => undefined);
  const onAbort = (): void => stopWith(o.signal?.reason instanceof Error ? o.signal.reason : new Error('aborted'));
  o.signal?.addEventListener('abort', onAbort, { once: true });
  const timer =
    o.timeoutMs === undefined
      ? undefined
      : setTimeout(
          () =>
            stopWith(
              new MicrovmError(
                'ERR_MICROVM_EXEC_TIMEOUT',
                `The command did not finish within ${o.timeoutMs} ms; it was killed`,
              ),
            ),
          o.timeoutMs,
        );
  if (proc.stdin) {
    proc.stdin.on('error', () => undefined); // a command that exits without reading its input
    proc.stdin.end(o.stdin);
  }
  try {
    const exit = await proc.exited.catch((err: unknown) => {
      throw why ?? err;
    });
    if (why) throw why;
    // The streams end with the exit frame; let their last 'data' events run.
    await Promise.all([finished(proc.stdout), finished(proc.stderr)]);
    return {
      stdout: Buffer.concat(out).toString('utf8'),
      stderr: Buffer.concat(err).toString('utf8'),
      exitCode: exit.exitCode,
      signal: exit.signal,
    };
  } finally {
    clearTimeout(timer);
    clearTimeout(grace);
    o.signal?.removeEventListener('abort', onAbort);
  }
}
