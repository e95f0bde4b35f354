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
import { defaultCacheDir, defaultDataRoot } from './paths';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import {
  type Attributes,
  context,
  type MeterProvider,
  type Span,
  type TracerProvider,
  trace,
} from '@opentelemetry/api';
import { libkrunBackend } from './backends/libkrun';
import { qemuBackend } from './backends/qemu';
import type { Backend, BackendHandle, EgressPolicy, ImageRuntimeConfig } from './backends/types';
import { asNoSpace, MicrovmError } from './errors';
import { type AccelChoice, decideAccel, parseAccel, requestedAccel } from './host/kvm';
import { RecordingTracer, writeFlightRecord } from './telemetry/recorder';
import { readTail } from './file-tail';
import { normalizeWaitFor, waitFor, type WaitStrategy } from './wait-for';
import { freePort } from './net';
import { keepAlive } from './keep-alive';
import { localRootfs, parsePullPolicy, pull, type PullPolicy, runtimeConfig, type PulledImage } from './image/pull';
import type { NetworkHandle, NetworkProvider } from './network/start';
import { describeEgress, egressMode, parseEgress } from './network/egress';
import { startEgressAudit } from './network/egress-audit';
import {
  normalizeLogLevel,
  normalizePortMap,
  normalizeVirtiofs,
  type KrunLogLevel,
  type LOG_LEVELS,
} from './backends/libkrun/plan';
import {
  diskSpaceCheck,
  memoryCheck,
  portsCheck,
  type PreflightCheck,
  resourcesCheck,
  userNamespacesCheck,
} from './preflight/checks';
import { runAllChecks } from './preflight/run-all';
import { resolveRuntime } from './resolve/runtime';
import { type CloneStrategy, cloneRootfs, type ClonedRootfs } from './rootfs/clone';
import { hooks, type RootfsHook, rootfsContext } from './rootfs/hooks';
import { applyOverrideStat, overrideStatApplies } from './rootfs/override-stat';
import { generateKeyPair, type SshKeyPair, writeKeyPair } from './ssh/keys';
import { waitForReady } from './ssh/wait-ready';
import { AgentClient } from './agent/client';
import { writeState, processStartTime, sweepVms, terminateRecorded, writeOwner } from './state';
import { ATTR, SPAN } from './telemetry/attributes';
import { endSpan, getTracer, inSpan, type SpanScope, traceEnv } from './telemetry/tracer';
import { errorType, recordStage, runMetrics } from './telemetry/metrics';
import * as v from './validate';
import { describeExit, MicroVM, VM_ENDED } from './vm';
import { AGENT_FAILURE_PHRASES, CONSOLE_PREFIX } from './guest/protocol';
import { guestBlock, guestLines } from './guest/text';
import { VM_NAME, vmDir as vmDirOf, vmFile, vmsDir } from './vm-dir';

/** A function run with the started VM (stage microvm.PostBoot). */
export type PostBootHook = (vm: MicroVM, scope: SpanScope) => void | Promise<void>;

/** Options of {@link run}. Defaults in parentheses. */
export interface RunOptions {
  /** VM name, unique per data dir (`vm-<id>`). */
  name?: string;
  /** vCPUs, 1–255 (1). */
  cpus?: number;
  /** Memory in MiB (512). */
  memoryMiB?: number;
  /**
   * Host→guest TCP forwards on 127.0.0.1 ([]). Host port 0 picks a free port: `vm.port(guest)`
   * (or `vm.ports`) says which.
   */
  ports?: readonly { host: number; guest: number }[];
  /** Command replacing the image's Entrypoint+Cmd. */
  initOverride?: readonly string[];
  /** Extra guest environment: "K=V" list or record. */
  env?: readonly string[] | Record<string, string>;
  /** Guest working directory (the image's, else /). */
  workdir?: string;
  /** An unpacked root filesystem to boot (skips the pull). Never modified. */
  rootfsPath?: string;
  /** Runtime config for a rootfsPath (Entrypoint, Cmd, Env, WorkingDir). */
  imageConfig?: Partial<ImageRuntimeConfig>;
  /** Hooks that write into the VM's rootfs before boot ([]). */
  rootfsHooks?: readonly RootfsHook[];
  /** Hooks run with the started VM ([]). */
  postBoot?: readonly PostBootHook[];
  /** Replace the built-in preflight checks. */
  preflight?: readonly PreflightCheck[];
  /** Add checks after the built-in ones. */
  preflightChecks?: readonly PreflightCheck[];
  /**
   * Extra virtio-fs shares ([]). With `guestPath`, the QEMU backend's guest init mounts the share
   * there (with libkrun, mount the tag yourself: `mount -t virtiofs TAG PATH`).
   */
  virtiofs?: readonly { tag: string; hostPath: string; readOnly?: boolean; guestPath?: string }[];
  /** Data root ($MICROVM_DATA_DIR, else $XDG_DATA_HOME/node-microvm, else ~/.local/share/node-microvm). */
  dataDir?: string;
  /** Remove a leftover VM directory of the same name first, stopping its VM if still running (false). */
  cleanDataDir?: boolean;
  /** Image cache directory (`<dataDir>/cache`). */
  imageCache?: string;
  /**
   * When to ask the image's source what its tag names now ('missing'): 'missing' uses a cached
   * tag as is, 'always' re-resolves it (a moved tag gets its new image), 'never' uses only the
   * cache (ERR_MICROVM_IMAGE_NOT_CACHED otherwise). See `pull()`'s `policy`.
   */
  pull?: PullPolicy;
  /** Cap on the image cache's size in bytes: least recently used images go after a pull (no cap). */
  maxCacheBytes?: number;
  /**
   * The VM's directory is disposable (false): when this process and the VM are both gone without
   * removing it (a kill -9), the next run() and `microvm prune` remove it. `microvm run --rm`.
   */
  autoRemove?: boolean;
  /** libkrun log level ('error'). */
  logLevel?: KrunLogLevel | keyof typeof LOG_LEVELS;
  /**
   * 'auto' | 'libkrun' | 'qemu' | a Backend object. 'auto': libkrun when the host has hardware KVM
   * (not a PVM or other software /dev/kvm) and libkrun loads, else qemu.
   */
  backend?: 'auto' | 'libkrun' | 'qemu' | Backend;
  /**
   * QEMU accelerator: 'auto' (hardware KVM when usable, else TCG; a KVM that fails to boot falls
   * back to TCG once), 'kvm' or 'tcg'. Default `$MICROVM_ACCEL`, else 'auto'. For backend 'auto'
   * or 'qemu' only; 'tcg' makes 'auto' pick QEMU.
   */
  accel?: AccelChoice;
  /** Deadlines. `boot`: ms until the guest shows a sign of life, else ERR_MICROVM_BOOT_TIMEOUT (60000). */
  timeouts?: { boot?: number };
  /** Rootfs clone strategies to try, in order (overlay, reflink, copy). */
  cloneStrategies?: readonly CloneStrategy[];
  /** Network provider replacing TSI. */
  network?: NetworkProvider;
  /**
   * What the guest may reach over the network: `'allow'` (default: whatever the host can) or
   * `'deny'` (nothing; published `ports` still answer). Enforced on the host, outside the guest's
   * reach (QEMU: restricted user networking, relays, and the egress filter preloaded into QEMU;
   * libkrun: the same filter in its runner); a backend that cannot enforce it fails with
   * ERR_MICROVM_EGRESS_UNSUPPORTED rather than run open. Rules: {@link EgressPolicy}, docs/security.md.
   */
  egress?: EgressPolicy;
  /**
   * Note when each chunk of the guest command's output arrives (QEMU backend; default true): the
   * guest init relays the command's stdout and stderr (splice, in the kernel) and records the guest
   * time of each chunk, which `microvm logs --since` reads. `false`: the command writes straight to
   * the host's ports, a little faster for bulk output (`node bench/output.js`), and `--since` fails
   * with ERR_MICROVM_LOG_TIMES. The libkrun backend has no such record either way.
   */
  outputTimes?: boolean;
  /**
   * The most each of the VM's console, stdout and stderr files keeps, in bytes (64 MiB; QEMU
   * backend). Beyond it a marker line ends the file and the rest is discarded, enforced on the host
   * whatever the guest does; `vm.outputStatus()` says what was cut, and what a full disk lost.
   */
  logMaxBytes?: number;
  /**
   * SSH into the guest: generates a key, injects it into `~user/.ssh/authorized_keys`, forwards
   * `hostPort` (a free one) to `guestPort` (22), and (unless `waitReady: false`) waits in PostBoot
   * until a handshake with authentication succeeds; then `vm.ssh` / `vm.exec()` work. The image
   * must start an SSH server.
   */
  ssh?: { user?: string; guestPort?: number; hostPort?: number; waitReady?: boolean; timeoutMs?: number };
  /**
   * The guest agent (both backends): run() resolves once it answered (span microvm.AgentWaitReady),
   * and `vm.exec()`, `vm.spawn()`, `vm.copyIn()`/`copyOut()`, `vm.readFile()`/`writeFile()` work on
   * any image, with no SSH server. `timeoutMs` (30000): ERR_MICROVM_AGENT_TIMEOUT when it passes.
   * `false`: do not connect (the guest still runs its agent, idle). Default true.
   */
  agent?: boolean | { timeoutMs?: number };
  /**
   * Readiness besides SSH (testcontainers-style), checked in PostBoot in order, each in its own span:
   * `{ log: /ready/ }` a line of the command's output (or `stream: 'console'`); `{ tcp: 80 }` a
   * forwarded guest port that keeps a connection open; `{ http: { port: 80, path: '/health',
   * status: 200 } }` a GET that answers (any 2xx/3xx when `status` is not given). `timeoutMs`
   * (60000) each; ERR_MICROVM_WAIT_TIMEOUT when it passes, ERR_MICROVM_VM_EXITED when the VM ends first.
   */
  waitFor?: WaitStrategy | readonly WaitStrategy[];
  /**
   * When run() fails (not when it is aborted), keep what explains it in
   * `<dataDir>/failed/<name>-<time>/`: every span (recorded even without a tracer provider), the
   * error, and the last 64 KiB of the console, VMM log, stdout and stderr; the error's message names
   * the directory and `err.flightRecord` holds it. The newest `keep` (10) records stay; `false`
   * records nothing.
   */
  flightRecorder?: { keep?: number } | false;
  /** Tracer provider (the global one). */
  tracerProvider?: TracerProvider;
  /**
   * Meter provider for microvm.stage.duration, microvm.runs and microvm.run.failures (the global
   * one, a no-op unless the application registered one).
   */
  meterProvider?: MeterProvider;
  /** Cancels the start; everything started so far is undone. */
  signal?: AbortSignal;
}

const RUN_KEYS = [
  'flightRecorder',
  'waitFor',
  'pull',
  'maxCacheBytes',
  'autoRemove',
  'name',
  'cpus',
  'memoryMiB',
  'ports',
  'initOverride',
  'env',
  'workdir',
  'rootfsPath',
  'imageConfig',
  'rootfsHooks',
  'postBoot',
  'preflight',
  'preflightChecks',
  'virtiofs',
  'dataDir',
  'cleanDataDir',
  'imageCache',
  'logLevel',
  'backend',
  'cloneStrategies',
  'network',
  'egress',
  'outputTimes',
  'logMaxBytes',
  'tracerProvider',
  'meterProvider',
  'signal',
  'ssh',
  'agent',
  'accel',
  'timeouts',
] as const;

export { defaultDataRoot } from './paths';

function typeError(name: string, value: unknown): never {
  throw v.typeError(`Expected an array for ${name} but received ${v.describe(value)}`);
}

function functions<T>(name: string, value: unknown): T[] {
  if (value === undefined) return [];
  if (!Array.isArray(value) || value.some((f) => typeof f !== 'function'))
    throw v.typeError(`Expected an array of functions for ${name} but received ${v.describe(value)}`);
  return value as T[];
}

function checks(name: string, value: unknown): PreflightCheck[] {
  if (value === undefined) return [];
  if (!Array.isArray(value))
    throw v.typeError(`Expected an array of checks for ${name} but received ${v.describe(value)}`);
  return value.map((c: unknown, i) => {
    const o = v.object(`${name}[${i}]`, c);
    v.string(`${name}[${i}].name`, o.name);
    if (typeof o.run !== 'function') throw v.typeError(`Expected a run function for ${name}[${i}].run`);
    if (o.required !== undefined) v.boolean(`${name}[${i}].required`, o.required);
    // Kept as given (a class instance keeps its prototype); a missing `required` counts as true.
    return o as unknown as PreflightCheck;
  });
}

/** The last lines of a guest output file for an error message (the VM's directory is removed after). */
function outputTail(file: string, label: string): string {
  return guestBlock(label, readTail(file, 2000)?.toString('utf8') ?? '', 6);
}

/** An agent that will not come: the guest's init said so on the console (libkrun). */
class AgentNotStarted extends MicrovmError {}

/**
 * What our init said on the console when it could not start the agent (under libkrun it cannot
 * report otherwise), as an error; undefined while it said nothing of the kind. The console is the
 * guest's: only the init's own fixed phrases are looked for, and the line is cut and made printable.
 */
function agentNotStarted(consoleLogPath: string): AgentNotStarted | undefined {
  const text = readTail(consoleLogPath, 16 * 1024)?.toString('utf8') ?? '';
  const said = new RegExp(`^${CONSOLE_PREFIX}(?:${AGENT_FAILURE_PHRASES.join('|')})[^\\r\\n]*`, 'm').exec(text);
  if (!said) return undefined;
  const line = guestLines(said[0], 1)[0] ?? '';
  return new AgentNotStarted(
    'ERR_MICROVM_AGENT_UNAVAILABLE',
    `The guest's init could not start the agent: ${line} (see ${consoleLogPath})`,
  );
}

/** Overlay mount options list directories separated by ',' (options) and ':' (lower layers). */
const OVERLAY_UNSAFE = /[,:]/;
/** The data dir also names QEMU's sockets and files, split on white space by the launcher. */
const DATA_UNSAFE = /[,:\s]/;

/**
 * Paths that end up inside another program's option string (an overlay mount's options,
 * virtiofsd's `-o source=`, QEMU's `-chardev ...,path=`) must not carry the separators of that
 * string: `-v '/a,source=/b:/mnt'` would otherwise make virtiofsd serve /b. Refused, not escaped:
 * each program escapes differently, and such names are rare.
 */
function optionSafePath(name: string, value: string, unsafe: RegExp): string {
  const bad = unsafe.exec(value);
  if (bad) {
    throw Object.assign(
      v.rangeError(
        `Expected a path without ${JSON.stringify(bad[0])} for ${name} (it goes into another program's option string) but received ${JSON.stringify(value)}`,
      ),
      { code: 'ERR_MICROVM_UNSAFE_PATH' },
    );
  }
  return value;
}

/**
 * A share's mount point in the guest: absolute, plain components (no `.`/`..`, no empty ones) and
 * no control characters (a newline would add a line to the guest's mount table).
 */
function guestMountPath(name: string, value: unknown): string {
  const p = v.absolutePath(name, value);
  const parts = p.split('/').slice(1);
  const control = [...p].some((c) => c.charCodeAt(0) < 0x20 || c.charCodeAt(0) === 0x7f);
  const odd = parts.some((c, i) => c === '.' || c === '..' || (c === '' && i < parts.length - 1));
  if (control || odd)
    throw Object.assign(
      v.rangeError(
        `Expected a plain absolute guest path for ${name} (no '.', '..', empty components or control characters) but received ${JSON.stringify(p)}`,
      ),
      { code: 'ERR_MICROVM_UNSAFE_PATH' },
    );
  return p;
}

/** A share's host directory, checked now rather than failing at boot: it must be a directory. */
function shareSource(name: string, p: string): string {
  let st: fs.Stats;
  try {
    st = fs.statSync(p);
  } catch (err) {
    throw Object.assign(
      v.rangeError(
        `Expected an existing directory for ${name} but ${JSON.stringify(p)} cannot be reached (${(err as NodeJS.ErrnoException).code ?? 'error'})`,
      ),
      { code: 'ERR_MICROVM_SHARE_SOURCE' },
    );
  }
  if (!st.isDirectory())
    throw Object.assign(v.rangeError(`Expected a directory for ${name} but ${JSON.stringify(p)} is not one`), {
      code: 'ERR_MICROVM_SHARE_SOURCE',
    });
  return p;
}

/** Validates options and fills in defaults. */
function normalize(image: string, options: RunOptions) {
  const o = v.object('options', options);
  v.knownKeys('options', o, RUN_KEYS);
  v.string('image', image);
  const id = randomBytes(6).toString('hex');
  const name = o.name === undefined ? `vm-${id}` : v.string('name', o.name);
  if (!VM_NAME.test(name))
    throw v.rangeError(`Expected 1–63 letters, digits, '_', '.' or '-' for name but received ${v.describe(name)}`);
  let env: string[] = [];
  if (Array.isArray(o.env)) env = v.envEntries('env', o.env);
  else if (o.env !== undefined)
    env = v.envEntries(
      'env',
      Object.entries(v.object('env', o.env)).map(
        ([k, val]) => `${k}=${v.string(`env.${k}`, val, { allowEmpty: true })}`,
      ),
    );
  const accel = o.accel === undefined ? undefined : parseAccel('accel', o.accel);
  let backend: Backend | 'auto';
  if (o.backend === undefined || o.backend === 'auto') backend = 'auto';
  else if (o.backend === 'libkrun') backend = libkrunBackend();
  else if (o.backend === 'qemu') backend = qemuBackend({ accel });
  else if (typeof o.backend === 'object' && o.backend !== null && typeof (o.backend as Backend).start === 'function')
    backend = o.backend as Backend;
  else
    throw v.typeError(
      `Expected 'auto', 'libkrun', 'qemu' or a Backend object for backend but received ${v.describe(o.backend)}`,
    );
  if (accel !== undefined && backend !== 'auto' && !backend.takesAccel) {
    throw Object.assign(
      v.rangeError(
        `accel applies to backend 'auto' or 'qemu', not ${o.backend === 'libkrun' ? "'libkrun' (always hardware KVM)" : 'a Backend object (configure it there)'}`,
      ),
      { code: 'ERR_MICROVM_INVALID_ACCEL' },
    );
  }
  let bootTimeoutMs = 60000;
  if (o.timeouts !== undefined) {
    const t = v.object('timeouts', o.timeouts);
    v.knownKeys('timeouts', t, ['boot']);
    if (t.boot !== undefined) bootTimeoutMs = v.integer('timeouts.boot', t.boot, 1, 3_600_000);
  }
  const ports =
    o.ports === undefined
      ? []
      : (normalizePortMap('ports', o.ports, true) as string[]).map((p) => {
          const [host, guest] = p.split(':').map(Number);
          return { host, guest };
        });
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal))
    throw v.typeError('Expected an AbortSignal for signal');
  let ssh: { user: string; guestPort: number; hostPort?: number; waitReady: boolean; timeoutMs: number } | undefined;
  if (o.ssh !== undefined) {
    const so = v.object('ssh', o.ssh);
    v.knownKeys('ssh', so, ['user', 'guestPort', 'hostPort', 'waitReady', 'timeoutMs']);
    ssh = {
      user: so.user === undefined ? 'root' : v.string('ssh.user', so.user),
      guestPort: so.guestPort === undefined ? 22 : v.integer('ssh.guestPort', so.guestPort, 1, 65535),
      hostPort: so.hostPort === undefined ? undefined : v.integer('ssh.hostPort', so.hostPort, 1, 65535),
      waitReady: so.waitReady === undefined ? true : v.boolean('ssh.waitReady', so.waitReady),
      timeoutMs: so.timeoutMs === undefined ? 60000 : v.integer('ssh.timeoutMs', so.timeoutMs, 1, 3_600_000),
    };
  }
  let agent: { timeoutMs: number } | undefined = { timeoutMs: 30000 };
  if (o.agent === false) agent = undefined;
  else if (o.agent !== undefined && o.agent !== true) {
    const ao = v.object('agent', o.agent);
    v.knownKeys('agent', ao, ['timeoutMs']);
    if (ao.timeoutMs !== undefined) agent.timeoutMs = v.integer('agent.timeoutMs', ao.timeoutMs, 1, 3_600_000);
  }
  return {
    id,
    name,
    cpus: o.cpus === undefined ? 1 : v.integer('cpus', o.cpus, 1, 255),
    memoryMiB: o.memoryMiB === undefined ? 512 : v.integer('memoryMiB', o.memoryMiB, 32, 4_194_304),
    ports,
    initOverride:
      o.initOverride === undefined
        ? undefined
        : v.stringArray('initOverride', o.initOverride, { allowEmptyItems: true }),
    env,
    workdir: o.workdir === undefined ? undefined : v.string('workdir', o.workdir),
    rootfsPath:
      o.rootfsPath === undefined
        ? undefined
        : optionSafePath('rootfsPath', v.absolutePath('rootfsPath', o.rootfsPath), OVERLAY_UNSAFE),
    imageConfig:
      o.imageConfig === undefined ? undefined : (v.object('imageConfig', o.imageConfig) as Partial<ImageRuntimeConfig>),
    rootfsHooks: functions<RootfsHook>('rootfsHooks', o.rootfsHooks),
    postBoot: functions<PostBootHook>('postBoot', o.postBoot),
    waitFor: o.waitFor === undefined ? [] : normalizeWaitFor(o.waitFor),
    flightRecorder: flightRecorderKeep(o.flightRecorder),
    preflight: o.preflight === undefined ? undefined : checks('preflight', o.preflight),
    preflightChecks: checks('preflightChecks', o.preflightChecks),
    virtiofs:
      o.virtiofs === undefined
        ? []
        : (Array.isArray(o.virtiofs) ? (o.virtiofs as unknown[]) : typeError('virtiofs', o.virtiofs))
            .map((m, i) => {
              const { guestPath, ...share } = v.object(`virtiofs[${i}]`, m);
              const n = normalizeVirtiofs(`virtiofs[${i}]`, share);
              const gp = guestPath === undefined ? undefined : guestMountPath(`virtiofs[${i}].guestPath`, guestPath);
              return {
                tag: n.tag,
                hostPath: optionSafePath(`virtiofs[${i}].hostPath`, n.path, /,/),
                readOnly: n.readOnly,
                guestPath: gp,
              };
            })
            .map((m, i, all) => {
              if (all.findIndex((x) => x.tag === m.tag) !== i)
                throw v.rangeError(
                  `Expected a unique tag for virtiofs[${i}].tag but ${JSON.stringify(m.tag)} is used twice`,
                );
              return m;
            })
            // Last: what is on the host (after every check of the options themselves).
            .map((m, i) => ({ ...m, hostPath: shareSource(`virtiofs[${i}].hostPath`, m.hostPath) })),
    dataRoot: optionSafePath(
      'dataDir',
      o.dataDir === undefined ? defaultDataRoot() : v.absolutePath('dataDir', o.dataDir),
      DATA_UNSAFE,
    ),
    imageCache: optionSafePath(
      'imageCache',
      o.imageCache === undefined
        ? defaultCacheDir(o.dataDir === undefined ? defaultDataRoot() : (o.dataDir as string))
        : v.absolutePath('imageCache', o.imageCache),
      OVERLAY_UNSAFE,
    ),
    cleanDataDir: o.cleanDataDir === undefined ? false : v.boolean('cleanDataDir', o.cleanDataDir),
    pullPolicy: o.pull === undefined ? ('missing' as const) : parsePullPolicy('pull', o.pull),
    maxCacheBytes:
      o.maxCacheBytes === undefined
        ? undefined
        : v.integer('maxCacheBytes', o.maxCacheBytes, 0, Number.MAX_SAFE_INTEGER),
    autoRemove: o.autoRemove === undefined ? false : v.boolean('autoRemove', o.autoRemove),
    logLevel: o.logLevel === undefined ? 1 : normalizeLogLevel('logLevel', o.logLevel),
    backend,
    accel,
    bootTimeoutMs,
    cloneStrategies: o.cloneStrategies as CloneStrategy[] | undefined,
    network: o.network as NetworkProvider | undefined,
    egress: parseEgress(o.egress),
    outputTimes: o.outputTimes === undefined ? true : v.boolean('outputTimes', o.outputTimes),
    logMaxBytes:
      o.logMaxBytes === undefined ? undefined : v.integer('logMaxBytes', o.logMaxBytes, 4096, Number.MAX_SAFE_INTEGER),
    tracerProvider: o.tracerProvider as TracerProvider | undefined,
    meterProvider: o.meterProvider as MeterProvider | undefined,
    signal: o.signal,
    ssh,
    agent,
  };
}

/** The checks a start makes: the backend's own, then the host's (disk, memory, CPUs, ports, namespaces). */
function defaultChecks(
  backend: Backend,
  dataRoot: string,
  cpus: number,
  memoryMiB: number,
  ports: number[],
  egress: EgressPolicy,
): PreflightCheck[] {
  return [
    ...(backend.preflightChecks?.({ egress }) ?? []),
    diskSpaceCheck(fs.existsSync(dataRoot) ? dataRoot : path.dirname(dataRoot)),
    memoryCheck(memoryMiB),
    resourcesCheck(cpus, memoryMiB),
    portsCheck(ports),
    ...(backend.supportsOverlay ? [userNamespacesCheck()] : []),
  ];
}

/**
 * 'auto': libkrun when the host has hardware KVM (a PVM or other software /dev/kvm does not count,
 * nor a KVM that already failed on this host boot) and libkrun loads; otherwise QEMU, which then
 * uses KVM or TCG by the same rule. `accel: 'tcg'` always means QEMU.
 */
export async function chooseBackend(options: { accel?: AccelChoice; dataRoot?: string } = {}): Promise<Backend> {
  const accel = requestedAccel(options.accel);
  if (accel !== 'tcg' && decideAccel('auto', { dataRoot: options.dataRoot }).accel === 'kvm') {
    try {
      await resolveRuntime();
      return libkrunBackend();
    } catch {
      /* no libkrun: QEMU (with KVM) */
    }
  }
  return qemuBackend({ accel: options.accel });
}

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
  let sshSetup: { key: SshKeyPair; hostPort: number; user: string; timeoutMs: number; waitReady: boolean } | undefined;
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
            o.egress,
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
        egress: o.egress,
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
        [ATTR.NETWORK_EGRESS]: describeEgress(o.egress),
      },
      async () => {
        signal?.throwIfAborted();
        const mode = egressMode(o.egress);
        if (mode !== 'allow' && (!(o.backend.egressPolicies ?? ['allow']).includes(mode) || o.network))
          throw new MicrovmError(
            'ERR_MICROVM_EGRESS_UNSUPPORTED',
            `egress '${describeEgress(o.egress)}' cannot be enforced by backend ${o.backend.name}${o.network ? ` with network provider ${o.network.name}` : ''}; refusing to start with an open network (the QEMU and libkrun backends enforce policies when no network provider replaces their networking)`,
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
        egress: o.egress,
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
    });

    const onExit: Array<() => Promise<void>> = network ? [() => network.stop()] : [];
    if (o.backend.egressLogged ? o.backend.egressLogged(o.egress) : typeof o.egress === 'object') {
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
        await postBoot(inner);
      } catch (err) {
        if (life.signal.aborted && !signal?.aborted) throw life.signal.reason;
        throw err;
      }
    });
    async function postBoot(inner: SpanScope): Promise<void> {
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
  }
}

/** `flightRecorder` option: how many records to keep (0: none). */
function flightRecorderKeep(value: unknown): number {
  if (value === undefined) return 10;
  if (value === false) return 0;
  const o = v.object('flightRecorder', value);
  v.knownKeys('flightRecorder', o, ['keep']);
  return o.keep === undefined ? 10 : v.integer('flightRecorder.keep', o.keep, 0, 10_000);
}
