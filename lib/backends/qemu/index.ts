/**
 * The QEMU backend: boots the libkrunfw kernel (the one libkrun runs) under QEMU's `microvm`
 * machine, on the same virtio-fs root libkrun would serve, with hardware KVM when the host has it
 * (lib/host/kvm.ts tells it from a PVM or otherwise software /dev/kvm) and TCG (software emulation)
 * otherwise. So `run()` works on any Linux host, KVM or not.
 *
 * Processes: Node -> the native launcher (`microvm-runner --qemu-plan-fd`, native/runner/qemu_launch.cc),
 * which reads a plan (lib/backends/qemu/launch.ts), enters a private mount namespace (and a user
 * namespace when not root), mounts the overlay root, makes every socket, starts virtiofsd, the
 * relay and the log sink on them and becomes QEMU. With a parent-death signal (unless detached)
 * they die with the Node process, even on `kill -9`, and share one process group for stop().
 *
 * The guest runs `microvm-guest-init` (native/guest/init.cc) as PID 1, which reads
 * /.krun_config.json like libkrun's init, says "UP" on the virtio-serial port "microvm.exit" as soon
 * as it runs, gives the command the ports "microvm.stdout"/"microvm.stderr" as its stdout/stderr
 * (no tty: no CRLF, no kernel messages mixed in), and reports the command's exit status as
 * "EXIT <code>"; the backend then stops QEMU (a guest poweroff hangs with this kernel).
 *
 * Watching: the backend never waits on what it does not watch. From launch to the end it watches
 * the QEMU process, QMP (a STOP that leaves the guest paused — a KVM emulation failure does that
 * and QEMU stays alive —, GUEST_PANICKED, SHUTDOWN) and, until the init said UP, a boot deadline.
 * Any of them ends the VM at once with a coded error carrying QEMU's and the console's last lines.
 * When 'auto' chose KVM and the VM fails before UP, it is retried once under TCG and the verdict is
 * recorded for this host boot, so later runs use TCG at once.
 */
import { netGuardPath, relayScript } from './shipped';
import { probeCheck } from '../../preflight/checks';
import { dataRootOf, vmFile } from '../../vm-dir';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { trace } from '@opentelemetry/api';
import { MicrovmError } from '../../errors';
import { parseAccel, recordKvmVerdict } from '../../host/kvm';
import { guardRefusal, writeGuardPolicy } from '../../network/egress';
import { planEgress } from '../../network/policy';
import { resolveRunner } from '../../resolve/runtime';
import { FIRMWARE_INSTALL_HINT, resolveFirmware } from '../../resolve/firmware';
import { rootfsContext } from '../../rootfs/hooks';
import { ATTR, EVENT, SPAN } from '../../telemetry/attributes';
import { inSpan } from '../../telemetry/tracer';
import { guestConfig } from '../guest-config';
import { injectGuestInit } from '../guest-init';
import { CONFIG_KEY, GUEST_CONFIG_PATH, PORT } from '../../guest/protocol';
import type { Backend, BackendHandle, BackendPrepareInput, BackendStartInput, VmExit } from '../types';
import { STOP_SIGNALS } from '../types';
import { pvhKernelFor } from './kernel';
import { launchFiles, qemuLaunch } from './launch';
import { QmpClient } from './qmp';

import { GUEST_CLOCK_FILE, writeGuestClock } from '../../log-times';
import { sinkFinished } from '../../output-status';

import { emitGuestSpans, parseMilestones } from '../../telemetry/guest';
import { typeError } from '../../validate';
import type { MicrovmErrorCode } from '../../errors/codes';
import { hostTscKhz, type QemuBackendOptions, type QemuRuntime, resolveQemuRuntime } from './runtime';
import { lastLines, readExitPort, resolverMissing, tail, usernetState } from './guest-report';

export { checkFileServer, hostTscKhz, type QemuBackendOptions, type QemuRuntime, resolveQemuRuntime } from './runtime';
export { lastLines, readExitPort, resolverMissing, usernetState } from './guest-report';

export { fsGuardPath, netGuardPath } from './shipped';

const SIGNAL_NAMES = new Map(Object.entries(os.constants.signals).map(([name, n]) => [n, name as NodeJS.Signals]));

/** A failure before the guest init said UP: the start failed (and 'auto' may fall back to TCG). */
class BootFailure extends MicrovmError {
  /** The guest reset itself (QMP SHUTDOWN guest-reset/guest-panic) before its init ran. */
  guestReset = false;
}

/** Creates the QEMU backend. */
export function qemuBackend(options: QemuBackendOptions = {}): Backend {
  if (options.accel !== undefined) parseAccel('accel', options.accel);
  if (
    options.extraArgs !== undefined &&
    (!Array.isArray(options.extraArgs) || options.extraArgs.some((a) => typeof a !== 'string'))
  ) {
    throw typeError('Expected an array of strings for extraArgs');
  }
  const backend: Backend = {
    name: 'qemu',
    supportsOverlay: true,
    takesAccel: true,
    networkName: 'qemu-user',
    // 'deny' is restricted networking (nothing to log); rules go through relays or the filter.
    egressLogged: (policy) => planEgress(policy).mode === 'allow-list',
    preflightChecks: ({ egress }) => [
      probeCheck(
        'qemu',
        'qemu-system-x86_64, virtiofsd and the guest init are present',
        'apt-get install qemu-system-x86 (Debian 12 includes virtiofsd); npm rebuild node-microvm',
        async () => resolveQemuRuntime(),
      ),
      // Rules beyond relayed names need the egress filter in QEMU: without it, no start (never open).
      ...(planEgress(egress).needsFilter
        ? [
            probeCheck(
              'egress-filter',
              'the egress filter (microvm-netguard.so) is present',
              'npm rebuild node-microvm (in a checkout: npm run build:native)',
              async () => netGuardPath(),
            ),
          ]
        : []),
      probeCheck('libkrunfw', 'libkrunfw 5 can be loaded', FIRMWARE_INSTALL_HINT, () => resolveFirmware()),
    ],
    detached: () => qemuBackend({ ...options, dieWithParent: false }),
    // 'deny': slirp's restrict=on, in the QEMU process on the host: the guest's packets go nowhere
    // (not the host, not its resolver, not the internet); hostfwd (published ports) still works.
    egressPolicies: ['allow', 'deny', 'allow-list'],
    async prepareRootfs(input: BackendPrepareInput): Promise<void> {
      const ctx = rootfsContext(input.vmId, input.rootfs);
      // MicrovmPorts: the ports start() gives the guest, which its init waits for.
      const hosts = planEgress(input.egress).virtualHosts;
      const config = {
        ...guestConfig(input),
        [CONFIG_KEY.ports]: [
          PORT.stdout,
          PORT.stderr,
          ...(input.outputTimes === false ? [] : [PORT.logTimes]),
          PORT.agent,
        ],
        // An egress allow-list's names, at their virtual addresses (lib/network/egress.ts); the
        // init adds them to /etc/hosts.
        ...(hosts ? { [CONFIG_KEY.hosts]: hosts.map((h) => [h.ip, h.host]) } : {}),
      };
      ctx.writeFile(GUEST_CONFIG_PATH, `${JSON.stringify(config)}\n`, { mode: 0o644 });
      injectGuestInit(ctx);
      // The resolver is QEMU's (10.0.2.3) when the image names none. Written here rather than by
      // the guest's init: a file made through virtio-fs costs the init 7-17 ms of round trips to
      // the host under TCG, before the agent can start. A symlink (or anything but a regular file)
      // is the image's business and is left alone, as is a file with content.
      if (resolverMissing(input.rootfs)) ctx.writeFile('/etc/resolv.conf', 'nameserver 10.0.2.3\n', { mode: 0o644 });
    },
    async start(input: BackendStartInput): Promise<BackendHandle> {
      const spawnSpan = trace.getSpan(input.scope.ctx);
      return inSpan(input.scope, SPAN.BACKEND_START, { [ATTR.BACKEND]: 'qemu' }, async (span, scope) => {
        const dataRoot = dataRootOf(input.dataDir);
        const rt = await inSpan(scope, SPAN.BACKEND_RESOLVE_RUNTIME, undefined, (s) => {
          const r = resolveQemuRuntime(options, dataRoot);
          s.setAttribute(ATTR.RUNTIME_RUNNER_PATH, r.qemuPath);
          s.setAttribute(ATTR.QEMU_ACCEL, r.accel);
          s.setAttribute(ATTR.QEMU_ACCEL_REASON, r.reason);
          return r;
        });
        const kernel = await inSpan(scope, SPAN.BACKEND_RESOLVE_FIRMWARE, undefined, async (s) => {
          const fw = await resolveFirmware(options.firmware);
          s.setAttribute(ATTR.FIRMWARE_PATH, fw.path);
          s.setAttribute(ATTR.FIRMWARE_ABI, fw.abiVersion);
          return pvhKernelFor(fw, options.kernelCacheDir ?? path.join(dataRoot, 'kernels'));
        });
        if (input.network)
          throw new MicrovmError(
            'ERR_MICROVM_QEMU_NETWORK',
            'The QEMU backend uses QEMU user networking; network providers are not supported',
          );
        input.signal?.throwIfAborted();
        span.setAttribute(ATTR.QEMU_ACCEL, rt.accel);
        // A guest that reset itself before its init ran ran nothing of the caller's: boot it once
        // more (seen rarely under TCG on a loaded 2-CPU machine, with no console output).
        const bootOnce = async (accel: 'kvm' | 'tcg'): Promise<BackendHandle> => {
          try {
            return await boot(rt, accel, kernel, input);
          } catch (err) {
            if (!(err instanceof BootFailure) || !err.guestReset || input.signal?.aborted) throw err;
            spawnSpan?.addEvent(EVENT.BOOT_RETRY, {
              [ATTR.QEMU_ACCEL]: accel,
              [ATTR.ERROR_TYPE]: err.code,
              'exception.message': err.message.split('\n')[0],
            });
            return boot(rt, accel, kernel, input);
          }
        };
        try {
          const h = await bootOnce(rt.accel);
          span.setAttribute(ATTR.VM_PID, h.pid);
          return h;
        } catch (err) {
          if (!(err instanceof BootFailure) || rt.accel !== 'kvm' || !rt.automatic || input.signal?.aborted) throw err;
          // 'auto' chose hardware KVM and it could not boot the guest: remember it for this host
          // boot, then boot under TCG.
          recordKvmVerdict(dataRoot, err.message.split('\n')[0], options.hostProbe);
          spawnSpan?.addEvent(EVENT.ACCEL_FALLBACK, {
            [ATTR.QEMU_ACCEL]: 'tcg',
            'microvm.qemu.accel.from': 'kvm',
            [ATTR.QEMU_ACCEL_REASON]: err.message.split('\n')[0],
            [ATTR.ERROR_TYPE]: err.code,
          });
          span.setAttribute(ATTR.QEMU_ACCEL, 'tcg');
          const h = await bootOnce('tcg');
          span.setAttribute(ATTR.VM_PID, h.pid);
          return h;
        }
      });
    },
  };
  return backend;

  /** One launch of QEMU with `accel`; resolves once the guest init said UP. */
  async function boot(
    rt: QemuRuntime,
    accel: 'kvm' | 'tcg',
    kernel: string,
    input: BackendStartInput,
  ): Promise<BackendHandle> {
    // Rules beyond relayed names: the egress filter, preloaded into QEMU, decides what leaves it
    // (native/preload/net_guard.cc); its policy file, and the file where it says it loaded it.
    const egress = planEgress(input.egress);
    const guard =
      egress.needsFilter && egress.filterRules ? writeGuardPolicy(input.dataDir, egress.filterRules) : undefined;
    const hostEnv: Record<string, string> = { PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin' };
    for (const k of ['MICROVM_FSGUARD_LOG', 'MICROVM_RELAY_MAX_CONNECTIONS', 'MICROVM_RELAY_IDLE_MS']) {
      const value = process.env[k];
      if (value !== undefined) hostEnv[k] = value;
    }
    const launch = qemuLaunch(input, {
      qemuPath: rt.qemuPath,
      virtiofsdPath: rt.virtiofsdPath,
      fsGuard: rt.fsGuard,
      runnerPath: resolveRunner(),
      kernel,
      accel,
      tscKhz: hostTscKhz(),
      extraArgs: options.extraArgs,
      netGuard: guard ? { library: netGuardPath(), policy: guard.policy } : undefined,
      relay: { node: process.execPath, script: relayScript() },
      env: hostEnv,
    });
    const files = launchFiles(input.dataDir);
    const qmpSock = files.qmpSocket;
    const exitFile = files.exitFile;
    const agentSock = files.agentSocket;
    const clockFile = path.join(input.dataDir, GUEST_CLOCK_FILE);
    // What an earlier start left: every socket the launcher makes, and the files it writes.
    const sinkSockets = ((launch.plan.sink as { streams: { socket: string }[] }).streams ?? []).map((x) => x.socket);
    for (const f of [
      files.rootSocket,
      qmpSock,
      files.controlSocket,
      vmFile(input.dataDir, 'paused'),
      exitFile,
      agentSock,
      files.timesFile,
      clockFile,
      files.relaySocket,
      ...sinkSockets,
      ...input.virtiofs.map((_, n) => files.shareSocket(n)),
      input.consoleLogPath,
      input.stdoutPath,
      input.stderrPath,
    ])
      fs.rmSync(f, { force: true });
    for (const m of launch.mountPoints) fs.mkdirSync(m, { recursive: true });
    if (launch.relayRules) fs.writeFileSync(launch.relayRules.path, launch.relayRules.text, { mode: 0o600 });
    // The launcher (native/runner/qemu_launch.cc) reads its plan on fd 3, then becomes QEMU: its pid is
    // QEMU's, its process group the VM's (with virtiofsd and the relay).
    const logFd = fs.openSync(input.logPath, 'a', 0o640);
    const child = spawn(
      resolveRunner(),
      ['--qemu-plan-fd', '3', ...(options.dieWithParent === false ? [] : ['--die-with-parent'])],
      { stdio: ['ignore', logFd, logFd, 'pipe'], detached: true, env: hostEnv },
    );
    fs.closeSync(logFd);
    const planPipe = child.stdio[3] as import('node:stream').Writable;
    planPipe.on('error', () => undefined); // a launcher that died early says why in vm.log
    planPipe.end(JSON.stringify(launch.plan));

    // What is known about this VM so far; `exited` classifies the end from it.
    let up = false;
    let guestCode: number | undefined;
    let sent: NodeJS.Signals | undefined; // the last signal this handle sent (stop())
    let failure: MicrovmError | undefined;
    let shutdownReason: string | undefined;
    let qmp: QmpClient | undefined;
    const processExit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
      child.once('exit', (code, signal) => resolve({ code, signal }));
      child.once('error', () => resolve({ code: null, signal: null }));
    });
    let running = true;
    const signalGroup = (sig: NodeJS.Signals): boolean => {
      if (!running) return false;
      try {
        process.kill(-(child.pid as number), sig);
        return true;
      } catch {
        return false;
      }
    };
    const what = `QEMU (accel ${accel})`;
    const advice =
      accel === 'kvm'
        ? " KVM could not run this guest on this host; use accel 'tcg' (--accel tcg, MICROVM_ACCEL=tcg) or 'auto'."
        : ` See ${input.logPath}.`;
    /** Ends the VM because the hypervisor failed; the first failure wins. */
    const fail = (code: MicrovmErrorCode, message: string): void => {
      if (failure || guestCode !== undefined || sent) return;
      const Kind = up ? MicrovmError : BootFailure;
      failure = new Kind(code, `${message}${advice}${lastLines(input)}`);
      signalGroup('SIGKILL');
    };
    const exited: Promise<VmExit> = processExit.then(async (status) => {
      running = false;
      qmp?.close();
      // The output files are complete once the sink wrote what QEMU sent last; then the guest's
      // last report (it ends the VM itself once it reported its exit) is read.
      await sinkFinished(input.dataDir);
      readPort();
      if (guestCode !== undefined) return { reason: 'exited', exitCode: guestCode, signal: null };
      if (failure) return { reason: 'failed', exitCode: null, signal: status.signal, error: failure };
      if (sent) return { reason: 'stopped', exitCode: null, signal: sent };
      // Not by us: QEMU logs "terminating on signal N" when someone else stopped it.
      const m = /terminating on signal (\d+)/.exec(tail(input.logPath, 2000));
      const by = m ? SIGNAL_NAMES.get(Number(m[1])) : (status.signal ?? undefined);
      if (by && STOP_SIGNALS.has(by)) return { reason: 'stopped', exitCode: null, signal: by };
      const how = status.signal ? `was killed by ${status.signal}` : `exited with code ${String(status.code)}`;
      const why =
        shutdownReason === 'guest-reset' || shutdownReason === 'guest-panic'
          ? ` after the guest kernel reset itself (${shutdownReason}: a kernel panic reboots with panic=-1)`
          : '';
      const Kind = up ? MicrovmError : BootFailure;
      const before = up
        ? 'before the guest command reported its exit status'
        : 'before the guest booted (its init never ran)';
      const error = new Kind(
        up ? 'ERR_MICROVM_HYPERVISOR_FAILED' : 'ERR_MICROVM_BOOT_FAILED',
        `${what} ${how}${why} ${before}.${advice}${lastLines(input)}`,
      );
      if (error instanceof BootFailure) error.guestReset = why !== '';
      return { reason: 'failed', exitCode: null, signal: status.signal, error };
    });

    // The guest's words on the microvm.exit port: UP, milestones (T <name> <ns>), then EXIT <code>
    // (then stop QEMU). Read on every change of the file (inotify) and on a 20 ms poll besides.
    let upSeenAt: number | undefined; // performance.now() when UP was first read (maps the guest clock)
    let guestSpans = false;
    let clockWritten = false;
    const emitGuest = (text: string, final: boolean): void => {
      if (guestSpans || upSeenAt === undefined || !input.guestScope) return;
      const m = parseMilestones(text);
      if (m.exec === undefined && !final) return; // wait for the init to reach its last milestone
      guestSpans = true;
      emitGuestSpans(input.guestScope, m, upSeenAt, { [ATTR.QEMU_ACCEL]: accel });
    };
    let lastText = '';
    let watcher: fs.FSWatcher | undefined;
    const readPort = (): void => {
      let text: string;
      try {
        text = fs.readFileSync(exitFile, 'utf8');
      } catch {
        return;
      }
      lastText = text;
      if (!watcher && running) {
        // QEMU has created the file: from now on each write wakes us at once.
        try {
          watcher = fs.watch(exitFile, { persistent: false }, () => readPort());
          watcher.on('error', () => undefined);
        } catch {
          /* the poll alone */
        }
      }
      const r = readExitPort(text);
      if (r.up && !up) upSeenAt = performance.now();
      if (r.up) up = true;
      if (!clockWritten && upSeenAt !== undefined) clockWritten = writeGuestClock(clockFile, text, upSeenAt);
      emitGuest(text, false);
      if (r.code !== undefined && guestCode === undefined && !failure) {
        guestCode = r.code;
        signalGroup('SIGTERM');
      }
    };
    const poll = setInterval(readPort, 20);
    void exited.then(() => {
      clearInterval(poll);
      watcher?.close();
      emitGuest(lastText, true);
    });
    const bootTimer = setTimeout(() => {
      if (!up)
        fail(
          'ERR_MICROVM_BOOT_TIMEOUT',
          `${what} started, but the guest showed no sign of life within ${input.bootTimeoutMs} ms (its init never ran).`,
        );
    }, input.bootTimeoutMs);
    void exited.then(() => clearTimeout(bootTimer));

    const settle = async (): Promise<never> => {
      signalGroup('SIGKILL');
      const end = await exited;
      input.signal?.throwIfAborted();
      if (end.reason === 'failed') throw end.error;
      throw new BootFailure(
        'ERR_MICROVM_BOOT_FAILED',
        `${what} ended before the guest started (${end.reason}${end.signal ? ` by ${end.signal}` : ''}).${lastLines(input)}`,
      );
    };
    const aborted = (): boolean => input.signal?.aborted === true;

    // Up (1): QEMU created its QMP socket (it parsed its arguments); connect and watch it.
    // Every wait of the start derives from the caller's boot deadline (timeouts.boot), unless the
    // backend was given its own start deadline: a loaded host is slow, not broken.
    const startMs =
      options.startTimeoutSeconds !== undefined ? options.startTimeoutSeconds * 1000 : input.bootTimeoutMs;
    const deadline = Date.now() + startMs;
    const late = (): void =>
      fail(
        'ERR_MICROVM_BOOT_TIMEOUT',
        `${what} did not get as far as answering on its control socket within ${startMs} ms (timeouts.boot).`,
      );
    while (running && !fs.existsSync(qmpSock) && !aborted() && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 10));
    if (!running || aborted()) return settle();
    if (!fs.existsSync(qmpSock)) {
      late();
      return settle();
    }
    if (guard) {
      // QEMU is past its start, so a preloaded filter has loaded; never run with its policy unapplied.
      const why = guardRefusal(guard);
      if (why !== undefined) {
        fail(
          'ERR_MICROVM_EGRESS_GUARD',
          why
            ? `The egress filter in QEMU could not apply the policy (${why}); the VM was stopped rather than run with an open network.`
            : 'The egress filter was not loaded into QEMU (LD_PRELOAD did not take); the VM was stopped rather than run with an open network.',
        );
        return settle();
      }
    }
    // The socket file appears at bind(); QEMU listens a moment later: retry a refused connect.
    let lastErr: Error | undefined;
    while (!qmp && running && !aborted() && Date.now() < deadline) {
      try {
        qmp = await Promise.race([
          QmpClient.connect(qmpSock, Math.max(1, deadline - Date.now())),
          exited.then(() => undefined),
        ]);
      } catch (err) {
        lastErr = err as Error;
        const cause = (err as { cause?: NodeJS.ErrnoException }).cause;
        if (cause?.code !== 'ECONNREFUSED' && cause?.code !== 'ENOENT') break;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    if (!qmp && running && !aborted()) {
      // Usually QEMU died while we connected: give its exit a moment to say so (exit status, log).
      let grace: NodeJS.Timeout | undefined;
      await Promise.race([exited, new Promise((r) => (grace = setTimeout(r, 1000)))]);
      clearTimeout(grace);
      if (running && Date.now() >= deadline) late();
      else if (running)
        fail(
          'ERR_MICROVM_BOOT_FAILED',
          `${what} started but its QMP socket did not answer: ${lastErr?.message ?? 'timed out'}.`,
        );
    }
    if (!qmp || !running) return settle();
    // Created with QEMU's umask: only this user may talk to the agent (the VM dir is 0700 too).
    try {
      fs.chmodSync(agentSock, 0o600);
    } catch {
      /* QEMU makes it before QMP; if not, the connect says so */
    }
    const watch = qmp;
    watch.unref();
    watch.on('event', (ev: { event: string; data?: Record<string, unknown> }) => {
      if (ev.event === 'SHUTDOWN') shutdownReason = typeof ev.data?.reason === 'string' ? ev.data.reason : undefined;
      else if (ev.event === 'GUEST_PANICKED')
        fail(up ? 'ERR_MICROVM_HYPERVISOR_FAILED' : 'ERR_MICROVM_BOOT_FAILED', `The guest kernel panicked (${what}).`);
      else if (ev.event === 'STOP') {
        // A pause nobody asked for: a KVM internal error ("emulation failure") or someone's QMP
        // `stop`. The guest would hang forever: end it. A pause asked for (lib/pause.ts: its
        // marker, and the status 'paused') is left alone.
        watch.execute('query-status').then(
          (st) => {
            const status = (st as { status?: unknown } | undefined)?.status;
            if (status === 'paused' && fs.existsSync(vmFile(input.dataDir, 'paused'))) return;
            if (status !== 'running' && status !== 'shutdown' && shutdownReason === undefined)
              fail(
                up ? 'ERR_MICROVM_HYPERVISOR_FAILED' : 'ERR_MICROVM_BOOT_FAILED',
                `${what} paused the guest (status ${JSON.stringify(status)}).`,
              );
          },
          () => undefined, // QEMU is going away: its exit tells the rest
        );
      }
    });
    // The first status: a guest that was never started (-S) or already stopped says so here.
    watch.execute('query-status').then(
      (st) => {
        const status = (st as { status?: unknown } | undefined)?.status;
        // 'prelaunch' (-S: never started) is left to the boot deadline.
        if (status !== 'running' && status !== 'shutdown' && status !== 'prelaunch')
          fail('ERR_MICROVM_BOOT_FAILED', `${what} is not running the guest (status ${JSON.stringify(status)}).`);
      },
      () => undefined,
    );

    // Up (2): the guest init said UP. Races QEMU's exit, QMP, the boot deadline and the caller.
    await new Promise<void>((resolve) => {
      const check = setInterval(() => {
        readPort();
        if (up || !running || aborted()) {
          clearInterval(check);
          resolve();
        }
      }, 10);
      void exited.then(() => {
        clearInterval(check);
        resolve();
      });
    });
    if (!up || !running || aborted()) return settle();
    clearTimeout(bootTimer);

    // Tied to this process: not unref'd, so this process stays alive while the VM runs (stop() or
    // the guest's exit ends it). Untied: let this process exit whenever it wants.
    if (options.dieWithParent === false) child.unref();
    poll.unref();
    const kill = (sig: NodeJS.Signals): boolean => {
      if (!running) return false;
      if (guestCode === undefined && !failure) sent = sig;
      return signalGroup(sig);
    };
    // By now the launcher has exec'd QEMU: /proc/PID/exe is QEMU (for the PID-reuse guard).
    let executable = rt.qemuPath;
    try {
      executable = fs.realpathSync(`/proc/${child.pid as number}/exe`);
    } catch {
      executable = fs.realpathSync(rt.qemuPath);
    }
    return {
      pid: child.pid as number,
      executable,
      exited,
      kill,
      ref: () => child.ref(),
      unref: () => child.unref(),
      stdoutPath: input.stdoutPath,
      stderrPath: input.stderrPath,
      agentSocketPath: agentSock,
      controlSocketPath: files.controlSocket,
      accel,
      tcpForwardState: async (hostPort) => {
        if (!running) return undefined;
        const text = await watch.execute('human-monitor-command', { 'command-line': 'info usernet' });
        return usernetState(typeof text === 'string' ? text : '', hostPort);
      },
    };
  }
}
