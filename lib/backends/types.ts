/**
 * The Backend interface: how a VM is actually started. `libkrun` (lib/backends/libkrun/) and
 * `qemu` (lib/backends/qemu/) are the built-in ones; other backends plug in by implementing this
 * and passing the object as `run(image, { backend })`.
 */
import type { MicrovmError } from '../errors';
import type { SpanScope } from '../telemetry/tracer';
import type { ClonedRootfs } from '../rootfs/clone';
import type { PreflightCheck } from '../preflight/checks';

/**
 * One egress rule. Exactly one of `host` and `cidr`:
 * - `{ host: 'api.example.com', port: 443, address? }` (allow only): relayed. The name gets a virtual
 *   address in the guest's /etc/hosts; each connection to it and the port goes to a relay on the
 *   host that connects to that host (or `address`) and nothing else. No DNS involved.
 * - `{ host: '*.example.com' | 'example.com', port?, protocol? }` without a port, or with a wildcard:
 *   by DNS. Questions for the name are answered (refused names get NXDOMAIN) and the addresses
 *   in the answers are reachable (on `port`, `protocol` if given) while the answer is fresh.
 *   `*.example.com` covers every name below example.com, not example.com itself.
 * - `{ cidr: '203.0.113.0/24' | '2001:db8::/32', port?, protocol? }`: addresses.
 * In `deny`, a host rule refuses the name's DNS questions and the addresses learned for it.
 */
export interface EgressRule {
  host?: string;
  cidr?: string;
  /** Any port when not given (required for a relayed host rule). */
  port?: number;
  /** 'tcp' or 'udp'; both (and ICMP) when not given. */
  protocol?: 'tcp' | 'udp';
  /** Relayed host rules: connect here instead of resolving `host` (IPv4 or IPv6), like curl's --resolve. */
  address?: string;
}

/**
 * Outbound network policy for the guest: `'allow'` (default: everything the host can reach),
 * `'deny'` (nothing; published ports still answer) or rules: `{ allow?: [...], deny?: [...], dns? }`.
 * Deny rules win over allow rules; what no rule names is refused when there are allow rules and
 * allowed when there are only deny rules. `dns`: the resolver ('IP' or 'IP:PORT') allowed questions
 * go to (default: the one the guest asked, through QEMU). See docs/security.md.
 */
export type EgressPolicy = 'allow' | 'deny' | { allow?: EgressRule[]; deny?: EgressRule[]; dns?: string };

/** The kinds of egress policy, as a backend lists those it can enforce. */
export type EgressMode = 'allow' | 'deny' | 'allow-list';

/** The image's runtime configuration (OCI `config` section), as far as the VM needs it. */
export interface ImageRuntimeConfig {
  entrypoint: string[];
  cmd: string[];
  env: string[];
  workingDir: string;
  /** The image's User (`name`, `uid` or `uid:gid`): the agent's exec runs as it unless a call says otherwise. */
  user?: string;
}

/** Input of {@link Backend.prepareRootfs} (stage microvm.BackendPrepare). */
export interface BackendPrepareInput {
  vmId: string;
  dataDir: string;
  rootfs: ClonedRootfs;
  image: ImageRuntimeConfig;
  /** argv replacing the image's Entrypoint+Cmd. */
  initOverride?: string[];
  /** Extra "KEY=VALUE" entries (after the image's). */
  env: string[];
  workdir?: string;
  /** virtio-fs shares the guest should mount (by tag) at a path; see guest init. */
  mounts?: { tag: string; guestPath: string; readOnly: boolean }[];
  /** The egress policy start() will get (a backend may need to prepare the guest for it). */
  egress?: EgressPolicy;
  /** Have the guest record when each chunk of the command's output arrives (run()'s `outputTimes`). */
  outputTimes?: boolean;
  scope: SpanScope;
  signal?: AbortSignal;
}

/** Input of {@link Backend.start} (stage microvm.VMSpawn, span microvm.backend.Start). */
export interface BackendStartInput {
  vmId: string;
  name: string;
  dataDir: string;
  rootfs: ClonedRootfs;
  cpus: number;
  memoryMiB: number;
  ports: { host: number; guest: number }[];
  virtiofs: { tag: string; hostPath: string; readOnly: boolean; guestPath?: string }[];
  logLevel: number;
  /** Guest console output file (kernel and init messages; the command's output where not separated). */
  consoleLogPath: string;
  /** Where a backend that can separate them puts the guest command's stdout and stderr. */
  stdoutPath: string;
  stderrPath: string;
  /** The VMM's own stdout/stderr. */
  logPath: string;
  /**
   * How long the guest may take to show a sign of life (the QEMU backend: its init started) before
   * the start fails with ERR_MICROVM_BOOT_TIMEOUT.
   */
  bootTimeoutMs: number;
  /** What the guest may reach: 'allow' everything the host can, 'deny' nothing (published ports still work). */
  egress?: EgressPolicy;
  /** As BackendPrepareInput's: the QEMU backend provides the port microvm.logtimes only then. */
  outputTimes?: boolean;
  /** The most each of the console, stdout and stderr files keeps (run()'s `logMaxBytes`). */
  logMaxBytes?: number;
  /** Set when a network provider replaced TSI (virtio-net over a unix socket). */
  network?: { kind: 'unixstream' | 'unixgram'; socketPath: string; mac: string };
  scope: SpanScope;
  /** Where spans from inside the guest go (the microvm.Run scope); see lib/telemetry/guest.ts. */
  guestScope?: SpanScope;
  signal?: AbortSignal;
}

/**
 * How a VM ended, told truthfully:
 * - `exited`: the guest command exited by itself with `exitCode` (128+N when it died of signal N);
 * - `stopped`: `stop()` or a signal to the VM's process ended it (`signal` says which);
 * - `failed`: the hypervisor failed (crashed, paused on an internal error, the guest kernel
 *   panicked or never booted): `error` is the coded error with the hypervisor's last log lines.
 */
export type VmExit =
  | { reason: 'exited'; exitCode: number; signal: null; error?: undefined }
  | { reason: 'stopped'; exitCode: null; signal: NodeJS.Signals; error?: undefined }
  | { reason: 'failed'; exitCode: null; signal: NodeJS.Signals | null; error: MicrovmError };

/** A started VM as a backend sees it. */
export interface BackendHandle {
  /** The process that owns the VM (its process group when detached). */
  readonly pid: number;
  /** Path of the executable behind `pid`, for the PID-reuse guard. */
  readonly executable: string;
  /** Settles with how the VM ended. */
  readonly exited: Promise<VmExit>;
  /** Set when the backend wrote the guest command's stdout/stderr apart from the console. */
  readonly stdoutPath?: string;
  readonly stderrPath?: string;
  /**
   * The unix socket of the guest agent's channel (lib/agent/), when the backend provides one
   * (QEMU); run() connects to it in PostBoot (microvm.AgentWaitReady).
   */
  readonly agentSocketPath?: string;
  /**
   * The socket accepts before the guest's agent listens, and a connection closed before any frame
   * means "not yet" (libkrun's vsock bridge): connecting keeps trying until the timeout or the VM's end.
   */
  readonly agentAcceptsLate?: boolean;
  /**
   * A control socket (QMP) any process may use to pause and resume the VM (lib/pause.ts); the
   * backend's own watcher then leaves a requested pause alone. Undefined: the VM cannot be paused.
   */
  readonly controlSocketPath?: string;
  /** The accelerator the VM runs with, where the backend chooses one (QEMU: 'kvm' | 'tcg'). */
  readonly accel?: string;
  /** Signals the VM's process group. */
  kill(signal: NodeJS.Signals): boolean;
  /**
   * Whether the VM's process keeps this process's event loop alive (as `child.ref()`/`unref()`).
   * A VM tied to this process (the default of both built-in backends) starts ref'd; see
   * `MicroVM.unref()`.
   */
  ref?(): void;
  unref?(): void;
  /**
   * While a host connection to the forwarded `hostPort` is open: the state of its guest side
   * (`'ESTABLISHED'` once the guest accepted, `'SYN_SENT'` while it has not answered), undefined
   * when the hypervisor has none. Only where a host-side accept proves nothing about the guest
   * (QEMU's user network accepts at once and keeps the connection while the guest is silent).
   */
  tcpForwardState?(hostPort: number): Promise<string | undefined>;
}

export interface Backend {
  /** Short name, reported as the `microvm.backend` attribute. */
  readonly name: string;
  /** Whether `start` can serve an overlay root it mounts itself (O(1) clone). */
  readonly supportsOverlay: boolean;
  /**
   * Egress policies `start` can enforce outside the guest (`input.egress`); 'allow' always works.
   * run() refuses a policy the backend lacks (ERR_MICROVM_EGRESS_UNSUPPORTED), never runs open.
   */
  readonly egressPolicies?: readonly EgressMode[];
  /** Takes run()'s `accel` choice (QEMU); run() refuses `accel` for a backend that does not. */
  readonly takesAccel?: boolean;
  /** What the guest's network is when run() has no `network` provider, for the spans ('qemu-user', 'tsi'). */
  readonly networkName?: string;
  /**
   * The file server maps a copied root's owners from `user.containers.override_stat` when the caller
   * is not root (libkrun's virtio-fs): run() then runs the stage microvm.VirtioFSOverrideStat.
   */
  readonly needsOverrideStat?: boolean;
  /**
   * Whether `start` logs this egress policy's decisions to the VM's egress.log (run() then follows
   * it in the trace). Default: policies with rules.
   */
  egressLogged?(policy: EgressPolicy): boolean;
  /** The checks this backend needs before a start (run() adds the host's own: disk, memory, ports...). */
  preflightChecks?(input: { egress: EgressPolicy }): PreflightCheck[];
  /** The same backend, but its VMs outlive this process (`microvm run -d`). */
  detached?(): Backend;
  /** Writes what the guest needs into the VM's writable rootfs layer. */
  prepareRootfs(input: BackendPrepareInput): Promise<void>;
  /** Starts the VM; resolves once it is configured and starting. */
  start(input: BackendStartInput): Promise<BackendHandle>;
}

/** Signals that mean "someone stopped it" rather than "it crashed". */
export const STOP_SIGNALS = new Set<NodeJS.Signals>(['SIGTERM', 'SIGKILL', 'SIGINT', 'SIGHUP', 'SIGQUIT']);
