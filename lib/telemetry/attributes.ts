/**
 * Span names and attribute keys: a fixed, documented set (docs/telemetry.md). No ids in names.
 * Names follow go-microvm's tracing so traces from both read the same.
 */

/** Span names. */
export const SPAN = {
  RUN: 'microvm.Run',
  PREFLIGHT: 'microvm.Preflight',
  PREFLIGHT_RUN_ALL: 'microvm.preflight.RunAll',
  PREFLIGHT_CHECK: 'microvm.preflight.Check',
  IMAGE_PULL: 'microvm.ImagePull',
  IMAGE_CACHE_LOOKUP: 'microvm.image.CacheLookup',
  IMAGE_FETCH: 'microvm.image.Fetch',
  IMAGE_EXTRACT: 'microvm.image.Extract',
  IMAGE_CACHE_STORE: 'microvm.image.CacheStore',
  ROOTFS_CLONE: 'microvm.RootfsClone',
  ROOTFS_HOOKS: 'microvm.RootfsHooks',
  BACKEND_PREPARE: 'microvm.BackendPrepare',
  NETWORK_START: 'microvm.NetworkStart',
  /** An egress allow-list's connections while the VM runs (lib/network/egress-audit.ts). */
  NETWORK_EGRESS: 'microvm.network.Egress',
  /** libkrun as a user other than root, on a copied rootfs: owner overrides (lib/rootfs/override-stat.ts). */
  VIRTIOFS_OVERRIDE_STAT: 'microvm.VirtioFSOverrideStat',
  /** Waiting for a boot slot (lib/run/admission.ts) before VMSpawn; ~0 when one is free. */
  ADMISSION_WAIT: 'microvm.AdmissionWait',
  VM_SPAWN: 'microvm.VMSpawn',
  BACKEND_START: 'microvm.backend.Start',
  BACKEND_RESOLVE_RUNTIME: 'microvm.backend.ResolveRuntime',
  BACKEND_RESOLVE_FIRMWARE: 'microvm.backend.ResolveFirmware',
  POST_BOOT: 'microvm.PostBoot',
  SSH_WAIT_READY: 'microvm.SSHWaitReady',
  /** The guest agent answered its first hello (lib/agent/). */
  AGENT_WAIT_READY: 'microvm.AgentWaitReady',
  /** One `vm.exec()`/`vm.spawn()` through the agent, from start to exit (its W3C context goes to the command). */
  EXEC: 'microvm.Exec',
  /** `vm.pause()` / `vm.resume()` (and `microvm pause`/`unpause`): the guest's vCPUs stopped / let run again. */
  PAUSE: 'microvm.Pause',
  RESUME: 'microvm.Resume',
  WAIT_FOR_LOG: 'microvm.WaitForLog',
  WAIT_FOR_TCP: 'microvm.WaitForTCP',
  WAIT_FOR_HTTP: 'microvm.WaitForHTTP',
  /** Inside the guest (QEMU backend), from the guest init's milestones; see lib/telemetry/guest.ts. */
  GUEST_BOOT: 'microvm.guest.Boot',
  GUEST_KERNEL: 'microvm.guest.Kernel',
  GUEST_MOUNTS: 'microvm.guest.Mounts',
  GUEST_NETWORK: 'microvm.guest.Network',
  GUEST_CONFIG: 'microvm.guest.Config',
  GUEST_EXEC: 'microvm.guest.Exec',
} as const;

/**
 * Attribute keys. Those go-microvm sets are spelled as it spells them (a dashboard built on its
 * traces works on ours); the rest are ours, in the same `microvm.` namespace.
 */
export const ATTR = {
  // go-microvm's keys
  IMAGE: 'microvm.image',
  NAME: 'microvm.name',
  /** On microvm.AdmissionWait: how many VMs may boot at once, and how long this start waited. */
  ADMISSION_LIMIT: 'microvm.admission.limit',
  ADMISSION_WAITED_MS: 'microvm.admission.waited_ms',
  CPUS: 'microvm.cpus',
  MEMORY: 'microvm.memory_mib',
  IMAGE_REF: 'microvm.image_ref',
  IMAGE_PREBUILT: 'microvm.image.prebuilt',
  IMAGE_FROM_CACHE: 'microvm.image.from_cache',
  IMAGE_CACHE_HIT: 'microvm.image.cache_hit',
  IMAGE_LAYERED: 'microvm.image.layered',
  HOOK_COUNT: 'microvm.hook_count',
  PREFLIGHT_CHECK_COUNT: 'preflight.check_count',
  PREFLIGHT_CHECK_NAME: 'preflight.check.name',
  PREFLIGHT_CHECK_REQUIRED: 'preflight.check.required',
  SSH_HOST: 'ssh.host',
  SSH_PORT: 'ssh.port',
  SSH_USER: 'ssh.user',
  SSH_PROBES_TOTAL: 'ssh.probes_total',
  SSH_PROBE_COUNT: 'ssh.probe_count',
  /** On each `ssh.probe_failed` event: why the probe failed. */
  SSH_PROBE_ERROR: 'error',
  // ours
  VM_ID: 'microvm.vm.id',
  BACKEND: 'microvm.backend',
  PREFLIGHT_CHECK_PASSED: 'preflight.check.passed',
  IMAGE_SOURCE: 'microvm.image.source',
  IMAGE_DIGEST: 'microvm.image.digest',
  ROOTFS_CLONE_STRATEGY: 'microvm.rootfs.clone_strategy',
  /** On microvm.VirtioFSOverrideStat: how many entries got "0:0:<mode>". */
  OVERRIDE_STAT_ENTRIES: 'microvm.virtiofs.override_stat.entries',
  NETWORK_PROVIDER: 'microvm.network.provider',
  NETWORK_PORTS: 'microvm.network.ports',
  /** On microvm.NetworkStart: the egress policy ('allow' | 'deny'). */
  NETWORK_EGRESS: 'microvm.network.egress',
  /** On microvm.network.Egress: connections the relays made / that failed; events left out beyond the cap. */
  NETWORK_CONNECTIONS: 'microvm.network.connections',
  NETWORK_CONNECTION_FAILURES: 'microvm.network.connection_failures',
  NETWORK_EVENTS_DROPPED: 'microvm.network.events_dropped',
  /** On each microvm.network.connection event: connected | failed | refused | resolved. */
  NETWORK_OUTCOME: 'microvm.network.outcome',
  /** On filter decisions (native/preload/net_guard.cc): connect | datagram | dns, and the rule that decided. */
  NETWORK_KIND: 'microvm.network.kind',
  NETWORK_RULE: 'microvm.network.rule',
  NETWORK_BYTES_IN: 'microvm.network.bytes_in',
  NETWORK_BYTES_OUT: 'microvm.network.bytes_out',
  RUNTIME_LIBKRUN_PATH: 'microvm.runtime.libkrun_path',
  RUNTIME_RUNNER_PATH: 'microvm.runtime.runner_path',
  FIRMWARE_PATH: 'microvm.firmware.path',
  FIRMWARE_ABI: 'microvm.firmware.abi_version',
  VM_PID: 'microvm.vm.pid',
  /** On microvm.AgentWaitReady: the channel's socket, whether the agent answered (false: the VM ended first), and the guest's uptime at its hello. */
  AGENT_SOCKET: 'microvm.agent.socket',
  AGENT_READY: 'microvm.agent.ready',
  AGENT_UPTIME_MS: 'microvm.agent.uptime_ms',
  /** On microvm.Exec (semantic conventions): the command's file name (never its arguments) and exit code. */
  PROCESS_EXECUTABLE_NAME: 'process.executable.name',
  PROCESS_EXIT_CODE: 'process.exit.code',
  /** QEMU backend: the accelerator used ('kvm' | 'tcg') and why it was chosen. */
  QEMU_ACCEL: 'microvm.qemu.accel',
  QEMU_ACCEL_REASON: 'microvm.qemu.accel_reason',
  /** How the VM ended (see VmExit): 'exited' | 'stopped' | 'failed'. */
  VM_EXIT_REASON: 'microvm.vm.exit_reason',
  POST_BOOT_HOOK_COUNT: 'microvm.post_boot.hook_count',
  ERROR_TYPE: 'error.type',
  /** run({ waitFor }): what a WaitFor* span waits for, and how many probes it took. */
  WAIT_PATTERN: 'microvm.wait.pattern',
  WAIT_STREAM: 'microvm.wait.stream',
  WAIT_GUEST_PORT: 'microvm.wait.guest_port',
  WAIT_ATTEMPTS: 'microvm.wait.attempts',
  /** microvm.guest.Boot: the guest's uptime at its last milestone, the clock mapping's error bound, the milestones seen. */
  GUEST_UPTIME_MS: 'microvm.guest.uptime_ms',
  GUEST_CLOCK_ERROR_MS: 'microvm.guest.clock_error_ms',
  GUEST_MILESTONES: 'microvm.guest.milestones',
  // OpenTelemetry semantic conventions
  SERVER_ADDRESS: 'server.address',
  SERVER_PORT: 'server.port',
  URL_PATH: 'url.path',
  HTTP_STATUS: 'http.response.status_code',
  /** Registry requests: CLIENT spans named by the method (`GET`), with the method and the redacted URL. */
  HTTP_REQUEST_METHOD: 'http.request.method',
  URL_FULL: 'url.full',
} as const;

/** Span event names. */
export const EVENT = {
  SSH_PROBE_FAILED: 'ssh.probe_failed',
  ACCEL_FALLBACK: 'microvm.accel_fallback',
  BOOT_RETRY: 'microvm.boot_retry',
  /** One connection of an egress allow-list (server.address, server.port, outcome, error.type, bytes). */
  NETWORK_CONNECTION: 'microvm.network.connection',
} as const;
