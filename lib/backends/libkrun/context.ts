/**
 * {@link KrunContext}: one libkrun configuration context, with a method per configuration call the
 * pipeline needs. Arguments are validated here (TypeError/RangeError naming the option) before they
 * reach C++; a negative libkrun return becomes a {@link KrunError} (`code` = errno name,
 * `errno`, `syscall` = the krun function).
 *
 * A context only records settings; starting the VM is the runner's job (`krun_start_enter` takes
 * over its process and never returns). Contexts are freed by {@link KrunContext.free}, by garbage
 * collection, or when the Node environment (thread) exits.
 */
import { awaitNative, callNative } from '../../errors';
import { addon, type NativeKrunContext } from '../../native';
import {
  type ExecInput,
  type KrunLogLevel,
  LOG_LEVELS,
  type NetDeviceInput,
  normalizeExec,
  normalizeLogLevel,
  normalizeNet,
  normalizePortMap,
  normalizeRlimit,
  normalizeVirtiofs,
  normalizeVmConfig,
  normalizeVsockPort,
  parseMac,
  type PortMapInput,
  type RlimitInput,
  type VirtiofsMount,
  type VsockPortInput,
} from './plan';
import * as v from '../../validate';

/** KRUN_FEATURE_* constants for {@link KrunContext.hasFeature}. */
export const KrunFeature = {
  NET: 0,
  BLK: 1,
  GPU: 2,
  INPUT: 4,
  TEE: 6,
  AMD_SEV: 7,
  INTEL_TDX: 8,
  AWS_NITRO: 9,
  VIRGL_RESOURCE_MAP2: 10,
  INIT_BLOB: 11,
} as const;

/** Options of {@link KrunContext.create}. */
export interface CreateContextOptions {
  /** Absolute path of libkrun.so.1 (see `resolveRuntime`). */
  libkrunPath: string;
  /**
   * Absolute path of libkrunfw.so.5 (see `resolveFirmware`). It is loaded first so that libkrun's
   * own `dlopen("libkrunfw.so.5")` finds this copy. Omit to let libkrun search by itself.
   */
  firmwarePath?: string;
}

export class KrunContext {
  readonly #native: NativeKrunContext;
  readonly #tags = new Set<string>();

  private constructor(native: NativeKrunContext) {
    this.#native = native;
  }

  /** Loads libkrun (off the JS thread) and creates a context (`krun_create_ctx`). */
  static async create(options: CreateContextOptions): Promise<KrunContext> {
    const o = v.object('options', options);
    v.knownKeys('options', o, ['libkrunPath', 'firmwarePath']);
    const lib = v.absolutePath('libkrunPath', o.libkrunPath);
    const fw = o.firmwarePath === undefined ? '' : v.absolutePath('firmwarePath', o.firmwarePath);
    return new KrunContext(await awaitNative(addon().createContext(lib, fw)));
  }

  /** The libkrun context id. */
  get id(): number {
    return this.#native.id;
  }

  /** Whether {@link free} was called. */
  get freed(): boolean {
    return this.#native.freed;
  }

  /** The libkrun this context belongs to. */
  get libkrunPath(): string {
    return this.#native.libkrunPath;
  }

  /** `krun_set_log_level` (process-wide in libkrun). */
  setLogLevel(level: KrunLogLevel | keyof typeof LOG_LEVELS): this {
    const l = normalizeLogLevel('level', level);
    callNative(() => this.#native.setLogLevel(l));
    return this;
  }

  /** `krun_set_vm_config`. */
  setVmConfig(config: { cpus: number; memoryMiB: number }): this {
    const o = v.object('config', config);
    v.knownKeys('config', o, ['cpus', 'memoryMiB']);
    const c = normalizeVmConfig(o.cpus, o.memoryMiB);
    callNative(() => this.#native.setVmConfig(c.cpus, c.memoryMiB));
    return this;
  }

  /** `krun_set_root`: the host directory served as the guest's root over virtio-fs. */
  setRoot(path: string): this {
    const p = v.absolutePath('path', path);
    callNative(() => this.#native.setRoot(p));
    return this;
  }

  /** `krun_add_virtiofs3` (or `krun_add_virtiofs` on an older libkrun when not read-only). */
  addVirtiofs(mount: VirtiofsMount): this {
    const m = normalizeVirtiofs('mount', mount);
    // libkrun 1.19 accepts a tag twice; the guest then cannot tell the shares apart.
    if (this.#tags.has(m.tag))
      throw v.rangeError(`virtiofs tag ${JSON.stringify(m.tag)} is already added to this context`);
    this.#tags.add(m.tag);
    callNative(() => this.#native.addVirtiofs(m.tag, m.path, m.readOnly));
    return this;
  }

  /**
   * `krun_set_port_map`: `'none'` (empty list) or a list of forwards. `'all'` (every listening
   * guest port) is libkrun's default: it makes no call (the header's NULL crashes libkrun 1.19).
   */
  setPortMap(map: PortMapInput): this {
    const m = normalizePortMap('map', map);
    callNative(() => this.#native.setPortMap(m));
    return this;
  }

  /** `krun_set_exec`. */
  setExec(exec: ExecInput): this {
    const e = normalizeExec('exec', exec);
    callNative(() => this.#native.setExec(e.path, e.args, e.env));
    return this;
  }

  /** `krun_set_env`: "KEY=VALUE" entries. */
  setEnv(env: readonly string[]): this {
    const e = v.envEntries('env', env);
    callNative(() => this.#native.setEnv(e));
    return this;
  }

  /** `krun_set_workdir`: a path inside the guest. */
  setWorkdir(path: string): this {
    const p = v.string('path', path);
    callNative(() => this.#native.setWorkdir(p));
    return this;
  }

  /** `krun_set_rlimits`. */
  setRlimits(rlimits: readonly RlimitInput[]): this {
    if (!Array.isArray(rlimits)) throw v.typeError(`Expected an array for rlimits but received ${v.describe(rlimits)}`);
    const r = rlimits.map((x: unknown, i) => normalizeRlimit(`rlimits[${i}]`, x));
    callNative(() => this.#native.setRlimits(r));
    return this;
  }

  /** `krun_set_console_output`: the guest console goes to this host file. */
  setConsoleOutput(path: string): this {
    const p = v.absolutePath('path', path);
    callNative(() => this.#native.setConsoleOutput(p));
    return this;
  }

  /** `krun_add_net_unixstream` / `krun_add_net_unixgram`, by `device.kind`. */
  addNet(device: NetDeviceInput): this {
    const d = normalizeNet('device', device);
    const mac = parseMac('device.mac', d.mac);
    callNative(() => this.#native.addNet(d.kind, d.path ?? null, d.fd ?? -1, mac, d.features, d.flags));
    return this;
  }

  /** `krun_add_vsock_port` (or `krun_add_vsock_port2` when `listen` is given). */
  addVsockPort(port: VsockPortInput): this {
    const p = normalizeVsockPort('port', port);
    callNative(() => this.#native.addVsockPort(p.port, p.path, p.listen));
    return this;
  }

  /** `krun_has_feature`: whether this libkrun was built with a feature. */
  hasFeature(feature: number): boolean {
    const f = v.integer('feature', feature, 0, 63);
    return callNative(() => this.#native.hasFeature(f));
  }

  /** `krun_free_ctx`. Idempotent. */
  free(): void {
    callNative(() => this.#native.free());
  }

  /** Frees the context (`using ctx = await KrunContext.create(...)`). */
  [Symbol.dispose](): void {
    this.free();
  }
}
