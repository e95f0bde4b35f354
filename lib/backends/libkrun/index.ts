/**
 * The libkrun backend. BackendPrepare writes `/.krun_config.json` (read by libkrun's built-in guest
 * init: Cmd, Env, WorkingDir) into the VM's writable layer, and our guest init beside it: Cmd
 * becomes `/.microvm/init --agent-listen=vsock:PORT -- CMD...`, which starts the guest agent on that
 * vsock port and then becomes CMD (native/guest/init.cc). backend.Start resolves libkrun and the
 * runner (microvm.backend.ResolveRuntime) and libkrunfw (microvm.backend.ResolveFirmware), builds
 * the launch plan (the agent's port bridged to `agent.sock` in the VM's directory, libkrun
 * listening), dry-runs it in-process against the real libkrun, and starts the runner, which
 * mounts the overlay root (when cloned that way), configures libkrun and calls krun_start_enter.
 */
import { kvmCheck, probeCheck } from '../../preflight/checks';
import { guestLines } from '../../guest/text';
import { AGENT_VSOCK_PORT, GUEST_CONFIG_PATH, INIT_ARG } from '../../guest/protocol';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MicrovmError } from '../../errors';
import { buildLaunchPlan, type LaunchPlanInput, validateLaunchPlan } from './plan';
import { FIRMWARE_INSTALL_HINT, resolveFirmware, type ResolveFirmwareOptions } from '../../resolve/firmware';
import { LIBKRUN_INSTALL_HINT, resolveRuntime, type ResolveRuntimeOptions } from '../../resolve/runtime';
import { rootfsContext } from '../../rootfs/hooks';
import { parseRunnerError, readTail, type RunnerExitStatus, runnerFailure, startRunner } from './runner';
import { ATTR, SPAN } from '../../telemetry/attributes';
import { inSpan } from '../../telemetry/tracer';
import { guestConfig } from '../guest-config';
import { type GuardFiles, guardRefusal, writeGuardPolicy } from '../../network/egress';
import { planEgress } from '../../network/policy';
import type { Backend, BackendHandle, BackendPrepareInput, BackendStartInput, VmExit } from '../types';
import { STOP_SIGNALS } from '../types';
import { AGENT_SOCKET, GUEST_INIT_PATH, injectGuestInit } from '../guest-init';

/**
 * The guest port the agent listens on (vsock); libkrun bridges the VM directory's `agent.sock` to it.
 * A high port, away from the ones TSI takes for the guest's own listening sockets.
 */
export { AGENT_VSOCK_PORT } from '../../guest/protocol';

/** Cmd for libkrun's init: our init starts the agent, then becomes the command. */
export function agentCommand(cmd: readonly string[]): string[] {
  return [GUEST_INIT_PATH, `${INIT_ARG.agentListen}vsock:${AGENT_VSOCK_PORT}`, '--', ...cmd];
}

/** Options of {@link libkrunBackend}. */
export interface LibkrunBackendOptions {
  runtime?: ResolveRuntimeOptions;
  firmware?: ResolveFirmwareOptions;
  /** Dry-run the plan in-process before starting the runner. Default true. */
  validatePlan?: boolean;
  /** Environment of the runner process. Default: process.env. */
  env?: NodeJS.ProcessEnv;
  /**
   * Tie the VM to this process (default true), as the QEMU backend does: the runner dies with it
   * (PR_SET_PDEATHSIG) and keeps its event loop alive while the VM runs. `false` lets the VM
   * outlive this process (`microvm run -d`): it runs until stopped.
   */
  dieWithParent?: boolean;
}

/** libkrun log lines that say the VMM (not the guest) failed. */
const VMM_FAILURE = /\bERROR\b|KVM_EXIT_|panicked at|Couldn't find or load/;

/**
 * How a libkrun VM ended. The VMM exits with the guest's code, but a VMM failure (for example
 * KVM_EXIT_INTERNAL_ERROR) also exits, with code 1: the two are told apart by the VMM's own error
 * lines in the runner's log (logged at level 'error' and above, the default). A VMM failure that
 * logs nothing at that level cannot be told from a guest exit 1.
 */
export function classifyRunnerExit(
  status: RunnerExitStatus,
  log: string,
  logPath: string,
  sent: NodeJS.Signals | undefined,
): VmExit {
  if (sent) return { reason: 'stopped', exitCode: null, signal: sent };
  if (status.signal && STOP_SIGNALS.has(status.signal))
    return { reason: 'stopped', exitCode: null, signal: status.signal };
  const lines = guestLines(log, Infinity).map((l) => l.trim());
  const last = lines
    .slice(-12)
    .map((l) => `  ${l}`)
    .join('\n');
  if (status.signal) {
    return {
      reason: 'failed',
      exitCode: null,
      signal: status.signal,
      error: new MicrovmError(
        'ERR_MICROVM_HYPERVISOR_FAILED',
        `The libkrun VMM was killed by ${status.signal}; see ${logPath}:\n${last}`,
      ),
    };
  }
  // krun_start_enter returned after "configured": the runner's JSON error line says why.
  if (parseRunnerError(log)) {
    const error = runnerFailure(status, log, logPath);
    return {
      reason: 'failed',
      exitCode: null,
      signal: null,
      error: error instanceof MicrovmError ? error : new MicrovmError('ERR_MICROVM_RUNNER_FAILED', error.message),
    };
  }
  const vmm = lines.filter((l) => VMM_FAILURE.test(l));
  if (status.code !== 0 && vmm.length > 0) {
    return {
      reason: 'failed',
      exitCode: null,
      signal: null,
      error: new MicrovmError(
        'ERR_MICROVM_HYPERVISOR_FAILED',
        `The libkrun VMM failed (exit ${String(status.code)}): ${vmm[vmm.length - 1]}\nSee ${logPath}:\n${last}`,
      ),
    };
  }
  return { reason: 'exited', exitCode: status.code ?? 0, signal: null };
}

/**
 * The egress filter's policy for a policy other than 'allow' (written to the VM's directory), or
 * undefined. 'deny' is a policy with no rules; an `address` override needs the QEMU backend's relays.
 */
function egressGuard(input: BackendStartInput): GuardFiles | undefined {
  const { filterRules, addressOverride: overridden } = planEgress(input.egress);
  if (!filterRules) return undefined;
  if (overridden)
    throw new MicrovmError(
      'ERR_MICROVM_EGRESS_UNSUPPORTED',
      `egress rule for ${overridden.host ?? ''} gives an address: that needs the QEMU backend's relays (libkrun resolves names through the guest's DNS)`,
    );
  return writeGuardPolicy(input.dataDir, filterRules, { relayHosts: false });
}

/** Creates the libkrun backend. */
export function libkrunBackend(options: LibkrunBackendOptions = {}): Backend {
  return {
    name: 'libkrun',
    supportsOverlay: true,
    // TSI makes the guest's connections with the runner's own connect()/sendto(): the egress filter
    // linked into the runner (native/preload/net_guard.cc) decides them, with the policy start() writes.
    egressPolicies: ['allow', 'deny', 'allow-list'],
    networkName: 'tsi',
    needsOverrideStat: true,
    // 'deny' too goes through the filter in the runner, which logs each refusal.
    egressLogged: (policy) => planEgress(policy).mode !== 'allow',
    preflightChecks: () => [
      kvmCheck(),
      probeCheck('libkrun', 'libkrun 1.x can be loaded', LIBKRUN_INSTALL_HINT, () => resolveRuntime()),
      probeCheck('libkrunfw', 'libkrunfw 5 can be loaded', FIRMWARE_INSTALL_HINT, () => resolveFirmware()),
    ],
    detached: () => libkrunBackend({ ...options, dieWithParent: false }),
    async prepareRootfs(input: BackendPrepareInput): Promise<void> {
      const config = guestConfig(input);
      config.Cmd = agentCommand(config.Cmd);
      const ctx = rootfsContext(input.vmId, input.rootfs);
      ctx.writeFile(GUEST_CONFIG_PATH, `${JSON.stringify(config)}\n`, { mode: 0o644 });
      injectGuestInit(ctx);
    },
    async start(input: BackendStartInput): Promise<BackendHandle> {
      return inSpan(input.scope, SPAN.BACKEND_START, { [ATTR.BACKEND]: 'libkrun' }, async (span, scope) => {
        const runtime = await inSpan(scope, SPAN.BACKEND_RESOLVE_RUNTIME, undefined, async (s) => {
          const rt = await resolveRuntime(options.runtime);
          s.setAttribute(ATTR.RUNTIME_LIBKRUN_PATH, rt.libkrunPath);
          s.setAttribute(ATTR.RUNTIME_RUNNER_PATH, rt.runnerPath);
          return rt;
        });
        const firmware = await inSpan(scope, SPAN.BACKEND_RESOLVE_FIRMWARE, undefined, async (s) => {
          const fw = await resolveFirmware({ runtimeLibDir: runtime.libDir, ...options.firmware });
          s.setAttribute(ATTR.FIRMWARE_PATH, fw.path);
          s.setAttribute(ATTR.FIRMWARE_ABI, fw.abiVersion);
          return fw;
        });
        const agentSock = path.join(input.dataDir, AGENT_SOCKET);
        fs.rmSync(agentSock, { force: true }); // libkrun refuses a path that exists (-EEXIST)
        const planInput: LaunchPlanInput = {
          libkrunPath: runtime.libkrunPath,
          firmwarePath: firmware.path,
          logLevel: input.logLevel as LaunchPlanInput['logLevel'],
          cpus: input.cpus,
          memoryMiB: input.memoryMiB,
          root: input.rootfs.rootPath,
          consoleOutput: input.consoleLogPath,
          virtiofs: input.virtiofs.map(({ tag, hostPath, readOnly }) => ({ tag, hostPath, readOnly })),
          // The guest agent's channel: libkrun listens on the socket and connects each client to
          // the agent's vsock port in the guest.
          vsockPorts: [{ port: AGENT_VSOCK_PORT, path: agentSock, listen: true }],
        };
        if (input.rootfs.overlay) planInput.overlay = input.rootfs.overlay;
        if (input.network) {
          planInput.net = [{ kind: input.network.kind, path: input.network.socketPath, mac: input.network.mac }];
        } else {
          planInput.portMap = input.ports;
        }
        const plan = buildLaunchPlan(planInput);
        if (options.validatePlan !== false) await validateLaunchPlan(plan);
        input.signal?.throwIfAborted();
        const guard = egressGuard(input);
        const tied = options.dieWithParent !== false;
        const runner = await startRunner({
          runnerPath: runtime.runnerPath,
          plan,
          logPath: input.logPath,
          dieWithParent: tied,
          env: guard ? { ...(options.env ?? process.env), MICROVM_NETGUARD_POLICY: guard.policy } : options.env,
          signal: input.signal,
        });
        if (guard) {
          // The runner's constructors ran before it read the plan: its filter has said whether it
          // applies the policy. If not, the VM goes now (the filter refuses everything meanwhile).
          const why = guardRefusal(guard);
          if (why !== undefined) {
            runner.kill('SIGKILL');
            await runner.exited;
            throw new MicrovmError(
              'ERR_MICROVM_EGRESS_GUARD',
              `The runner's egress filter did not apply the policy (${why || 'it said nothing'}); the VM was stopped rather than run with an open network.`,
            );
          }
        }
        span.setAttribute(ATTR.VM_PID, runner.pid);
        // startRunner lets a detached runner go; one tied to this process holds it like a child.
        if (tied) runner.ref();
        let sent: NodeJS.Signals | undefined;
        const exited = runner.exited.then((status) =>
          classifyRunnerExit(status, readTail(input.logPath, runner.logStart), input.logPath, sent),
        );
        const kill = (sig: NodeJS.Signals): boolean => {
          const ok = runner.kill(sig);
          if (ok) sent = sig;
          return ok;
        };
        return {
          pid: runner.pid,
          executable: runtime.runnerPath,
          exited,
          kill,
          ref: () => runner.ref(),
          unref: () => runner.unref(),
          agentSocketPath: agentSock,
          // Until the guest's agent listens, libkrun closes each connection at once: keep trying.
          agentAcceptsLate: true,
        };
      });
    },
  };
}
