/**
 * Starting the native runner (`microvm-runner`), which applies a launch plan and then calls
 * `krun_start_enter` in its own process. See native/runner/runner.cc for the protocol:
 *
 * - the plan is written to the runner's fd 3 (a pipe), so no plan file lingers on disk;
 * - the runner writes one byte 'C' to fd 4 once every configuration call succeeded;
 * - before that, any failure is one JSON line on stderr plus a documented exit code, which
 *   {@link startRunner} turns into a coded error.
 *
 * The runner's stdout and stderr (libkrun's own log) go to `logPath`, never to a pipe, so a
 * detached VM keeps running when this Node process exits.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import type { Readable, Writable } from 'node:stream';
import { type ErrnoCode, KrunError, MicrovmError, type MicrovmErrorCode } from '../../errors';
import { type LaunchPlan, serializeLaunchPlan } from './plan';
import * as v from '../../validate';

/** Exit codes of microvm-runner for failures before the VM starts. */
export const RunnerExit = {
  USAGE: 64,
  PLAN_INVALID: 65,
  PLAN_UNREADABLE: 66,
  UNAVAILABLE: 69,
  CONFIGURE: 70,
  START: 71,
  MOUNT: 72,
} as const;

/** Options of {@link startRunner}. */
export interface StartRunnerOptions {
  /** The runner executable (see `resolveRuntime`). */
  runnerPath: string;
  /** The validated plan (see `buildLaunchPlan`). */
  plan: LaunchPlan;
  /** File that receives the runner's stdout and stderr (appended). */
  logPath: string;
  /** Start in a new process group and let it outlive this process. Default true. */
  detached?: boolean;
  /** Kill the runner when this process dies (PR_SET_PDEATHSIG). Default false. */
  dieWithParent?: boolean;
  /** Environment of the runner. Default: `process.env`. */
  env?: NodeJS.ProcessEnv;
  /** Abort before "configured": the runner is killed and the promise rejects with an AbortError. */
  signal?: AbortSignal;
}

/** Exit status of a runner. */
export interface RunnerExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** A configured runner: its VM is starting or running. */
export interface RunnerHandle {
  readonly pid: number;
  /** Settles when the runner exits (the guest's exit code once the VM ran). */
  readonly exited: Promise<RunnerExitStatus>;
  /** Sends a signal to the runner's process group (or the process when not detached). */
  kill(signal?: NodeJS.Signals): boolean;
  /** Size of the log file when this runner started: its own lines come after. */
  readonly logStart: number;
  /** Whether the runner keeps this process's event loop alive (a detached one starts unref'd). */
  ref(): void;
  unref(): void;
}

interface RunnerErrorLine {
  stage?: string;
  /** An errno name (with syscall) or an ERR_MICROVM_* code written by native/runner/runner.cc. */
  code?: string;
  message?: string;
  errno?: number;
  syscall?: string;
}

/** Finds the runner's last JSON error line in a log text. */
export function parseRunnerError(log: string): RunnerErrorLine | undefined {
  const lines = log.split('\n');
  for (let i = lines.length - 1; i >= 0; i--) {
    const line = lines[i].trim();
    if (!line.startsWith('{"microvmRunnerError"')) continue;
    try {
      const parsed = JSON.parse(line) as { microvmRunnerError?: RunnerErrorLine };
      if (parsed.microvmRunnerError) return parsed.microvmRunnerError;
    } catch {
      /* not ours */
    }
  }
  return undefined;
}

/** The log text after `offset` (at most the last 64 KiB). */
export function readTail(file: string, offset: number): string {
  try {
    const fd = fs.openSync(file, 'r');
    try {
      const size = fs.fstatSync(fd).size;
      const start = Math.max(offset, size - 64 * 1024);
      const buf = Buffer.alloc(size - start);
      fs.readSync(fd, buf, 0, buf.length, start);
      return buf.toString('utf8');
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return '';
  }
}

/** Builds the coded error for a runner that exited before reporting "configured". */
export function runnerFailure(status: RunnerExitStatus, log: string, logPath: string): Error {
  const line = parseRunnerError(log);
  const how = status.signal ? `was killed by ${status.signal}` : `exited with code ${String(status.code)}`;
  if (line && typeof line.syscall === 'string' && typeof line.errno === 'number' && typeof line.code === 'string') {
    const err = new KrunError(
      line.code as ErrnoCode,
      line.errno,
      line.syscall,
      `microvm-runner: ${line.message ?? line.syscall}`,
    );
    return Object.assign(err, { exitCode: status.code });
  }
  if (line && typeof line.code === 'string') {
    return Object.assign(
      new MicrovmError(line.code as MicrovmErrorCode, `microvm-runner: ${line.message ?? line.code}`),
      {
        exitCode: status.code,
      },
    );
  }
  return Object.assign(
    new MicrovmError('ERR_MICROVM_RUNNER_FAILED', `microvm-runner ${how} before the VM was configured; see ${logPath}`),
    { exitCode: status.code },
  );
}

/**
 * Starts the runner with `plan` and resolves once it reported "configured" (every libkrun
 * configuration call succeeded; `krun_start_enter` is being called). Rejects with a
 * {@link KrunError} (failing krun call), a coded {@link MicrovmError} (plan, library load), or an
 * AbortError; in every rejection the runner process is gone.
 */
export async function startRunner(options: StartRunnerOptions): Promise<RunnerHandle> {
  const o = v.object('options', options);
  v.knownKeys('options', o, ['runnerPath', 'plan', 'logPath', 'detached', 'dieWithParent', 'env', 'signal']);
  const runnerPath = v.absolutePath('runnerPath', o.runnerPath);
  const logPath = v.absolutePath('logPath', o.logPath);
  const detached = o.detached === undefined ? true : v.boolean('detached', o.detached);
  const dieWithParent = o.dieWithParent === undefined ? false : v.boolean('dieWithParent', o.dieWithParent);
  const planText = serializeLaunchPlan(options.plan);
  const signal = options.signal;
  signal?.throwIfAborted();

  const logFd = fs.openSync(logPath, fs.constants.O_WRONLY | fs.constants.O_APPEND | fs.constants.O_CREAT, 0o640); // libuv opens with O_CLOEXEC;
  const logStart = fs.fstatSync(logFd).size;
  const args = ['--plan-fd', '3', '--ready-fd', '4'];
  if (dieWithParent) args.push('--die-with-parent');
  let child;
  try {
    child = spawn(runnerPath, args, {
      stdio: ['ignore', logFd, logFd, 'pipe', 'pipe'],
      detached,
      env: options.env ?? process.env,
    });
  } finally {
    fs.closeSync(logFd);
  }

  const exited = new Promise<RunnerExitStatus>((resolve) => {
    child.once('exit', (code, sig) => resolve({ code, signal: sig }));
  });
  // A spawn failure (ENOENT, EACCES) arrives as 'error' and then 'exit' may never come.
  const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));

  if (child.pid === undefined) {
    // Spawning failed (ENOENT, EACCES...): the reason arrives as an 'error' event.
    const e = await spawnError;
    throw new MicrovmError('ERR_MICROVM_RUNNER_SPAWN', `Cannot start ${runnerPath}: ${e.message}`, { cause: e });
  }

  const planPipe = child.stdio[3] as Writable;
  const readyPipe = child.stdio[4] as Readable;
  planPipe.on('error', () => {
    /* the runner may exit before reading the whole plan; its exit status tells why */
  });
  planPipe.end(planText);

  const configured = new Promise<boolean>((resolve) => {
    let got = false;
    readyPipe.on('data', (chunk: Buffer) => {
      if (!got && chunk.includes(0x43)) {
        got = true;
        resolve(true);
      }
    });
    readyPipe.on('close', () => resolve(got));
    readyPipe.on('error', () => resolve(got));
  });

  const killGroup = (sig: NodeJS.Signals): boolean => {
    if (child.pid === undefined) return false;
    try {
      process.kill(detached ? -child.pid : child.pid, sig);
      return true;
    } catch {
      return false;
    }
  };

  let onAbort: (() => void) | undefined;
  const aborted = new Promise<'aborted'>((resolve) => {
    if (!signal) return;
    onAbort = () => resolve('aborted');
    signal.addEventListener('abort', onAbort, { once: true });
  });

  try {
    const outcome = await Promise.race([
      configured.then((ok) => (ok ? ('configured' as const) : ('closed' as const))),
      aborted,
    ]);
    if (outcome === 'aborted') {
      killGroup('SIGKILL');
      await exited;
      throw signal?.reason instanceof Error
        ? signal.reason
        : new DOMException('The operation was aborted', 'AbortError');
    }
    if (outcome === 'closed') {
      const status = await exited;
      throw runnerFailure(status, readTail(logPath, logStart), logPath);
    }
  } finally {
    if (onAbort) signal?.removeEventListener('abort', onAbort);
  }

  readyPipe.destroy();
  if (detached) child.unref();
  const pid = child.pid;
  return {
    pid,
    exited,
    kill: (sig: NodeJS.Signals = 'SIGTERM') => killGroup(sig),
    logStart,
    ref: () => child.ref(),
    unref: () => child.unref(),
  };
}
