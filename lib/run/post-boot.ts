/** PostBoot (stage microvm.PostBoot): the agent's hello, SSH readiness, waitFor and hooks, each racing the VM's end. */

import * as fs from 'node:fs';
import * as path from 'node:path';
import type { BackendHandle } from '../backends/types';
import { MicrovmError } from '../errors';
import { readTail } from '../file-tail';
import { waitFor } from '../wait-for';
import { type SshKeyPair, writeKeyPair } from '../ssh/keys';
import { waitForReady } from '../ssh/wait-ready';
import { AgentClient } from '../agent/client';
import { ATTR, SPAN } from '../telemetry/attributes';
import { inSpan, type SpanScope } from '../telemetry/tracer';
import { MicroVM, VM_ENDED } from '../vm';
import type { NormalizedRunOptions } from './options';
import { AGENT_FAILURE_PHRASES, CONSOLE_PREFIX } from '../guest/protocol';
import { guestBlock, guestLines } from '../guest/text';

/** The last lines of a guest output file for an error message (the VM's directory is removed after). */
export function outputTail(file: string, label: string): string {
  return guestBlock(label, readTail(file, 2000)?.toString('utf8') ?? '', 6);
}

/** An agent that will not come: the guest's init said so on the console (libkrun). */
export class AgentNotStarted extends MicrovmError {}

/**
 * What our init said on the console when it could not start the agent (under libkrun it cannot
 * report otherwise), as an error; undefined while it said nothing of the kind. The console is the
 * guest's: only the init's own fixed phrases are looked for, and the line is cut and made printable.
 */
export function agentNotStarted(consoleLogPath: string): AgentNotStarted | undefined {
  const text = readTail(consoleLogPath, 16 * 1024)?.toString('utf8') ?? '';
  const said = new RegExp(`^${CONSOLE_PREFIX}(?:${AGENT_FAILURE_PHRASES.join('|')})[^\\r\\n]*`, 'm').exec(text);
  if (!said) return undefined;
  const line = guestLines(said[0], 1)[0] ?? '';
  return new AgentNotStarted(
    'ERR_MICROVM_AGENT_UNAVAILABLE',
    `The guest's init could not start the agent: ${line} (see ${consoleLogPath})`,
  );
}

/** What PostBoot works with: run()'s options, the started VM, and how its wait ends. */
export interface PostBootContext {
  o: Pick<NormalizedRunOptions, 'agent' | 'waitFor' | 'postBoot'>;
  vm: MicroVM;
  started: BackendHandle;
  vmDir: string;
  consoleLogPath: string;
  /** The caller's signal. */
  signal: AbortSignal | undefined;
  /** The caller's signal or the VM's end, whichever comes first. */
  postBootSignal: AbortSignal;
  /** Aborted when the VM ends, with the reason. */
  life: AbortController;
  /** What a failed run() undoes. */
  undo: Array<() => Promise<void>>;
  sshSetup: SshSetup | undefined;
}

/** run({ ssh }): the key, the forwarded port and how long to wait. */
export interface SshSetup {
  key: SshKeyPair;
  hostPort: number;
  user: string;
  timeoutMs: number;
  waitReady: boolean;
}

export async function runPostBoot(inner: SpanScope, c: PostBootContext): Promise<void> {
  const { o, vm, started, vmDir, consoleLogPath, signal, postBootSignal, life, undo, sshSetup } = c;
  if (o.agent && started.agentSocketPath) {
    const socketPath = started.agentSocketPath;
    const timeoutMs = o.agent.timeoutMs;
    await inSpan(inner, SPAN.AGENT_WAIT_READY, { [ATTR.AGENT_SOCKET]: socketPath }, async (span) => {
      let client: AgentClient;
      try {
        client = await AgentClient.connect(socketPath, {
          timeoutMs,
          signal: postBootSignal,
          acceptsLate: started.agentAcceptsLate,
          notComing: () => agentNotStarted(consoleLogPath),
        });
      } catch (err) {
        // The channel closes when QEMU exits, a moment before the VM's end is known: wait for it.
        if ((err as MicrovmError).code === 'ERR_MICROVM_AGENT_UNAVAILABLE' && !(err instanceof AgentNotStarted)) {
          let timer: NodeJS.Timeout | undefined;
          await Promise.race([vm[VM_ENDED](), new Promise((r) => (timer = setTimeout(r, 2000)))]);
          clearTimeout(timer);
        }
        // A command that ended by itself before the agent answered is no failure of run():
        // vm.wait() tells how it ended, as without an agent.
        if (!signal?.aborted && vm.status().reason === 'exited') {
          span.setAttribute(ATTR.AGENT_READY, false);
          return;
        }
        if (life.signal.aborted && !signal?.aborted) throw life.signal.reason;
        throw err;
      }
      // A socket the backend did not make itself (libkrun makes it with the runner's umask: others
      // could not write to it, and the VM's directory is 0700) is made private all the same.
      if (started.agentAcceptsLate) fs.chmodSync(socketPath, 0o600);
      span.setAttribute(ATTR.AGENT_READY, true);
      span.setAttribute(ATTR.AGENT_UPTIME_MS, Math.round(client.hello.uptimeNs / 1e5) / 10);
      undo.push(async () => client.close());
      vm.attachAgent(socketPath, client, started.agentAcceptsLate === true);
    });
  }
  if (sshSetup) {
    const sshDir = path.join(vmDir, 'ssh');
    writeKeyPair(sshSetup.key, sshDir);
    if (sshSetup.waitReady) {
      vm.ssh = await waitForReady(
        {
          host: '127.0.0.1',
          port: sshSetup.hostPort,
          username: sshSetup.user,
          privateKey: sshSetup.key.privateKey,
          hostKey: { knownHostsFile: path.join(sshDir, 'known_hosts') },
          timeoutMs: sshSetup.timeoutMs,
          signal: postBootSignal,
        },
        inner,
      );
      undo.push(async () => vm.ssh?.close());
    }
  }
  const target = {
    name: vm.name,
    port: (guest: number) => vm.port(guest),
    stdoutPath: vm.stdoutPath,
    stderrPath: vm.stderrPath,
    consoleLogPath: vm.consoleLogPath,
    tcpForwardState: started.tcpForwardState?.bind(started),
  };
  for (const w of o.waitFor) await waitFor(w, target, inner, postBootSignal);
  // A hook need not watch the signal itself: the VM's end (or the caller's abort) ends the wait.
  let onAbort: (() => void) | undefined;
  const ended = new Promise<never>((_, reject) => {
    onAbort = (): void => reject(postBootSignal.reason);
    if (postBootSignal.aborted) onAbort();
    else postBootSignal.addEventListener('abort', onAbort, { once: true });
  });
  ended.catch(() => undefined);
  try {
    for (const hook of o.postBoot) {
      postBootSignal.throwIfAborted();
      await Promise.race([hook(vm, inner), ended]);
    }
  } finally {
    if (onAbort) postBootSignal.removeEventListener('abort', onAbort);
  }
}
