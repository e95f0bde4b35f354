/**
 * run(image, options): one call from an image to a started VM, with a span around every stage:
 *
 *   microvm.Run
 *     microvm.Preflight        (microvm.preflight.RunAll -> microvm.preflight.Check per check)
 *     microvm.ImagePull
 *     microvm.RootfsClone      (microvm.rootfs.clone_strategy)
 *     microvm.RootfsHooks
 *     microvm.BackendPrepare
 *     microvm.NetworkStart
 *     microvm.VirtioFSOverrideStat   (libkrun, host user not root, copied rootfs: owner overrides)
 *     microvm.VMSpawn          (microvm.backend.Start -> ResolveRuntime, ResolveFirmware)
 *     microvm.PostBoot
 *
 * A failed or aborted stage marks its span and microvm.Run ERROR and undoes what earlier stages
 * started (the VM process, the network provider, the VM's data directory).
 */

import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { type Attributes, context, type Span, trace } from '@opentelemetry/api';
import type { BackendHandle } from '../backends/types';
import { asNoSpace, MicrovmError } from '../errors';
import { RecordingTracer, writeFlightRecord } from '../telemetry/recorder';
import { freePort } from '../network/free-port';
import { admit, type AdmissionSlot } from './admission';
import { keepAlive } from '../keep-alive';
import { localRootfs, pull, runtimeConfig, type PulledImage } from '../image/pull';
import type { NetworkHandle } from '../network/start';
import { startEgressAudit } from '../network/egress-audit';
import { runAllChecks } from '../preflight/run-all';
import { cloneRootfs, type ClonedRootfs } from '../rootfs/clone';
import { hooks, rootfsContext } from '../rootfs/hooks';
import { applyOverrideStat, overrideStatApplies } from '../rootfs/override-stat';
import { generateKeyPair } from '../ssh/keys';
import { writeState, processStartTime, sweepVms, terminateRecorded, writeOwner } from '../state';
import { ATTR, SPAN } from '../telemetry/attributes';
import { endSpan, getTracer, inSpan, type SpanScope, traceEnv } from '../telemetry/tracer';
import { errorType, recordStage, runMetrics } from '../telemetry/metrics';
import * as v from '../validate';
import { describeExit, MicroVM, VM_ENDED } from '../vm';
import { vmDir as vmDirOf, vmFile, vmsDir } from '../vm-dir';
import { normalize, type RunOptions } from './options';
import { chooseBackend, defaultChecks } from './backend';
import { outputTail, runPostBoot, type SshSetup } from './post-boot';

export type { PostBootHook, RunOptions } from './options';
export { chooseBackend } from './backend';
export { defaultDataRoot } from '../paths';

/**
 * Boots `image` as a VM. See {@link RunOptions}; resolves to a started {@link MicroVM}. Until it
 * settles, the pending call keeps Node's event loop alive (lib/keep-alive.ts), on every backend.
 */
export function run(image: string, options: RunOptions = {}): Promise<MicroVM> {
  return keepAlive(boot(image, options));
}

async function boot(image: string, options: RunOptions): Promise<MicroVM> {
  const n = normalize(image, options);
  const o = {
    ...n,
    backend: n.backend === 'auto' ? await chooseBackend({ accel: n.accel, dataRoot: n.dataRoot }) : n.backend,
  };
  // Host port 0: a free port, picked now (and distinct from the others); vm.port(guest) tells which.
  if (o.ports.some((p) => p.host === 0)) {
    const taken = new Set(o.ports.map((p) => p.host));
    const picked = [];
    for (const p of o.ports) {
      let host = p.host;
      while (host === 0 || (p.host === 0 && taken.has(host))) host = await freePort();
      taken.add(host);
      picked.push({ host, guest: p.guest });
    }
    o.ports = picked;
  }
  for (const [i, w] of o.waitFor.entries()) {
    if (w.kind !== 'log' && !o.ports.some((p) => p.guest === w.port))
      throw v.rangeError(`waitFor[${i}] waits on guest port ${w.port}, which ports does not forward`);
  }
  let sshSetup: SshSetup | undefined;
  if (o.ssh) {
    const hostPort = o.ssh.hostPort ?? (await freePort());
    if (o.ports.some((p) => p.host === hostPort)) throw v.rangeError(`ssh.hostPort ${hostPort} is also in ports`);
    const key = generateKeyPair({ comment: `node-microvm ${o.name}` });
    sshSetup = { key, hostPort, user: o.ssh.user, timeoutMs: o.ssh.timeoutMs, waitReady: o.ssh.waitReady };
    o.ports = [...o.ports, { host: hostPort, guest: o.ssh.guestPort }];
    o.rootfsHooks = [...o.rootfsHooks, hooks.injectAuthorizedKeys(key.publicKey, { user: o.ssh.user })];
  }
  const recorder = o.flightRecorder > 0 ? new RecordingTracer(getTracer(o.tracerProvider)) : undefined;
  const tracer = recorder ?? getTracer(o.tracerProvider);
  const root = tracer.startSpan(
    SPAN.RUN,
    {
      attributes: {
        [ATTR.IMAGE]: image,
        [ATTR.NAME]: o.name,
        [ATTR.CPUS]: o.cpus,
        [ATTR.MEMORY]: o.memoryMiB,
        [ATTR.VM_ID]: o.id,
        [ATTR.BACKEND]: o.backend.name,
      },
    },
    context.active(),
  );
  const scope: SpanScope = { tracer, ctx: trace.setSpan(context.active(), root) };
  const signal = o.signal;
  const vmDir = vmDirOf(o.dataRoot, o.name);
  const undo: Array<() => Promise<void>> = [];
  // Every stage: a span under microvm.Run; the signal is checked before and after it, so an abort
  // during a stage fails that stage.
  // Each stage's duration also goes to the microvm.stage.duration histogram (lib/telemetry/metrics.ts).
  const meters = runMetrics(o.meterProvider);
  const metricAttrs: Attributes = { [ATTR.BACKEND]: o.backend.name };
  const stage = async <T>(
    name: string,
    attributes: Attributes | undefined,
    fn: (span: Span, inner: SpanScope) => Promise<T> | T,
  ): Promise<T> => {
    const t0 = performance.now();
    try {
      const result = await inSpan(scope, name, attributes, async (span, inner) => {
        signal?.throwIfAborted();
        const r = await fn(span, inner);
        signal?.throwIfAborted();
        return r;
      });
      recordStage(meters, name, (performance.now() - t0) / 1000, metricAttrs);
      return result;
    } catch (err) {
      recordStage(meters, name, (performance.now() - t0) / 1000, metricAttrs, err);
      throw err;
    }
  };
  let admitted: AdmissionSlot | undefined;
  try {
    signal?.throwIfAborted();

    await stage(SPAN.PREFLIGHT, undefined, (_s, inner) =>
      runAllChecks(
        inner,
        o.preflight ?? [
          ...defaultChecks(
            o.backend,
            o.dataRoot,
            o.cpus,
            o.memoryMiB,
            o.ports.map((p) => p.host),
            o.egress.policy,
          ),
          ...o.preflightChecks,
        ],
        signal,
      ),
    );

    let imageDigest: string | undefined;
    const pulled: PulledImage = await stage(SPAN.IMAGE_PULL, { [ATTR.IMAGE_REF]: image }, async (span, inner) => {
      if (o.rootfsPath !== undefined) return localRootfs(o.rootfsPath, o.imageConfig, span);
      const r = await pull(image, {
        cacheDir: o.imageCache,
        signal,
        scope: inner,
        policy: o.pullPolicy,
        maxCacheBytes: o.maxCacheBytes,
      });
      imageDigest = r.digest;
      span.setAttribute(ATTR.IMAGE_SOURCE, 'pull');
      span.setAttribute(ATTR.IMAGE_DIGEST, r.digest);
      span.setAttribute(ATTR.IMAGE_FROM_CACHE, r.fromCache);
      metricAttrs[ATTR.IMAGE_CACHE_HIT] = r.fromCache;
      const cfg = runtimeConfig(r.config);
      return { rootfsDir: r.path, config: { ...cfg, ...o.imageConfig }, source: 'pull' };
    });

    // The VM's directory: a leftover one is an error unless cleanDataDir says to replace it.
    await fsp.mkdir(vmsDir(o.dataRoot), { recursive: true, mode: 0o700 });
    // Directories of disposable VMs whose process was killed before it could remove them.
    await sweepVms(o.dataRoot);
    if (fs.existsSync(vmDir)) {
      if (!o.cleanDataDir)
        throw new MicrovmError(
          'ERR_MICROVM_NAME_IN_USE',
          `A VM named ${o.name} already has a data directory (${vmDir}); pick another name, remove the old one (\`microvm rm ${o.name}\`), or pass cleanDataDir: true to replace it`,
        );
      await terminateRecorded(vmDir);
      await fsp.rm(vmDir, { recursive: true, force: true });
    }
    await fsp.mkdir(vmDir, { mode: 0o700 });
    undo.push(() => fsp.rm(vmDir, { recursive: true, force: true }));
    writeOwner(vmDir, o.autoRemove);

    const rootfs: ClonedRootfs = await stage(SPAN.ROOTFS_CLONE, undefined, async (span) => {
      const r = await cloneRootfs({
        sourceDir: pulled.rootfsDir,
        vmDir,
        overlaySupported: o.backend.supportsOverlay,
        strategies: o.cloneStrategies,
        signal,
      });
      span.setAttribute(ATTR.ROOTFS_CLONE_STRATEGY, r.strategy);
      return r;
    });

    await stage(SPAN.ROOTFS_HOOKS, { [ATTR.HOOK_COUNT]: o.rootfsHooks.length }, async () => {
      const ctx = rootfsContext(o.id, rootfs);
      for (const hook of o.rootfsHooks) {
        signal?.throwIfAborted();
        await hook(ctx);
      }
    });

    // W3C trace context for the guest command, so an instrumented program in the VM continues this
    // trace (its parent: microvm.Run). Not with the no-op tracer; never over the caller's own value.
    if (!o.env.some((e) => e.startsWith('TRACEPARENT=') || e.startsWith('TRACESTATE=')))
      o.env = [...o.env, ...traceEnv(root)];
    await stage(SPAN.BACKEND_PREPARE, { [ATTR.BACKEND]: o.backend.name }, (_s, inner) =>
      o.backend.prepareRootfs({
        vmId: o.id,
        dataDir: vmDir,
        rootfs,
        image: pulled.config,
        initOverride: o.initOverride,
        env: o.env,
        workdir: o.workdir,
        egress: o.egress.policy,
        outputTimes: o.outputTimes,
        scope: inner,
        signal,
        mounts: o.virtiofs
          .filter((m) => m.guestPath)
          .map((m) => ({ tag: m.tag, guestPath: m.guestPath as string, readOnly: m.readOnly })),
      }),
    );

    const network: NetworkHandle | undefined = await stage(
      SPAN.NETWORK_START,
      {
        // No provider: libkrun's TSI, or QEMU's user networking (slirp).
        [ATTR.NETWORK_PROVIDER]: o.network?.name ?? o.backend.networkName ?? 'backend',
        [ATTR.NETWORK_PORTS]: o.ports.map((p) => `${p.host}:${p.guest}`),
        [ATTR.NETWORK_EGRESS]: o.egress.description,
      },
      async () => {
        signal?.throwIfAborted();
        const mode = o.egress.mode;
        if (mode !== 'allow' && (!(o.backend.egressPolicies ?? ['allow']).includes(mode) || o.network))
          throw new MicrovmError(
            'ERR_MICROVM_EGRESS_UNSUPPORTED',
            `egress '${o.egress.description}' cannot be enforced by backend ${o.backend.name}${o.network ? ` with network provider ${o.network.name}` : ''}; refusing to start with an open network (the QEMU and libkrun backends enforce policies when no network provider replaces their networking)`,
          );
        if (!o.network) return undefined;
        const n = await o.network.start({ vmId: o.id, dataDir: vmDir, ports: o.ports, signal });
        undo.push(() => n.stop());
        return n;
      },
    );

    // libkrun as a user other than root on a copied tree: what this process made gets root's owner
    // in the guest (go-microvm's stage of the same name; lib/rootfs/override-stat.ts).
    const hostUid = process.getuid?.() ?? 0;
    if (overrideStatApplies(o.backend.needsOverrideStat === true, rootfs.strategy, hostUid))
      await stage(SPAN.VIRTIOFS_OVERRIDE_STAT, undefined, async (span) => {
        span.setAttribute(ATTR.OVERRIDE_STAT_ENTRIES, await applyOverrideStat(rootfs.rootPath, hostUid, signal));
      });

    const consoleLogPath = vmFile(vmDir, 'console');
    const logPath = vmFile(vmDir, 'vmm');
    const stdoutPath = vmFile(vmDir, 'stdout');
    const stderrPath = vmFile(vmDir, 'stderr');
    // At most maxConcurrentBoots VMs boot at once on this data root: a start beyond that waits
    // here, before its hypervisor starts; the slot is freed once run() settles.
    admitted = await stage(SPAN.ADMISSION_WAIT, { [ATTR.ADMISSION_LIMIT]: o.maxConcurrentBoots }, async (span) => {
      const slot = await admit(o.dataRoot, o.maxConcurrentBoots, signal);
      span.setAttribute(ATTR.ADMISSION_WAITED_MS, Math.round(slot.waitedMs));
      return slot;
    });
    const started: BackendHandle = await stage(SPAN.VM_SPAWN, undefined, async (spawnSpan, inner) => {
      const h = await o.backend.start({
        vmId: o.id,
        name: o.name,
        dataDir: vmDir,
        rootfs,
        cpus: o.cpus,
        memoryMiB: o.memoryMiB,
        ports: o.ports,
        virtiofs: o.virtiofs,
        egress: o.egress.policy,
        outputTimes: o.outputTimes,
        logMaxBytes: o.logMaxBytes,
        logLevel: o.logLevel,
        consoleLogPath,
        stdoutPath,
        stderrPath,
        logPath,
        bootTimeoutMs: o.bootTimeoutMs,
        network: network ? { kind: network.kind, socketPath: network.socketPath, mac: network.mac } : undefined,
        scope: inner,
        guestScope: scope,
        signal,
      });
      // Registered before anything else can fail, so the VM never outlives a failed run().
      undo.push(async () => {
        h.kill('SIGKILL');
        await h.exited;
      });
      spawnSpan.setAttribute(ATTR.VM_PID, h.pid);
      if (h.accel) metricAttrs[ATTR.QEMU_ACCEL] = h.accel;
      return h;
    });
    root.setAttribute(ATTR.VM_PID, started.pid);
    await writeState(vmDir, {
      id: o.id,
      name: o.name,
      backend: o.backend.name,
      pid: started.pid,
      pidStartTime: processStartTime(started.pid) ?? '',
      executable: started.executable,
      image,
      cpus: o.cpus,
      memoryMiB: o.memoryMiB,
      ports: o.ports,
      rootfsPath: rootfs.rootPath,
      cloneStrategy: rootfs.strategy,
      createdAt: new Date().toISOString(),
      ...(imageDigest ? { imageDigest } : {}),
      ...(started.agentAcceptsLate ? { agentAcceptsLate: true } : {}),
      ...(started.controlSocketPath ? { controlSocket: started.controlSocketPath } : {}),
    });

    const onExit: Array<() => Promise<void>> = network ? [() => network.stop()] : [];
    if (o.backend.egressLogged ? o.backend.egressLogged(o.egress.policy) : o.egress.mode === 'allow-list') {
      // The policy's decisions (relays, the egress filter) become events of a span as long as the VM.
      const audit = startEgressAudit(
        vmFile(vmDir, 'egressLog'),
        { tracer: getTracer(o.tracerProvider), ctx: scope.ctx },
        meters.connections,
      );
      onExit.push(() => Promise.resolve(audit.close()));
    }
    const vm = new MicroVM(
      {
        id: o.id,
        name: o.name,
        backend: o.backend.name,
        dataDir: vmDir,
        rootfsPath: rootfs.rootPath,
        cloneStrategy: rootfs.strategy,
        ports: o.ports,
        consoleLogPath,
        logPath,
      },
      started,
      onExit,
      getTracer(o.tracerProvider), // not the flight recorder's: it keeps every span of run() only
    );

    // From here every wait races the VM's end: a VM that dies or fails during PostBoot ends the
    // wait at once with a coded error (the hypervisor's, or ERR_MICROVM_VM_EXITED).
    const life = new AbortController();
    void vm[VM_ENDED]().then((exit) => {
      life.abort(
        exit.reason === 'failed'
          ? exit.error
          : new MicrovmError(
              'ERR_MICROVM_VM_EXITED',
              `The VM ended before it was ready: ${describeExit(exit)}.${outputTail(stderrPath, 'its stderr')}${outputTail(consoleLogPath, 'console')}`,
            ),
      );
    });
    const postBootSignal = signal ? AbortSignal.any([signal, life.signal]) : life.signal;
    await stage(SPAN.POST_BOOT, { [ATTR.POST_BOOT_HOOK_COUNT]: o.postBoot.length }, async (_s, inner) => {
      try {
        await runPostBoot(inner, {
          o,
          vm,
          started,
          vmDir,
          consoleLogPath,
          signal,
          postBootSignal,
          life,
          undo,
          sshSetup,
        });
      } catch (err) {
        if (life.signal.aborted && !signal?.aborted) throw life.signal.reason;
        throw err;
      }
    });

    endSpan(root);
    meters.runs.add(1, { [ATTR.BACKEND]: o.backend.name, 'microvm.outcome': 'ok' });
    return vm;
  } catch (caught) {
    const err = asNoSpace(caught, `run ${o.name}`);
    endSpan(root, err);
    meters.runs.add(1, { [ATTR.BACKEND]: o.backend.name, 'microvm.outcome': 'error' });
    meters.failures.add(1, { [ATTR.BACKEND]: o.backend.name, [ATTR.ERROR_TYPE]: errorType(err) });
    // Before the clean-up removes the VM's directory: its logs go into the flight record.
    const written =
      recorder && !signal?.aborted
        ? writeFlightRecord({
            dataRoot: o.dataRoot,
            name: o.name,
            id: o.id,
            backend: o.backend.name,
            image,
            vmDir,
            error: err,
            spans: recorder.spans,
            keep: o.flightRecorder,
          })
        : undefined;
    for (const fn of undo.reverse()) await fn().catch(() => undefined);
    const record = written && 'dir' in written ? written.dir : undefined;
    if (written && 'skipped' in written && err instanceof Error)
      err.message += `\nNo flight record: ${written.skipped}`;
    if (record && err instanceof Error) {
      // The VM's directory is gone: its logs the message names are in the record now.
      if (!fs.existsSync(vmDir)) err.message = err.message.split(`${vmDir}${path.sep}`).join(`${record}${path.sep}`);
      err.message += `\nFlight record (spans, logs): ${record}`;
      Object.assign(err, { flightRecord: record });
    }
    throw err;
  } finally {
    admitted?.release();
  }
}
