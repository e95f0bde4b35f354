/**
 * Every `ERR_MICROVM_*` code this package (TypeScript and native code) throws, with what it means.
 * docs/api.md lists the same codes; test/error-codes.test.ts compares the source, this table and
 * the docs, so a new code cannot be thrown without being named here and documented there.
 */
export const ERROR_CODES = {
  ERR_MICROVM_PREFLIGHT: 'a required preflight check failed (`failures` lists each, with its fix)',
  ERR_MICROVM_PREFLIGHT_CHECK:
    'a required check failed: the status of its `microvm.preflight.Check` span (callers get ERR_MICROVM_PREFLIGHT)',
  ERR_MICROVM_ADDON_LOAD: 'the native addon could not be loaded (no prebuild for this platform and no build)',
  ERR_MICROVM_LIBKRUN_NOT_FOUND: 'libkrun was not found (every place searched is listed)',
  ERR_MICROVM_LIBKRUNFW_NOT_FOUND: 'libkrunfw was not found (every place searched is listed)',
  ERR_MICROVM_LIBKRUNFW_ABI: 'a libkrunfw was found but has the wrong ABI version',
  ERR_MICROVM_RUNNER_NOT_FOUND: 'the microvm-runner executable is missing from the package',
  ERR_MICROVM_GUEST_INIT_NOT_FOUND: 'the guest init (microvm-guest-init) is missing from the package',
  ERR_MICROVM_FSGUARD_NOT_FOUND: 'the virtio-fs guard library (microvm-fsguard.so) is missing from the package',
  ERR_MICROVM_QEMU_NOT_FOUND: 'qemu-system-x86_64 was not found',
  ERR_MICROVM_VIRTIOFSD_NOT_FOUND: 'virtiofsd was not found',
  ERR_MICROVM_KERNEL_PVH: 'the libkrunfw kernel has no PVH entry point QEMU can boot',
  ERR_MICROVM_QMP: "QEMU's control socket (QMP) failed or answered with an error",
  ERR_MICROVM_QEMU_NETWORK: 'a network provider was given to the QEMU backend (it uses QEMU user networking)',
  ERR_MICROVM_QEMU_VIRTIOFS: "the data dir's path has white space, which virtiofsd's socket path cannot carry",
  ERR_MICROVM_BOOT_FAILED:
    "the hypervisor failed before the guest booted (QEMU died, paused the guest, the kernel panicked); the message has QEMU's and the console's last lines",
  ERR_MICROVM_BOOT_TIMEOUT: 'no sign of life from the guest within `timeouts.boot`',
  ERR_MICROVM_HYPERVISOR_FAILED: "the hypervisor failed after the start (`vm.wait()` → `{ reason: 'failed', error }`)",
  ERR_MICROVM_WAIT_TIMEOUT:
    'a `waitFor` condition (log line, TCP port, HTTP status) did not hold within its `timeoutMs`',
  ERR_MICROVM_VM_PAUSED:
    'the VM is paused (`vm.pause()`, `microvm pause`): resume it before exec, copies or file requests',
  ERR_MICROVM_VM_NOT_RUNNING: 'the VM is not running (it ended), so it cannot be paused, resumed or snapshotted',
  ERR_MICROVM_SNAPSHOT_UNSUPPORTED:
    "the VM's backend cannot pause, resume or snapshot it (libkrun 1.19 has no API for it; the QEMU backend can)",
  ERR_MICROVM_VM_EXITED: 'the VM ended while `run()` still waited for it (readiness, post-boot hooks)',
  ERR_MICROVM_UNSAFE_PATH:
    "a path that goes into another program's option string (`dataDir`, `rootfsPath`, a share's `hostPath`) contains `,` (or `:`/white space where those separate too), or a share's `guestPath` has `.`, `..`, empty components or control characters",
  ERR_MICROVM_SHARE_SOURCE:
    "a share's `hostPath` does not exist or is not a directory (checked before anything starts)",
  ERR_MICROVM_KVM_UNAVAILABLE: "`accel: 'kvm'` on a host without a usable hardware `/dev/kvm`",
  ERR_MICROVM_INVALID_ACCEL: 'a bad `accel` option or `MICROVM_ACCEL` value',
  ERR_MICROVM_IMAGE_NOT_FOUND: 'the image, tag or layout does not exist',
  ERR_MICROVM_IMAGE_INPUT:
    'an image input (an archive, a layout file) is not a regular file (a FIFO, a device, a directory) or cannot be read',
  ERR_MICROVM_IMAGE_NOT_CACHED: "`pull: 'never'` and the image is not in the cache",
  ERR_MICROVM_IMAGE_DIGEST: 'downloaded or stored content does not match its digest',
  ERR_MICROVM_IMAGE_PLATFORM: 'the image has no manifest for this platform',
  ERR_MICROVM_IMAGE_LIMIT: 'the image exceeds a size or count limit (manifest size, layers, entries, bytes)',
  ERR_MICROVM_IMAGE_UNSAFE_ENTRY: 'a layer entry would escape the root or is otherwise unsafe',
  ERR_MICROVM_IMAGE_LAYER: 'a layer is not a readable (gzip/zstd) tar stream',
  ERR_MICROVM_IMAGE_MANIFEST: 'a manifest, index or config is malformed',
  ERR_MICROVM_IMAGE_ZSTD: 'a zstd-compressed layer could not be decompressed',
  ERR_MICROVM_IMAGE_WRITE: 'the image cache could not be written (read-only, I/O error, permission)',
  ERR_MICROVM_NO_SPACE: 'the disk (or quota) is full',
  ERR_MICROVM_REGISTRY: 'the registry answered with an error',
  ERR_MICROVM_REGISTRY_TIMEOUT: 'the registry did not answer, or sent too slowly, within the deadline',
  ERR_MICROVM_REGISTRY_AUTH: 'the registry refused the credentials (or none were found)',
  ERR_MICROVM_EXTRACTOR_BUSY: 'the native layer extractor already has a waiter (internal misuse)',
  ERR_MICROVM_EXTRACTOR_CLOSED: 'the native layer extractor was used after it ended',
  ERR_MICROVM_ROOTFS_NOT_FOUND: '`rootfsPath` does not exist or is not a directory',
  ERR_MICROVM_ROOTFS_SYMLINK: 'a rootfs hook path goes through a symlink out of the root',
  ERR_MICROVM_ROOTFS_WRITE: 'a rootfs hook could not write its file',
  ERR_MICROVM_ROOTFS_USER: 'a user named by a rootfs hook is not in the image',
  ERR_MICROVM_ROOTFS_OVERRIDE_STAT:
    'libkrun as a user other than root: the owner override (user.containers.override_stat) could not be set on the rootfs',
  ERR_MICROVM_CLONE_UNSUPPORTED: 'the asked-for clone strategy cannot work on this host',
  ERR_MICROVM_CLONE_COPY: 'copying the root (the copy strategy) failed',
  ERR_MICROVM_NO_COMMAND: 'the image has no Entrypoint or Cmd and no `initOverride` was given',
  ERR_MICROVM_NAME_IN_USE: 'a VM of that name is running in the data dir',
  ERR_MICROVM_LOCK_TIMEOUT: 'a state or cache lock was held by another process for too long',
  ERR_MICROVM_VM_NOT_FOUND: 'no VM of that name (CLI)',
  ERR_MICROVM_USAGE: 'a CLI command was used wrongly (exit status 2); the message says how to get its help',
  ERR_MICROVM_LOG_TIMES:
    '`microvm logs --since` on output that has no arrival times (the console, the libkrun backend, a VM started by an older version)',
  ERR_MICROVM_PORT_NOT_FORWARDED: 'the VM forwards no host port to that guest port (`vm.port()`, `microvm port`)',
  ERR_MICROVM_VM_RUNNING: 'the VM is running and the command needs it stopped (CLI `rm` without `-f`)',
  ERR_MICROVM_BENCH_RUN_FAILED: 'a boot measured by `microvm bench` did not exit 0',
  ERR_MICROVM_SSH_TIMEOUT: 'SSH did not become ready within `ssh.timeoutMs`',
  ERR_MICROVM_SSH_HOSTKEY: "the guest's SSH host key is not the expected one",
  ERR_MICROVM_SSH_AUTH: 'the guest refused the SSH key',
  ERR_MICROVM_SSH_CONNECT: 'the SSH connection failed',
  ERR_MICROVM_SSH_KEY: 'an SSH key could not be generated, read or parsed',
  ERR_MICROVM_SSH_UNAVAILABLE: 'the VM was started without SSH',
  ERR_MICROVM_EGRESS_RELAY:
    'an egress allow-list cannot hand connections to its relay: a path with spaces, commas, quotes or backslashes',
  ERR_MICROVM_EGRESS_GUARD:
    'the egress filter (microvm-netguard.so) is missing, or QEMU ran without it or without its policy: the VM is stopped rather than run open',
  ERR_MICROVM_EGRESS_UNSUPPORTED:
    'an `egress` policy the backend (or network provider) cannot enforce; the VM is not started rather than run open',
  ERR_MICROVM_AGENT_UNAVAILABLE: 'the VM has no guest agent (`agent: false`), its channel closed, or the VM ended',
  ERR_MICROVM_AGENT_TIMEOUT:
    'the guest agent did not answer in time (not running, or another host process holds its channel)',
  ERR_MICROVM_AGENT_PROTOCOL:
    'the guest sent a malformed, oversized or unexpected frame; the channel is closed (the VM stays controllable)',
  ERR_MICROVM_AGENT_REFUSED: 'the guest agent refused to start a process (`guestCode` holds its errno name)',
  ERR_MICROVM_GUEST_FILE: 'a file operation in the guest failed (`guestCode` holds its errno name, e.g. ENOENT)',
  ERR_MICROVM_EXEC_TIMEOUT: "`exec()`'s `timeoutMs` passed; the command's process group was killed",
  ERR_MICROVM_EXEC_MAX_BUFFER: "a command's output exceeded `exec()`'s `maxBuffer`; it was killed",
  ERR_MICROVM_COPY:
    'a copy between host and guest failed on the host side, or the guest sent a name or tree unsafe to write',
  ERR_MICROVM_SSH_EXEC: 'a command could not be started over SSH',
  ERR_MICROVM_SSH_COPY: 'a file copy over SSH failed',
  ERR_MICROVM_PLAN_INVALID: "the runner's launch plan is invalid (native check)",
  ERR_MICROVM_PLAN_UNREADABLE: 'the runner could not read its launch plan',
  ERR_MICROVM_LIBKRUN_LOAD: 'dlopen of libkrun failed',
  ERR_MICROVM_LIBKRUNFW_LOAD: 'dlopen of libkrunfw failed',
  ERR_MICROVM_CONTEXT_FREED: 'a libkrun context was used after it was freed or started',
  ERR_MICROVM_RUNNER_USAGE: 'microvm-runner was started with bad arguments',
  ERR_MICROVM_RUNNER_SPAWN: 'microvm-runner could not be started',
  ERR_MICROVM_RUNNER_FAILED: 'microvm-runner ended before the VM was configured',
} as const;

/** A code of a {@link MicrovmError} the package throws (libkrun failures use errno names instead). */
export type MicrovmErrorCode = keyof typeof ERROR_CODES;

/** The errno names a {@link KrunError} carries (`EINVAL`, `ENOENT`, …; `EUNKNOWN` when unnamed). */
export type ErrnoCode = `E${Uppercase<string>}`;

/**
 * Node's codes for invalid arguments, on every TypeError/RangeError thrown for a bad option:
 * `ERR_INVALID_ARG_TYPE` (TypeError: the wrong kind of value), `ERR_OUT_OF_RANGE` (RangeError: the
 * right kind, a value not allowed), `ERR_INVALID_ARG_VALUE` (an image reference that does not parse).
 */
export type ArgumentErrorCode = 'ERR_INVALID_ARG_TYPE' | 'ERR_OUT_OF_RANGE' | 'ERR_INVALID_ARG_VALUE';
