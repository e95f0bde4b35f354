/**
 * run()'s options: their types, and their validation into the normalized form the stages use.
 */
import { defaultCacheDir, defaultDataRoot } from '../paths';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { type MeterProvider, type TracerProvider } from '@opentelemetry/api';
import { libkrunBackend } from '../backends/libkrun';
import { qemuBackend } from '../backends/qemu';
import type { Backend, EgressPolicy, ImageRuntimeConfig } from '../backends/types';
import { type AccelChoice, parseAccel } from '../host/kvm';
import { normalizeWaitFor, type WaitStrategy } from '../wait-for';
import { parsePullPolicy, type PullPolicy } from '../image/pull';
import type { NetworkProvider } from '../network/start';
import { parseEgress } from '../network/egress';
import { planEgress } from '../network/policy';
import { IDLE_COMMAND } from '../guest/protocol';
import { admissionLimit } from './admission';
import {
  normalizeLogLevel,
  normalizePortMap,
  normalizeVirtiofs,
  type KrunLogLevel,
  type LOG_LEVELS,
} from '../backends/libkrun/plan';
import { type PreflightCheck } from '../preflight/checks';
import { type CloneStrategy } from '../rootfs/clone';
import { type RootfsHook } from '../rootfs/hooks';
import { type SpanScope } from '../telemetry/tracer';
import * as v from '../validate';
import { MicroVM } from '../vm';
import { VM_NAME } from '../vm-dir';

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
  /**
   * Keep the VM up for `exec`/`spawn`/copies only: the guest runs no command of its own (not the
   * image's Entrypoint/Cmd) and serves its agent until stopped; exec gets the image's Env,
   * WorkingDir and User (QEMU backend). The sandbox pattern: `run(image, { idle: true })`, then
   * `vm.exec(...)` as often as needed. Excludes `initOverride` and `agent: false`. Default false.
   */
  idle?: boolean;
  /**
   * How many VMs may boot at once on this data root, across processes (lib/run/admission.ts): a
   * start beyond it waits for a slot before its hypervisor starts (span microvm.AdmissionWait;
   * `signal` ends the wait). Default $MICROVM_MAX_BOOTS, else the host's cores (at least 2).
   */
  maxConcurrentBoots?: number;
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

/** Every option of run(), once: TypeScript checks it against RunOptions (none missing, none extra). */
const RUN_OPTION_KEYS: Record<keyof RunOptions, true> = {
  flightRecorder: true,
  waitFor: true,
  pull: true,
  maxCacheBytes: true,
  autoRemove: true,
  name: true,
  cpus: true,
  memoryMiB: true,
  ports: true,
  initOverride: true,
  idle: true,
  maxConcurrentBoots: true,
  env: true,
  workdir: true,
  rootfsPath: true,
  imageConfig: true,
  rootfsHooks: true,
  postBoot: true,
  preflight: true,
  preflightChecks: true,
  virtiofs: true,
  dataDir: true,
  cleanDataDir: true,
  imageCache: true,
  logLevel: true,
  backend: true,
  cloneStrategies: true,
  network: true,
  egress: true,
  outputTimes: true,
  logMaxBytes: true,
  tracerProvider: true,
  meterProvider: true,
  signal: true,
  ssh: true,
  agent: true,
  accel: true,
  timeouts: true,
};

/** The option names run() accepts (unknown ones are refused). */
export const RUN_KEYS = Object.keys(RUN_OPTION_KEYS) as (keyof RunOptions)[];

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
export function normalize(image: string, options: RunOptions) {
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
  const idle = o.idle === undefined ? false : v.boolean('idle', o.idle);
  if (idle && o.initOverride !== undefined)
    throw v.valueError('idle and initOverride exclude each other: an idle VM runs no command of its own');
  if (idle && !agent)
    throw v.valueError('idle needs the guest agent (agent: false was given): an idle VM is reached through it');
  const maxConcurrentBoots = admissionLimit(
    o.maxConcurrentBoots === undefined ? undefined : v.integer('maxConcurrentBoots', o.maxConcurrentBoots, 1, 4096),
  );
  return {
    id,
    name,
    maxConcurrentBoots,
    cpus: o.cpus === undefined ? 1 : v.integer('cpus', o.cpus, 1, 255),
    memoryMiB: o.memoryMiB === undefined ? 512 : v.integer('memoryMiB', o.memoryMiB, 32, 4_194_304),
    ports,
    initOverride: idle
      ? [...IDLE_COMMAND]
      : o.initOverride === undefined
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
    // Checked, and resolved once for enforcement (lib/network/policy.ts).
    egress: planEgress(parseEgress(o.egress)),
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

/** `flightRecorder` option: how many records to keep (0: none). */
function flightRecorderKeep(value: unknown): number {
  if (value === undefined) return 10;
  if (value === false) return 0;
  const o = v.object('flightRecorder', value);
  v.knownKeys('flightRecorder', o, ['keep']);
  return o.keep === undefined ? 10 : v.integer('flightRecorder.keep', o.keep, 0, 10_000);
}

/** run()'s options, validated, with their defaults. */
export type NormalizedRunOptions = ReturnType<typeof normalize>;
