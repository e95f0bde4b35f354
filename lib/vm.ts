/**
 * The handle run() resolves to: a started VM. `stop()` is idempotent and safe to call
 * concurrently; `await using vm = await run(...)` stops and removes it at scope exit.
 */
import { EventEmitter } from 'node:events';
import * as path from 'node:path';
import { context, type Span, type Tracer } from '@opentelemetry/api';
import { ATTR, SPAN } from './telemetry/attributes';
import { endSpan, getTracer, traceEnv } from './telemetry/tracer';
import * as fsp from 'node:fs/promises';
import type { BackendHandle, VmExit } from './backends/types';
import { MicrovmError } from './errors';
import type { ExecOptions, ExecResult, SshClient } from './ssh/client';
import { AgentClient, type AgentHello, type AgentProcess, type AgentSpawnOptions } from './agent/client';
import { type AgentExecOptions, execBuffered, execOptions, toArgv } from './agent/exec';
import { copyIn, copyOut, type CopyOutLimits, readFile, writeFile } from './agent/files';
import { KeepAlive } from './keep-alive';
import { type OutputStream, readOutputStatus, type StreamStatus } from './output-status';
import * as v from './validate';
import { isPaused, pausedError, pauseVm, resumeVm } from './pause';
import { askGuest, type GuestStats, hostSide, type VmStats } from './stats';

/** What {@link MicroVM.status} reports. */
export interface VmStatus {
  /** 'paused' between `pause()` (or `microvm pause`) and `resume()`. */
  state: 'running' | 'paused' | 'exited';
  backend: string;
  pid: number;
  /** How it ended (see {@link VmExit}); undefined while running. */
  reason?: VmExit['reason'];
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  /** The coded error when the hypervisor failed. */
  error?: MicrovmError;
}

/** Fixed facts about a VM, set when it starts. */
export interface MicroVMInfo {
  id: string;
  name: string;
  backend: string;
  dataDir: string;
  rootfsPath: string;
  cloneStrategy: string;
  ports: { host: number; guest: number }[];
  consoleLogPath: string;
  logPath: string;
}

/**
 * @internal The VM's end without keeping the event loop alive: for the library's own races (run()'s
 * PostBoot), which must not hold a process that the caller let go. Users call `vm.wait()`.
 */
export const VM_ENDED = Symbol('microvm.vm.ended');

/** How long an idle agent channel stays open after its last use (ms). */
export const AGENT_IDLE_MS = 250;

/** An optional `signal` option. */
function signalOption(options: { signal?: unknown }): AbortSignal | undefined {
  if (options.signal !== undefined && !(options.signal instanceof AbortSignal))
    throw v.typeError('Expected an AbortSignal for options.signal');
  return options.signal;
}

/** An absolute guest path. */
function guestAbsolute(name: string, value: unknown): string {
  const p = v.string(name, value);
  if (!p.startsWith('/') || p.includes('\0')) throw v.rangeError(`Expected an absolute guest path for ${name}`);
  return p;
}

/** One-line description of how a VM ended. */
export function describeExit(exit: VmExit): string {
  if (exit.reason === 'exited') return `the guest command exited with code ${exit.exitCode}`;
  if (exit.reason === 'stopped') return `the VM was stopped by ${exit.signal}`;
  return `the hypervisor failed: [${exit.error.code}] ${exit.error.message}`;
}

/** The events a {@link MicroVM} emits: `'exit'` once, with how it ended. */
export interface MicroVMEvents {
  exit: [exit: VmExit];
}

export class MicroVM extends EventEmitter<MicroVMEvents> implements AsyncDisposable {
  readonly id: string;
  readonly name: string;
  readonly backend: string;
  readonly dataDir: string;
  readonly rootfsPath: string;
  readonly cloneStrategy: string;
  readonly ports: readonly { host: number; guest: number }[];
  readonly consoleLogPath: string;
  /**
   * Where the guest command's stdout and stderr go when the backend keeps them apart from the
   * console (QEMU backend); undefined otherwise (libkrun: both are on the console).
   */
  readonly stdoutPath: string | undefined;
  readonly stderrPath: string | undefined;
  readonly logPath: string;
  readonly #handle: BackendHandle;
  readonly #exited: Promise<VmExit>;
  #result: VmExit | undefined;
  #stopping: Promise<void> | undefined;
  #onExit: Array<() => Promise<void>> = [];
  /** Connected SSH client, when run() was given `ssh` (set by the SSHWaitReady post-boot hook). */
  ssh: SshClient | undefined;
  /**
   * What the guest agent said when run() connected (unless run() was given
   * `agent: false`); undefined without an agent.
   */
  agentHello: AgentHello | undefined;
  /**
   * The agent's channel is held only while something uses it (and `AGENT_IDLE_MS` after), so
   * another process — `microvm exec NAME` — can connect in between: QEMU serves one client at a time.
   */
  #agentSocket: string | undefined;
  #agentAcceptsLate = false;
  #client: AgentClient | undefined;
  #connecting: Promise<AgentClient> | undefined;
  #leases = 0;
  #idle: NodeJS.Timeout | undefined;
  /** Where `microvm.Exec` spans go (run()'s tracer provider); the global provider when unset. */
  #tracer: Tracer | undefined;
  /** Pending waits on this VM keep the event loop alive (see {@link MicroVM.unref}). */
  readonly #keep = new KeepAlive();

  /** @internal Created by run(). */
  constructor(info: MicroVMInfo, handle: BackendHandle, onExit: Array<() => Promise<void>> = [], tracer?: Tracer) {
    super();
    this.#tracer = tracer;
    this.id = info.id;
    this.name = info.name;
    this.backend = info.backend;
    this.dataDir = info.dataDir;
    this.rootfsPath = info.rootfsPath;
    this.cloneStrategy = info.cloneStrategy;
    this.ports = info.ports;
    this.consoleLogPath = info.consoleLogPath;
    this.logPath = info.logPath;
    this.stdoutPath = handle.stdoutPath;
    this.stderrPath = handle.stderrPath;
    this.#handle = handle;
    this.#onExit = onExit;
    this.#exited = handle.exited.then(async (r) => {
      this.#result = r;
      this.#dropAgent();
      for (const fn of this.#onExit) await fn().catch(() => undefined);
      this.emit('exit', r);
      return r;
    });
  }

  /**
   * The host port (on 127.0.0.1) that forwards to `guestPort`; with `ports: [{ host: 0, guest }]`
   * the one that was picked. Throws ERR_MICROVM_PORT_NOT_FORWARDED when none does.
   */
  port(guestPort: number): number {
    const g = v.integer('guestPort', guestPort, 1, 65535);
    const hit = this.ports.find((p) => p.guest === g);
    if (!hit) {
      throw new MicrovmError(
        'ERR_MICROVM_PORT_NOT_FORWARDED',
        `${this.name} forwards no host port to guest port ${g} (forwarded: ${this.ports.map((p) => p.guest).join(', ') || 'none'})`,
      );
    }
    return hit.host;
  }

  /** PID of the process that owns the VM. */
  get pid(): number {
    return this.#handle.pid;
  }

  status(): VmStatus {
    return {
      state: this.#result ? 'exited' : isPaused(this.dataDir) ? 'paused' : 'running',
      backend: this.backend,
      pid: this.pid,
      reason: this.#result?.reason,
      exitCode: this.#result?.exitCode ?? null,
      signal: this.#result?.signal ?? null,
      error: this.#result?.error,
    };
  }

  /**
   * What the VM costs and uses now: CPU time and resident memory of its processes on the host
   * (the hypervisor and its helpers), the bytes its directory takes, and the guest's own memory,
   * load and network counters through the agent (`guest` is left out without an agent, while
   * paused, or when the guest's answer does not parse). ERR_MICROVM_VM_NOT_RUNNING once it ended.
   */
  async stats(options: { signal?: AbortSignal } = {}): Promise<VmStats> {
    const signal = signalOption(options);
    if (this.#result)
      throw new MicrovmError(
        'ERR_MICROVM_VM_NOT_RUNNING',
        `${this.name} is not running (${describeExit(this.#result)})`,
      );
    const side = hostSide(this.pid, this.dataDir);
    let guest: GuestStats | undefined;
    if (this.#agentSocket && !isPaused(this.dataDir)) {
      try {
        guest = await this.#withAgent(askGuest, signal);
      } catch (err) {
        if (signal?.aborted) throw err;
        /* no guest view this time */
      }
    }
    return { ...side, ...(guest ? { guest } : {}) };
  }

  /**
   * Stops the guest's vCPUs; its memory, devices, connections and processes stay as they are until
   * {@link resume}. While paused, new exec, spawn, copies and file requests fail at once with
   * ERR_MICROVM_VM_PAUSED (those under way wait); `stop()` still works. QEMU backend only
   * (ERR_MICROVM_SNAPSHOT_UNSUPPORTED elsewhere); a span `microvm.Pause`.
   */
  pause(): Promise<void> {
    return this.#keep.hold(this.#control(SPAN.PAUSE, pauseVm));
  }

  /** Lets a paused VM run again (a span `microvm.Resume`). */
  resume(): Promise<void> {
    return this.#keep.hold(this.#control(SPAN.RESUME, resumeVm));
  }

  async #control(name: string, act: typeof pauseVm): Promise<void> {
    const tracer = this.#tracer ?? getTracer();
    const span = tracer.startSpan(
      name,
      { attributes: { [ATTR.NAME]: this.name, [ATTR.BACKEND]: this.backend } },
      context.active(),
    );
    try {
      if (this.#result)
        throw new MicrovmError(
          'ERR_MICROVM_VM_NOT_RUNNING',
          `${this.name} is not running (${describeExit(this.#result)})`,
        );
      await act({
        name: this.name,
        backend: this.backend,
        dir: this.dataDir,
        controlSocket: this.#handle.controlSocketPath,
      });
      endSpan(span);
    } catch (err) {
      endSpan(span, err);
      throw err;
    }
  }

  /**
   * Runs a command in the guest to its end: `exec('echo $HOME')` through `/bin/sh -c`, or
   * `exec(['ls', '-l', '/'])` as an argv. Over the agent when the VM has one (env, cwd, user,
   * tty, timeoutMs, maxBuffer work there; the environment is the image's Env + run()'s env +
   * `env`), else over SSH (`run(image, { ssh })`; a string command, `env`, `stdin`, `signal`).
   */
  exec(command: string | readonly string[], options: AgentExecOptions = {}): Promise<ExecResult> {
    return this.#keep.hold(this.#exec(command, options));
  }

  async #exec(command: string | readonly string[], options: AgentExecOptions): Promise<ExecResult> {
    if (this.#agentSocket) {
      const argv = toArgv(command);
      const o = execOptions(options);
      return this.#traced(argv, o.env, (env, span) =>
        this.#withAgent(async (agent) => {
          const r = await execBuffered(agent, argv, { ...o, env });
          if (r.exitCode !== null) span.setAttribute(ATTR.PROCESS_EXIT_CODE, r.exitCode);
          return r;
        }),
      );
    }
    if (this.ssh) {
      if (typeof command !== 'string')
        throw new MicrovmError(
          'ERR_MICROVM_AGENT_UNAVAILABLE',
          'An argv command needs the guest agent; over SSH pass a string',
        );
      const o = execOptions(options);
      const extra = (['cwd', 'user', 'tty', 'timeoutMs', 'maxBuffer'] as const).filter((k) => o[k] !== undefined);
      if (extra.length)
        throw new MicrovmError(
          'ERR_MICROVM_AGENT_UNAVAILABLE',
          `${extra.join(', ')} need the guest agent; this VM has SSH only`,
        );
      return this.ssh.exec(command, { signal: o.signal, stdin: o.stdin, env: o.env } satisfies ExecOptions);
    }
    throw this.#noAgent();
  }

  /**
   * Starts a process in the guest with its streams (`stdout`, `stderr`, `stdin` with
   * `{ stdin: true }` or a `tty`), `kill()`, `resize()` and `exited`. Needs the agent.
   */
  async spawn(command: string | readonly string[], options: AgentSpawnOptions = {}): Promise<AgentProcess> {
    const o = execOptions({ ...options, stdin: undefined });
    if (options.stdin !== undefined) v.boolean('options.stdin', options.stdin);
    const argv = toArgv(command);
    const agent = await this.#keep.hold(this.#lease());
    return new Promise<AgentProcess>((resolve, reject) => {
      // Held until the guest process ends: its `exited` is a promise handed out too.
      const traced = this.#traced(argv, o.env, async (env, span) => {
        let proc: AgentProcess;
        try {
          proc = agent.spawn(argv, { ...o, env, stdin: options.stdin === true });
        } catch (err) {
          reject(err);
          throw err;
        }
        resolve(proc);
        const exit = await proc.exited;
        if (exit.exitCode !== null) span.setAttribute(ATTR.PROCESS_EXIT_CODE, exit.exitCode);
      })
        .catch(() => undefined) // the caller sees it on proc.exited
        .finally(() => this.#release());
      void this.#keep.hold(traced);
    });
  }

  /**
   * Runs `fn` in a `microvm.Exec` span (a child of the caller's active span), with the span's
   * W3C trace context added to the command's environment unless the caller set its own.
   */
  #traced<T>(
    argv: readonly string[],
    env: Record<string, string> | undefined,
    fn: (env: Record<string, string>, span: Span) => Promise<T>,
  ): Promise<T> {
    const tracer = this.#tracer ?? getTracer();
    const span = tracer.startSpan(
      SPAN.EXEC,
      {
        attributes: {
          [ATTR.NAME]: this.name,
          [ATTR.PROCESS_EXECUTABLE_NAME]: path.posix.basename(argv[0]),
        },
      },
      context.active(),
    );
    const own = { ...(env ?? {}) };
    if (own.TRACEPARENT === undefined && own.TRACESTATE === undefined)
      for (const e of traceEnv(span)) own[e.slice(0, e.indexOf('='))] = e.slice(e.indexOf('=') + 1);
    let result: Promise<T>;
    try {
      result = fn(own, span);
    } catch (err) {
      endSpan(span, err);
      throw err;
    }
    return result.then(
      (r) => {
        endSpan(span);
        return r;
      },
      (err: unknown) => {
        endSpan(span, err);
        throw err;
      },
    );
  }

  /**
   * Copies a host file or tree into the guest (into `guestPath` when that is a directory); modes
   * and symlinks kept, owners when root; atomic (nothing left behind on failure). Needs the agent.
   */
  async copyIn(hostPath: string, guestPath: string, options: { signal?: AbortSignal } = {}): Promise<void> {
    const [from, to] = [v.absolutePath('hostPath', hostPath), guestAbsolute('guestPath', guestPath)];
    return this.#withAgent((agent) => copyIn(agent, from, to), signalOption(options));
  }

  /** Copies a guest file or tree to the host; atomic, and the guest's names are checked. */
  async copyOut(
    guestPath: string,
    hostPath: string,
    options: CopyOutLimits & { signal?: AbortSignal } = {},
  ): Promise<void> {
    const [from, to] = [guestAbsolute('guestPath', guestPath), v.absolutePath('hostPath', hostPath)];
    const { signal, ...limits } = options;
    return this.#withAgent((agent) => copyOut(agent, from, to, limits), signalOption({ signal }));
  }

  /** A guest file's contents (at most `maxBytes`, default 256 MiB). */
  async readFile(guestPath: string, options: { maxBytes?: number; signal?: AbortSignal } = {}): Promise<Buffer> {
    const max =
      options.maxBytes === undefined ? undefined : v.integer('options.maxBytes', options.maxBytes, 0, 2 ** 40);
    const p = guestAbsolute('guestPath', guestPath);
    return this.#withAgent((agent) => readFile(agent, p, max), signalOption(options));
  }

  /** Writes a guest file atomically (a temporary name, then rename). */
  async writeFile(
    guestPath: string,
    data: string | Buffer,
    options: { mode?: number; signal?: AbortSignal } = {},
  ): Promise<void> {
    const mode = options.mode === undefined ? 0o644 : v.integer('options.mode', options.mode, 0, 0o7777);
    const p = guestAbsolute('guestPath', guestPath);
    return this.#withAgent((agent) => writeFile(agent, p, data, mode), signalOption(options));
  }

  /** @internal run() hands over the channel it opened for readiness (and its socket). */
  attachAgent(socketPath: string, client: AgentClient, acceptsLate = false): void {
    this.#agentAcceptsLate = acceptsLate;
    this.#agentSocket = socketPath;
    this.agentHello = client.hello;
    this.#client = client;
    this.#scheduleIdle();
  }

  /**
   * Runs `fn` with the channel leased. With `signal`: an abort ends the wait at once with its
   * reason and closes the channel (what else ran on it fails too; the next call reconnects): a
   * guest that stalls a transfer can always be walked away from.
   */
  #withAgent<T>(fn: (agent: AgentClient) => Promise<T>, signal?: AbortSignal): Promise<T> {
    return this.#keep.hold(this.#leased(fn, signal));
  }

  async #leased<T>(fn: (agent: AgentClient) => Promise<T>, signal?: AbortSignal): Promise<T> {
    signal?.throwIfAborted();
    const agent = await this.#lease();
    let onAbort: (() => void) | undefined;
    try {
      if (!signal) return await fn(agent);
      const aborted = new Promise<never>((_, reject) => {
        onAbort = () => {
          agent.close();
          reject(signal.reason as Error);
        };
        signal.addEventListener('abort', onAbort, { once: true });
      });
      const work = fn(agent);
      work.catch(() => undefined);
      return await Promise.race([work, aborted]);
    } finally {
      if (onAbort) signal?.removeEventListener('abort', onAbort);
      this.#release();
    }
  }

  /** The channel, connected (again) if it was let go; every lease is released once. */
  async #lease(): Promise<AgentClient> {
    if (this.#result || !this.#agentSocket) throw this.#noAgent();
    if (isPaused(this.dataDir)) throw pausedError(this.name);
    const socketPath = this.#agentSocket;
    clearTimeout(this.#idle);
    this.#leases++;
    try {
      if (!this.#client || this.#client.closedReason) {
        this.#connecting ??= AgentClient.connect(socketPath, {
          timeoutMs: 30_000,
          vmEnded: this.#exited,
          acceptsLate: this.#agentAcceptsLate,
        }).finally(() => (this.#connecting = undefined));
        this.#client = await this.#connecting;
      }
      return this.#client;
    } catch (err) {
      this.#release();
      throw this.#result ? this.#noAgent() : err;
    }
  }

  #release(): void {
    this.#leases = Math.max(0, this.#leases - 1);
    if (this.#leases === 0) this.#scheduleIdle();
  }

  #scheduleIdle(): void {
    clearTimeout(this.#idle);
    this.#idle = setTimeout(() => {
      if (this.#leases > 0) return;
      this.#client?.close();
      this.#client = undefined;
    }, AGENT_IDLE_MS);
    this.#idle.unref();
  }

  #dropAgent(): void {
    clearTimeout(this.#idle);
    this.#client?.close();
    this.#client = undefined;
  }

  #noAgent(): MicrovmError {
    if (this.#result)
      return new MicrovmError('ERR_MICROVM_AGENT_UNAVAILABLE', `The VM has ended: ${describeExit(this.#result)}`);
    return new MicrovmError(
      'ERR_MICROVM_AGENT_UNAVAILABLE',
      `This VM has no guest agent (its backend, ${this.backend}, provides none, or run() was given agent: false) and no SSH`,
    );
  }

  /**
   * Resolves once the VM ended, saying how: `{ reason: 'exited', exitCode }` (the guest command's
   * own code), `{ reason: 'stopped', signal }` (stop() or a signal), or `{ reason: 'failed', error }`
   * (the hypervisor failed; `error` is coded and carries its last log lines). Never rejects.
   */
  wait(): Promise<VmExit> {
    return this.#keep.hold(this.#exited);
  }

  /**
   * What became of the VM's output (QEMU backend): per stream (`console`, `stdout`, `stderr`, ...)
   * the bytes kept and whether the rest was cut at `logMaxBytes` (`'truncated'`) or lost because the
   * disk refused it (`'lost'`), with the bytes discarded. Final once the VM has ended; undefined
   * where the backend keeps no such record (libkrun).
   */
  outputStatus(): Partial<Record<OutputStream, StreamStatus>> | undefined {
    return readOutputStatus(this.dataDir);
  }

  /** @internal See {@link VM_ENDED}. */
  [VM_ENDED](): Promise<VmExit> {
    return this.#exited;
  }

  /**
   * Like a child process, a running VM keeps Node's event loop alive (on every backend), and so does
   * every pending promise that waits on it (`wait()`, `exec()`, copies, `stop()`). `unref()` lets the
   * process exit while they are pending; the VM then ends with the process unless its backend was
   * made with `dieWithParent: false` (`microvm run -d`). Returns the VM.
   */
  unref(): this {
    this.#keep.unref();
    this.#handle.unref?.();
    return this;
  }

  /** Undoes {@link MicroVM.unref}: the VM and the waits on it keep the process alive again. */
  ref(): this {
    this.#keep.ref();
    this.#handle.ref?.();
    return this;
  }

  /**
   * Stops the VM: SIGTERM to its process group, SIGKILL after `timeoutMs` (default 5000).
   * Idempotent; concurrent calls share one stop.
   */
  stop(options: { timeoutMs?: number } = {}): Promise<void> {
    const o = v.object('options', options);
    v.knownKeys('options', o, ['timeoutMs']);
    const timeoutMs = o.timeoutMs === undefined ? 5000 : v.integer('options.timeoutMs', o.timeoutMs, 0, 3_600_000);
    this.#stopping ??= this.#keep.hold(
      (async () => {
        this.ssh?.close();
        this.#dropAgent();
        if (this.#result) return;
        this.#handle.kill('SIGTERM');
        let timer: NodeJS.Timeout | undefined;
        const timedOut = await Promise.race([
          this.#exited.then(() => false),
          new Promise<boolean>((resolve) => {
            timer = setTimeout(() => resolve(true), timeoutMs);
          }),
        ]);
        clearTimeout(timer);
        if (timedOut) {
          this.#handle.kill('SIGKILL');
          await this.#exited;
        }
      })(),
    );
    return this.#stopping;
  }

  /** Stops the VM and deletes its data directory (never the shared image cache). */
  remove(): Promise<void> {
    return this.#keep.hold(
      (async () => {
        await this.stop();
        await fsp.rm(this.dataDir, { recursive: true, force: true });
      })(),
    );
  }

  /** `await using`: stop and remove. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.remove();
  }
}
