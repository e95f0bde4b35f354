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
  VM_SPAWN: 'microvm.VMSpawn',
  BACKEND_START: 'microvm.backend.Start',
  BACKEND_RESOLVE_RUNTIME: 'microvm.backend.ResolveRuntime',
  BACKEND_RESOLVE_FIRMWARE: 'microvm.backend.ResolveFirmware',
  POST_BOOT: 'microvm.PostBoot',
  SSH_WAIT_READY: 'microvm.SSHWaitReady',
} as const;

/** Attribute keys. */
export const ATTR = {
  // microvm.Run (seed names)
  IMAGE: 'image',
  NAME: 'name',
  CPUS: 'cpus',
  MEMORY: 'memory',
  // ours
  VM_ID: 'microvm.vm.id',
  BACKEND: 'microvm.backend',
  PREFLIGHT_CHECK_COUNT: 'check_count',
  PREFLIGHT_CHECK_NAME: 'check.name',
  PREFLIGHT_CHECK_REQUIRED: 'check.required',
  PREFLIGHT_CHECK_PASSED: 'check.passed',
  IMAGE_CACHE_HIT: 'cache_hit',
  IMAGE_LAYERED: 'layered',
  IMAGE_SOURCE: 'microvm.image.source',
  IMAGE_DIGEST: 'microvm.image.digest',
  ROOTFS_CLONE_STRATEGY: 'microvm.rootfs.clone_strategy',
  ROOTFS_HOOK_COUNT: 'microvm.rootfs.hook_count',
  NETWORK_PROVIDER: 'microvm.network.provider',
  NETWORK_PORTS: 'microvm.network.ports',
  RUNTIME_LIBKRUN_PATH: 'microvm.runtime.libkrun_path',
  RUNTIME_RUNNER_PATH: 'microvm.runtime.runner_path',
  FIRMWARE_PATH: 'microvm.firmware.path',
  FIRMWARE_ABI: 'microvm.firmware.abi_version',
  VM_PID: 'microvm.vm.pid',
  /** QEMU backend: the accelerator used ('kvm' | 'tcg') and why it was chosen. */
  QEMU_ACCEL: 'microvm.qemu.accel',
  QEMU_ACCEL_REASON: 'microvm.qemu.accel_reason',
  /** How the VM ended (see VmExit): 'exited' | 'stopped' | 'failed'. */
  VM_EXIT_REASON: 'microvm.vm.exit_reason',
  POST_BOOT_HOOK_COUNT: 'microvm.post_boot.hook_count',
  ERROR_TYPE: 'error.type',
} as const;
