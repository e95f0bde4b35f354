/**
 * The launch plan: one JSON-serialisable description of a libkrun context's configuration.
 * It is validated here (TypeScript owns the rules and the messages), serialised, and applied by one
 * C++ function (native/common/plan.cc ApplyPlan) both in-process — {@link validateLaunchPlan}, which checks
 * a plan against the real libkrun without starting a VM — and in the runner, right before
 * `krun_start_enter`.
 *
 * The per-field normalisers below are shared with {@link KrunContext}, so a value accepted by a
 * context method is accepted in a plan and vice versa.
 */
import { awaitNative, callNative } from '../../errors';
import { addon } from '../../native';
import * as v from '../../validate';

/** libkrun log levels: 0 off, 1 error, 2 warn, 3 info, 4 debug, 5 trace. */
export type KrunLogLevel = 0 | 1 | 2 | 3 | 4 | 5;

/** Named log levels accepted wherever a {@link KrunLogLevel} is. */
export const LOG_LEVELS = { off: 0, error: 1, warn: 2, info: 3, debug: 4, trace: 5 } as const;

/** A host→guest TCP port forward. */
export interface PortMapping {
  host: number;
  guest: number;
}

/** `'all'` forwards every port the guest listens on; `'none'` forwards nothing. */
export type PortMapInput = 'all' | 'none' | readonly (PortMapping | string)[];

/** An extra virtio-fs share. */
export interface VirtiofsMount {
  /** Tag the guest mounts it by. */
  tag: string;
  /** Absolute host directory. */
  hostPath: string;
  /** Expose read-only. Default false. */
  readOnly?: boolean;
}

/** A virtio-net device backed by a userspace proxy (passt, gvproxy, socket_vmnet...). */
export interface NetDeviceInput {
  /** unixstream: passt/socket_vmnet; unixgram: gvproxy/vmnet-helper. */
  kind: 'unixstream' | 'unixgram';
  /** Socket path of the proxy (exactly one of path and fd). */
  path?: string;
  /** Already connected socket fd (exactly one of path and fd). */
  fd?: number;
  /** MAC address "xx:xx:xx:xx:xx:xx". */
  mac: string;
  /** virtio-net feature bits. Default 0. */
  features?: number;
  /** NET_FLAG_* bits. Default 0. */
  flags?: number;
}

/** A vsock port bridged to a host unix socket. */
export interface VsockPortInput {
  port: number;
  /** Absolute host socket path. */
  path: string;
  /** true: the guest listens and the host connects (needs krun_add_vsock_port2). */
  listen?: boolean;
}

/**
 * An rlimit as "RESOURCE=SOFT:HARD" or an object; RESOURCE is a name (`NOFILE`, `RLIMIT_NOFILE`) or
 * its Linux number (7). It always reaches libkrun as the number.
 */
export type RlimitInput =
  | string
  | { resource: keyof typeof RLIMIT_IDS | `RLIMIT_${keyof typeof RLIMIT_IDS}` | number; soft: number; hard: number };

/** What the guest runs (instead of the image's config in /.krun_config.json). */
export interface ExecInput {
  /** Executable path inside the guest. */
  path: string;
  /** Arguments after the executable. */
  args?: readonly string[];
  /** "KEY=VALUE" entries; `null` makes libkrun copy the host environment (rarely wanted). */
  env?: readonly string[] | null;
}

/**
 * Runner only: mount an overlay (read-only `lower`, writable `upper`/`work`) on `merged` in a
 * private mount namespace (plus a user namespace when not root) and serve `merged` as the root.
 */
export interface OverlayInput {
  lower: string;
  upper: string;
  work: string;
  merged: string;
}

/** Input of {@link buildLaunchPlan}. */
export interface LaunchPlanInput {
  libkrunPath: string;
  overlay?: OverlayInput;
  firmwarePath?: string;
  logLevel?: KrunLogLevel | keyof typeof LOG_LEVELS;
  cpus: number;
  memoryMiB: number;
  root: string;
  virtiofs?: readonly VirtiofsMount[];
  net?: readonly NetDeviceInput[];
  portMap?: PortMapInput;
  exec?: ExecInput;
  env?: readonly string[];
  workdir?: string;
  rlimits?: readonly RlimitInput[];
  consoleOutput?: string;
  vsockPorts?: readonly VsockPortInput[];
}

/** The wire form (version 1) read by native/common/plan.cc. */
export interface LaunchPlan {
  version: 1;
  libkrunPath: string;
  overlay?: OverlayInput;
  firmwarePath?: string;
  logLevel?: number;
  vm: { cpus: number; memoryMiB: number };
  root: string;
  virtiofs?: { tag: string; path: string; readOnly: boolean }[];
  net?: { kind: 'unixstream' | 'unixgram'; path?: string; fd?: number; mac: string; features: number; flags: number }[];
  portMap?: 'all' | 'none' | string[];
  exec?: { path: string; args: string[]; env: string[] | null };
  env?: string[];
  workdir?: string;
  rlimits?: string[];
  consoleOutput?: string;
  vsockPorts?: { port: number; path: string; listen?: boolean }[];
}

// ---- shared normalisers ------------------------------------------------------------------------

export function normalizeLogLevel(name: string, value: unknown): KrunLogLevel {
  if (typeof value === 'string' && value in LOG_LEVELS) return LOG_LEVELS[value as keyof typeof LOG_LEVELS];
  if (typeof value === 'string') {
    throw v.rangeError(
      `Expected one of ${Object.keys(LOG_LEVELS).join(', ')} or 0–5 for ${name} but received ${v.describe(value)}`,
    );
  }
  return v.integer(name, value, 0, 5) as KrunLogLevel;
}

export function normalizeVmConfig(cpus: unknown, memoryMiB: unknown): { cpus: number; memoryMiB: number } {
  return { cpus: v.integer('cpus', cpus, 1, 255), memoryMiB: v.integer('memoryMiB', memoryMiB, 32, 4_194_304) };
}

/**
 * Validates a port map. `pickFree`: host port 0 is allowed (run() replaces it with a free port);
 * libkrun's own port map needs real ports.
 */
export function normalizePortMap(name: string, value: unknown, pickFree = false): 'all' | 'none' | string[] {
  if (value === 'all' || value === 'none') return value;
  if (!Array.isArray(value)) {
    throw v.typeError(
      `Expected 'all', 'none' or an array of {host, guest} for ${name} but received ${v.describe(value)}`,
    );
  }
  const seenHost = new Set<number>();
  return value.map((item: unknown, i) => {
    let host: unknown;
    let guest: unknown;
    if (typeof item === 'string') {
      const m = /^(\d+):(\d+)$/.exec(item);
      if (!m) throw v.rangeError(`Expected "HOST:GUEST" for ${name}[${i}] but received ${v.describe(item)}`);
      host = Number(m[1]);
      guest = Number(m[2]);
    } else {
      const o = v.object(`${name}[${i}]`, item);
      v.knownKeys(`${name}[${i}]`, o, ['host', 'guest']);
      host = o.host;
      guest = o.guest;
    }
    const h = v.integer(`${name}[${i}].host`, host, pickFree ? 0 : 1, 65535);
    const g = v.integer(`${name}[${i}].guest`, guest, 1, 65535);
    if (h !== 0 && seenHost.has(h)) throw v.rangeError(`Host port ${h} appears twice in ${name}`);
    seenHost.add(h);
    return `${h}:${g}`;
  });
}

export function normalizeVirtiofs(name: string, value: unknown): { tag: string; path: string; readOnly: boolean } {
  const o = v.object(name, value);
  v.knownKeys(name, o, ['tag', 'hostPath', 'readOnly']);
  const tag = v.string(`${name}.tag`, o.tag, { maxLength: 36 });
  if (!/^[A-Za-z0-9_.\-/]+$/.test(tag)) {
    throw v.rangeError(`Expected letters, digits, '_', '.', '-' or '/' in ${name}.tag but received ${v.describe(tag)}`);
  }
  return {
    tag,
    path: v.absolutePath(`${name}.hostPath`, o.hostPath),
    readOnly: o.readOnly === undefined ? false : v.boolean(`${name}.readOnly`, o.readOnly),
  };
}

export function parseMac(name: string, value: unknown): number[] {
  const s = v.string(name, value);
  if (!/^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/.test(s)) {
    throw v.rangeError(`Expected a MAC address xx:xx:xx:xx:xx:xx for ${name} but received ${v.describe(s)}`);
  }
  const bytes = s.split(':').map((b) => parseInt(b, 16));
  if ((bytes[0] & 1) === 1)
    throw v.rangeError(`Expected a unicast MAC address for ${name} but received ${s} (multicast bit set)`);
  return bytes;
}

export function normalizeNet(name: string, value: unknown): NonNullable<LaunchPlan['net']>[number] {
  const o = v.object(name, value);
  v.knownKeys(name, o, ['kind', 'path', 'fd', 'mac', 'features', 'flags']);
  if (o.kind !== 'unixstream' && o.kind !== 'unixgram') {
    throw v.rangeError(`Expected 'unixstream' or 'unixgram' for ${name}.kind but received ${v.describe(o.kind)}`);
  }
  if ((o.path === undefined) === (o.fd === undefined)) {
    throw v.typeError(`Expected exactly one of ${name}.path and ${name}.fd`);
  }
  const mac = parseMac(`${name}.mac`, o.mac);
  const dev: NonNullable<LaunchPlan['net']>[number] = {
    kind: o.kind,
    mac: mac.map((b) => b.toString(16).padStart(2, '0')).join(':'),
    features: o.features === undefined ? 0 : v.integer(`${name}.features`, o.features, 0, 0xffffffff),
    flags: o.flags === undefined ? 0 : v.integer(`${name}.flags`, o.flags, 0, 0xffffffff),
  };
  if (o.path !== undefined) dev.path = v.absolutePath(`${name}.path`, o.path);
  else dev.fd = v.integer(`${name}.fd`, o.fd, 0, 2_147_483_647);
  return dev;
}

export function normalizeVsockPort(name: string, value: unknown): NonNullable<LaunchPlan['vsockPorts']>[number] {
  const o = v.object(name, value);
  v.knownKeys(name, o, ['port', 'path', 'listen']);
  const out: NonNullable<LaunchPlan['vsockPorts']>[number] = {
    port: v.integer(`${name}.port`, o.port, 1, 0xffffffff),
    path: v.absolutePath(`${name}.path`, o.path),
  };
  if (Buffer.byteLength(out.path) > 107)
    throw v.rangeError(`Expected a unix socket path of at most 107 bytes for ${name}.path`);
  if (o.listen !== undefined) out.listen = v.boolean(`${name}.listen`, o.listen);
  return out;
}

/** Linux resource numbers (asm-generic/resource.h; the same on x86_64 and aarch64). */
export const RLIMIT_IDS = {
  CPU: 0,
  FSIZE: 1,
  DATA: 2,
  STACK: 3,
  CORE: 4,
  RSS: 5,
  NPROC: 6,
  NOFILE: 7,
  MEMLOCK: 8,
  AS: 9,
  LOCKS: 10,
  SIGPENDING: 11,
  MSGQUEUE: 12,
  NICE: 13,
  RTPRIO: 14,
  RTTIME: 15,
} as const;

/**
 * An rlimit for libkrun: "ID=SOFT:HARD" with the NUMERIC resource ID, which is what libkrun's guest
 * init parses (strtoull). Accepts a name (`NOFILE`, `RLIMIT_NOFILE`) or a number (7), as a string
 * ("NOFILE=1024:4096", "7=1024:4096") or an object ({ resource, soft, hard }).
 */
export function normalizeRlimit(name: string, value: unknown): string {
  let resource: unknown;
  let soft: unknown;
  let hard: unknown;
  if (typeof value === 'string') {
    const m = /^(?:RLIMIT_)?([A-Z]+|\d+)=(\d+):(\d+)$/.exec(value);
    if (!m) throw v.rangeError(`Expected "RESOURCE=SOFT:HARD" for ${name} but received ${v.describe(value)}`);
    [resource, soft, hard] = [/^\d+$/.test(m[1]) ? Number(m[1]) : m[1], Number(m[2]), Number(m[3])];
  } else {
    const o = v.object(name, value);
    v.knownKeys(name, o, ['resource', 'soft', 'hard']);
    resource = typeof o.resource === 'string' ? o.resource.replace(/^RLIMIT_/, '') : o.resource;
    soft = o.soft;
    hard = o.hard;
  }
  const ids = Object.values(RLIMIT_IDS) as number[];
  let id: number;
  if (typeof resource === 'number') {
    if (!ids.includes(resource))
      throw v.rangeError(`Expected a resource number 0–15 for ${name}.resource but received ${v.describe(resource)}`);
    id = resource;
  } else {
    const r = v.string(`${name}.resource`, resource);
    if (!Object.hasOwn(RLIMIT_IDS, r)) {
      throw v.rangeError(
        `Expected one of ${Object.keys(RLIMIT_IDS).join(', ')} (or its number) for ${name}.resource but received ${v.describe(r)}`,
      );
    }
    id = RLIMIT_IDS[r as keyof typeof RLIMIT_IDS];
  }
  const s = v.integer(`${name}.soft`, soft, 0, Number.MAX_SAFE_INTEGER);
  const h = v.integer(`${name}.hard`, hard, 0, Number.MAX_SAFE_INTEGER);
  if (s > h) throw v.rangeError(`Expected ${name}.soft (${s}) to be at most ${name}.hard (${h})`);
  return `${id}=${s}:${h}`;
}

export function normalizeExec(name: string, value: unknown): NonNullable<LaunchPlan['exec']> {
  const o = v.object(name, value);
  v.knownKeys(name, o, ['path', 'args', 'env']);
  return {
    path: v.string(`${name}.path`, o.path),
    args: o.args === undefined ? [] : v.stringArray(`${name}.args`, o.args, { allowEmptyItems: true }),
    env: o.env === undefined ? [] : o.env === null ? null : v.envEntries(`${name}.env`, o.env),
  };
}

// ---- the plan ----------------------------------------------------------------------------------

const PLAN_KEYS = [
  'overlay',
  'libkrunPath',
  'firmwarePath',
  'logLevel',
  'cpus',
  'memoryMiB',
  'root',
  'virtiofs',
  'net',
  'portMap',
  'exec',
  'env',
  'workdir',
  'rlimits',
  'consoleOutput',
  'vsockPorts',
] as const;

/** Validates `input` and returns the wire form. Throws TypeError/RangeError naming the option. */
export function buildLaunchPlan(input: LaunchPlanInput): LaunchPlan {
  const o = v.object('plan', input);
  v.knownKeys('plan', o, PLAN_KEYS);
  const plan: LaunchPlan = {
    version: 1,
    libkrunPath: v.absolutePath('libkrunPath', o.libkrunPath),
    vm: normalizeVmConfig(o.cpus, o.memoryMiB),
    root: v.absolutePath('root', o.root),
  };
  if (o.overlay !== undefined) {
    const ov = v.object('overlay', o.overlay);
    v.knownKeys('overlay', ov, ['lower', 'upper', 'work', 'merged']);
    const dirs = {} as OverlayInput;
    for (const k of ['lower', 'upper', 'work', 'merged'] as const) {
      const d = v.absolutePath(`overlay.${k}`, ov[k]);
      if (/[,:\\]/.test(d))
        throw v.rangeError(
          `Expected overlay.${k} without ',', ':' or '\\' (overlayfs option syntax) but received ${v.describe(d)}`,
        );
      dirs[k] = d;
    }
    if (plan.root !== dirs.merged) throw v.rangeError('With overlay, root must be overlay.merged');
    plan.overlay = dirs;
  }
  if (o.firmwarePath !== undefined) plan.firmwarePath = v.absolutePath('firmwarePath', o.firmwarePath);
  if (o.logLevel !== undefined) plan.logLevel = normalizeLogLevel('logLevel', o.logLevel);
  if (o.virtiofs !== undefined) {
    if (!Array.isArray(o.virtiofs))
      throw v.typeError(`Expected an array for virtiofs but received ${v.describe(o.virtiofs)}`);
    plan.virtiofs = o.virtiofs.map((m: unknown, i) => normalizeVirtiofs(`virtiofs[${i}]`, m));
    const tags = new Set<string>();
    for (const m of plan.virtiofs) {
      if (tags.has(m.tag)) throw v.rangeError(`virtiofs tag ${JSON.stringify(m.tag)} is used twice`);
      tags.add(m.tag);
    }
  }
  if (o.net !== undefined) {
    if (!Array.isArray(o.net)) throw v.typeError(`Expected an array for net but received ${v.describe(o.net)}`);
    plan.net = o.net.map((n: unknown, i) => normalizeNet(`net[${i}]`, n));
  }
  if (o.portMap !== undefined) {
    plan.portMap = normalizePortMap('portMap', o.portMap);
    if (plan.net && plan.net.length > 0 && plan.portMap !== 'none') {
      throw v.rangeError(
        'portMap only applies to TSI networking; with a virtio-net device (net) forward ports in the network proxy instead',
      );
    }
  }
  if (o.exec !== undefined) plan.exec = normalizeExec('exec', o.exec);
  if (o.env !== undefined) plan.env = v.envEntries('env', o.env);
  if (o.workdir !== undefined) plan.workdir = v.string('workdir', o.workdir);
  if (o.rlimits !== undefined) {
    if (!Array.isArray(o.rlimits))
      throw v.typeError(`Expected an array for rlimits but received ${v.describe(o.rlimits)}`);
    plan.rlimits = o.rlimits.map((r: unknown, i) => normalizeRlimit(`rlimits[${i}]`, r));
  }
  if (o.consoleOutput !== undefined) plan.consoleOutput = v.absolutePath('consoleOutput', o.consoleOutput);
  if (o.vsockPorts !== undefined) {
    if (!Array.isArray(o.vsockPorts))
      throw v.typeError(`Expected an array for vsockPorts but received ${v.describe(o.vsockPorts)}`);
    plan.vsockPorts = o.vsockPorts.map((p: unknown, i) => normalizeVsockPort(`vsockPorts[${i}]`, p));
  }
  return plan;
}

/** Serialises a plan and checks that the native reader accepts it (no libkrun needed). */
export function serializeLaunchPlan(plan: LaunchPlan): string {
  const text = JSON.stringify(plan);
  callNative(() => addon().checkPlan(text));
  return text;
}

/**
 * Applies `plan` to a fresh context of the real libkrun named in it, then frees the context: a
 * dry run of everything but `krun_start_enter`. Rejects with a {@link KrunError} naming the
 * failing libkrun call, or `ERR_MICROVM_LIBKRUN_LOAD` / `ERR_MICROVM_LIBKRUNFW_LOAD`.
 */
export async function validateLaunchPlan(plan: LaunchPlan): Promise<void> {
  await awaitNative(addon().validatePlan(serializeLaunchPlan(plan)));
}
