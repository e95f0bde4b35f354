/**
 * The CLI's commands that go through the guest agent: `exec` (`-i`, `-t`, `-e`, `-w`, `-u`),
 * `cp`, and attaching a terminal for `run -it`.
 */
import { VM_NAME_PART, vmDir as vmDirOf } from '../vm-dir';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { AgentClient, type AgentProcess, KILL_GRACE_MS } from '../agent/client';
import { copyIn, copyOut } from '../agent/files';
import { AGENT_SOCKET } from '../backends/guest-init';
import { MicrovmError } from '../errors';
import { SshClient } from '../ssh/client';
import { isPaused, pausedError } from '../pause';
import { isRecordedProcess, readState } from '../state';
import { type CommandContext, UsageError, coded, signalNumber, untilInterrupted, vmDir } from './common';

/**
 * Connects to the agent of the VM whose directory is `dir`; undefined when it has none.
 * `acceptsLate` (recorded in its state): the socket accepts before the agent listens behind it
 * (libkrun bridges it to a vsock port), so keep trying.
 */
export async function connectVmAgent(dir: string, acceptsLate: boolean): Promise<AgentClient | undefined> {
  const sock = path.join(dir, AGENT_SOCKET);
  if (!fs.existsSync(sock)) return undefined;
  return AgentClient.connect(sock, { timeoutMs: 10_000, acceptsLate });
}

/**
 * Wires a guest process to this terminal: its stdout and stderr to ours, our stdin to it when
 * `stdin`, raw mode and window size when `tty`. Ctrl-C and SIGTERM go to the guest process (on a
 * tty, Ctrl-C is a byte the guest's terminal turns into SIGINT). Resolves to the exit status to
 * use: the process's code, or 128+N after signal N.
 */
export async function attach(proc: AgentProcess, opts: { stdin: boolean; tty: boolean }): Promise<number> {
  const input = process.stdin;
  const raw = opts.tty && input.isTTY;
  if (raw) input.setRawMode(true);
  proc.stdout.pipe(process.stdout, { end: false });
  proc.stderr.pipe(process.stderr, { end: false });
  if (opts.stdin && proc.stdin) {
    proc.stdin.on('error', () => undefined);
    input.pipe(proc.stdin);
  }
  const onResize = (): void => proc.resize(process.stdout.rows, process.stdout.columns);
  if (opts.tty && process.stdout.isTTY) process.stdout.on('resize', onResize);
  // A signal goes to the guest process; if it has not ended KILL_GRACE_MS later (or at a second
  // signal) we stop waiting and exit 128+N whatever the agent does (the caller then closes the
  // channel, and the agent ends what it started for us).
  let giveUp: (code: number) => void = () => undefined;
  const abandoned = new Promise<number>((resolve) => (giveUp = resolve));
  let grace: NodeJS.Timeout | undefined;
  const forward = (sig: NodeJS.Signals): void => {
    proc.kill(sig);
    const code = 128 + (os.constants.signals[sig] ?? 9);
    if (grace) giveUp(code);
    else grace = setTimeout(() => giveUp(code), KILL_GRACE_MS);
  };
  const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
  for (const sig of signals) process.on(sig, forward);
  const ended = (async (): Promise<number> => {
    const exit = await proc.exited;
    await Promise.all(
      [proc.stdout, proc.stderr].map((s) => new Promise((r) => (s.readableEnded ? r(null) : s.once('close', r)))),
    );
    return exit.exitCode ?? 128 + (os.constants.signals[exit.signal as NodeJS.Signals] ?? 9);
  })();
  ended.catch(() => undefined);
  try {
    return await Promise.race([ended, abandoned]);
  } finally {
    clearTimeout(grace);
    for (const sig of signals) process.removeListener(sig, forward);
    process.stdout.removeListener('resize', onResize);
    if (opts.stdin) input.unpipe();
    if (raw) input.setRawMode(false);
    input.pause();
  }
}

/** The terminal's size, for a tty exec. */
export function terminalSize(): { rows: number; cols: number } {
  return { rows: process.stdout.rows || 24, cols: process.stdout.columns || 80 };
}

/** `KEY=VALUE` strings (from -e) as an env object; a bad one is a usage problem. */
export function envFromArgs(list: readonly string[], usage: (m: string) => Error): Record<string, string> {
  const env: Record<string, string> = {};
  for (const e of list) {
    const i = e.indexOf('=');
    if (i <= 0) throw usage(`-e takes KEY=VALUE, not ${JSON.stringify(e)}`);
    env[e.slice(0, i)] = e.slice(i + 1);
  }
  return env;
}

/** One side of `microvm cp`: `NAME:/path` in a VM, or a host path. */
export type CpSide = { vm: string; path: string } | { host: string };

export function parseCpSide(spec: string, isVm: (name: string) => boolean): CpSide {
  const m = new RegExp(`^(${VM_NAME_PART}):(/.*)$`).exec(spec);
  if (m && isVm(m[1])) return { vm: m[1], path: m[2] };
  return { host: path.resolve(spec) };
}

/**
 * `microvm cp SRC DST`: exactly one side is `NAME:/path`. `signal` ends the copy at once: the
 * channel is closed (whatever the agent does), the partial copy removed, and the abort's reason thrown.
 */
export async function copyBetween(
  src: CpSide,
  dst: CpSide,
  agentFor: (name: string) => Promise<AgentClient>,
  signal?: AbortSignal,
): Promise<void> {
  const vmSide = 'vm' in src ? src : 'vm' in dst ? dst : undefined;
  if (!vmSide || ('vm' in src && 'vm' in dst))
    throw new MicrovmError('ERR_MICROVM_USAGE', 'cp copies between a VM and the host: one side is NAME:/path');
  signal?.throwIfAborted();
  const agent = await agentFor(vmSide.vm);
  const onAbort = (): void => agent.close((signal?.reason as Error | undefined) ?? undefined);
  signal?.addEventListener('abort', onAbort, { once: true });
  try {
    if ('vm' in src && 'host' in dst) await copyOut(agent, src.path, dst.host);
    else if ('host' in src && 'vm' in dst) await copyIn(agent, src.host, dst.path);
  } finally {
    signal?.removeEventListener('abort', onAbort);
    agent.close();
  }
}

/** `microvm exec NAME -- CMD...`: through the agent, or SSH for a VM started with --ssh only. */
export async function cmdExec(c: CommandContext): Promise<number> {
  const { values, positional, after, dataDir, json, out } = c;
  const name = positional[0];
  const words = after;
  if (positional.length !== 1 || words.length === 0) throw new UsageError('exec takes NAME -- CMD...');
  const dir = vmDir(dataDir, name);
  const st = readState(dir);
  if (!st || !isRecordedProcess(st)) throw coded('ERR_MICROVM_VM_NOT_FOUND', `no running VM named ${name}`);
  if (isPaused(dir)) throw pausedError(name);
  const env = envFromArgs((values.env as string[] | undefined) ?? [], (m) => new UsageError(m));
  const agent = await connectVmAgent(dir, st.agentAcceptsLate === true);
  if (agent) {
    const tty = values.tty === true;
    const proc = agent.spawn(words, {
      env,
      cwd: values.workdir as string | undefined,
      user: values.user as string | undefined,
      tty: tty ? terminalSize() : undefined,
      stdin: values.interactive === true,
    });
    try {
      if (json) {
        const outs: Buffer[] = [];
        const errs: Buffer[] = [];
        proc.stdout.on('data', (d: Buffer) => outs.push(d));
        proc.stderr.on('data', (d: Buffer) => errs.push(d));
        proc.stdin?.end();
        const exit = await proc.exited;
        out({ stdout: Buffer.concat(outs).toString(), stderr: Buffer.concat(errs).toString(), ...exit }, '');
        return exit.exitCode ?? 128 + signalNumber(exit.signal as NodeJS.Signals);
      }
      return await attach(proc, { stdin: values.interactive === true, tty });
    } finally {
      agent.close();
    }
  }
  // No agent (a libkrun VM): SSH, when it was started with --ssh.
  const port = st.ports.find((p) => p.guest === 22)?.host;
  const keyFile = path.join(dir, 'ssh', 'id_ed25519');
  if (!port || !fs.existsSync(keyFile))
    throw coded('ERR_MICROVM_SSH_UNAVAILABLE', `${name} has no guest agent and was not started with --ssh`);
  if (values.interactive || values.tty || values.workdir || values.user)
    throw new UsageError('-i, -t, -w and -u need the guest agent (QEMU backend); this VM has SSH only');
  const client = await SshClient.connect({
    host: '127.0.0.1',
    port,
    username: 'root',
    privateKey: fs.readFileSync(keyFile, 'utf8'),
    hostKey: { knownHostsFile: path.join(dir, 'ssh', 'known_hosts') },
  });
  try {
    const quoted = words
      .map((w) => (/^[A-Za-z0-9_./:=@%+-]+$/.test(w) ? w : `'${w.replace(/'/g, `'\\''`)}'`))
      .join(' ');
    const r = await client.exec(quoted, { env });
    if (json) out(r, '');
    else {
      process.stdout.write(r.stdout);
      process.stderr.write(r.stderr);
    }
    return r.exitCode ?? 128 + 15;
  } finally {
    client.close();
  }
}

/** `microvm cp SRC DST`, one side NAME:/path. */
export async function cmdCp(c: CommandContext): Promise<number> {
  const { positional, dataDir, out } = c;
  if (positional.length !== 2) throw new UsageError('cp takes SRC DST, one of them NAME:/path');
  const isVm = (n: string): boolean => fs.existsSync(vmDirOf(dataDir, n));
  const [src, dst] = positional.map((p) => parseCpSide(p, isVm));
  if ('vm' in src === 'vm' in dst) {
    // NAME:/path where no VM has that name: say so rather than "one side is NAME:/path".
    const named = positional.map((p) => new RegExp(`^(${VM_NAME_PART}):/`).exec(p)?.[1]).find(Boolean);
    if (named && !('vm' in src) && !('vm' in dst))
      throw coded('ERR_MICROVM_VM_NOT_FOUND', `no VM named ${named} (cp ${positional.join(' ')})`);
    throw new UsageError('cp copies between a VM and the host: one side is NAME:/path');
  }
  // Ctrl-C / SIGTERM: the copy ends at once (whatever the agent does), nothing partial is left,
  // and we exit 128+N.
  const copied = await untilInterrupted((signal) =>
    copyBetween(
      src,
      dst,
      async (name) => {
        const dir = vmDir(dataDir, name);
        const st = readState(dir);
        if (!st || !isRecordedProcess(st)) throw coded('ERR_MICROVM_VM_NOT_FOUND', `no running VM named ${name}`);
        if (isPaused(dir)) throw pausedError(name);
        const agent = await connectVmAgent(dir, st.agentAcceptsLate === true);
        if (!agent) throw coded('ERR_MICROVM_AGENT_UNAVAILABLE', `${name} has no guest agent`);
        return agent;
      },
      signal,
    ),
  );
  if ('interrupted' in copied) {
    process.stderr.write(`microvm: cp interrupted by ${copied.interrupted}; nothing partial was left\n`);
    return 128 + signalNumber(copied.interrupted);
  }
  out({ copied: true }, '');
  return 0;
}
