/**
 * node-microvm: turn an OCI image into a lightweight VM. This entry point exports {@link run} and
 * the {@link MicroVM} it returns, the image cache ({@link image}, {@link pull}), the two backends,
 * the pipeline's pieces (rootfs clone and hooks, preflight, SSH, telemetry names), the native core
 * (libkrun binding, firmware and runtime resolution, launch plans, the runner: grouped under
 * {@link native} and also as named exports) and the error types with their codes.
 */
import { errnoName } from './errors/errno';
import { KrunContext, KrunFeature } from './backends/libkrun/context';
import { addonPath } from './native';
import { buildLaunchPlan, serializeLaunchPlan, validateLaunchPlan } from './backends/libkrun/plan';
import { readFirmwareKernel, resolveFirmware } from './resolve/firmware';
import { resolveRunner, resolveRuntime } from './resolve/runtime';
import { startRunner } from './backends/libkrun/runner';

export { KrunError, MicrovmError, type ArgumentErrorCode, type ErrnoCode, type MicrovmErrorCode } from './errors';
export { ERROR_CODES } from './errors/codes';
export { errnoName } from './errors/errno';
export { KrunContext, KrunFeature, type CreateContextOptions } from './backends/libkrun/context';
export {
  buildLaunchPlan,
  LOG_LEVELS,
  serializeLaunchPlan,
  validateLaunchPlan,
  type ExecInput,
  type KrunLogLevel,
  type LaunchPlan,
  type LaunchPlanInput,
  type NetDeviceInput,
  type PortMapInput,
  type PortMapping,
  type RlimitInput,
  type VirtiofsMount,
  type VsockPortInput,
} from './backends/libkrun/plan';
export {
  FIRMWARE_INSTALL_HINT,
  LIBKRUNFW_ABI_VERSION,
  LIBKRUNFW_SONAME,
  readFirmwareKernel,
  resolveFirmware,
  type FirmwareInfo,
  type ResolveFirmwareOptions,
} from './resolve/firmware';
export {
  LIBKRUN_SONAME,
  resolveRunner,
  resolveRuntime,
  type ResolveRuntimeOptions,
  type RuntimeInfo,
} from './resolve/runtime';
export {
  RunnerExit,
  startRunner,
  type RunnerExitStatus,
  type RunnerHandle,
  type StartRunnerOptions,
} from './backends/libkrun/runner';

/** The native core in one namespace: `require('node-microvm').native.resolveFirmware({ dir })`. */
export const native = {
  resolveFirmware,
  resolveRuntime,
  resolveRunner,
  readFirmwareKernel,
  KrunContext,
  KrunFeature,
  buildLaunchPlan,
  serializeLaunchPlan,
  validateLaunchPlan,
  startRunner,
  errnoName,
  /** Path of the addon binary in use (prebuild or local build). */
  addonPath,
} as const;

export { run, chooseBackend, type RunOptions, type PostBootHook } from './run';
export type { EgressMode, EgressPolicy, EgressRule } from './backends/types';
export {
  AgentClient,
  AgentProcess,
  GuestError,
  type AgentConnectOptions,
  type AgentExit,
  type AgentHello,
  type AgentSpawnOptions,
} from './agent/client';
export type { AgentExecOptions, AgentExecResult } from './agent/exec';
export type { CopyOutLimits } from './agent/files';
export type { WaitStrategy } from './wait-for';
export { defaultCacheDir, defaultDataRoot } from './paths';
export { MicroVM, describeExit, type MicroVMEvents, type VmStatus } from './vm';
export type { GuestStats, HostStats, VmStats } from './stats';
export {
  probeKvm,
  decideAccel,
  readKvmVerdict,
  type AccelChoice,
  type AccelDecision,
  type HostProbePaths,
  type KvmKind,
  type KvmProbe,
  type KvmVerdict,
} from './host/kvm';
export { hooks, type RootfsContext, type RootfsHook, type WriteOptions } from './rootfs/hooks';
export { cloneRootfs, type CloneStrategy, type ClonedRootfs } from './rootfs/clone';
export { libkrunBackend, type LibkrunBackendOptions } from './backends/libkrun';
export { qemuBackend, resolveQemuRuntime, type QemuBackendOptions, type QemuRuntime } from './backends/qemu';
export { buildPvhElf, findPvhEntry } from './backends/qemu/kernel';
export type {
  Backend,
  BackendHandle,
  BackendPrepareInput,
  BackendStartInput,
  ImageRuntimeConfig,
  VmExit,
} from './backends/types';
export type { NetworkHandle, NetworkProvider } from './network/start';
export {
  diskSpaceCheck,
  kvmCheck,
  memoryCheck,
  portsCheck,
  resourcesCheck,
  userNamespacesCheck,
  type CheckResult,
  type PreflightCheck,
} from './preflight/checks';
export { PreflightError, type PreflightFailure } from './preflight/run-all';
export { SPAN, ATTR, EVENT } from './telemetry/attributes';
export type { SpanScope } from './telemetry/tracer';
export { formatSpanTree, type SpanLike } from './telemetry/tree';
export { generateKeyPair, loadKeyPair, writeKeyPair, type SshKeyPair } from './ssh/keys';
export {
  SshClient,
  type ExecChannel,
  type ExecOptions,
  type ExecResult,
  type HostKeyPolicy,
  type SshConnectOptions,
} from './ssh/client';
export { waitForReady, systemClock, type Clock, type WaitForReadyOptions } from './ssh/wait-ready';
export { pull, type PullOptions, type PullPolicy, type PullProgress, type PullResult } from './image/pull';
export { parseReference, type ImageReference } from './image/reference';
export {
  list as listImages,
  evict as evictImages,
  gc as gcImages,
  purge as purgeImages,
  type CachedImage,
} from './image/cache';
export { sweepVms as pruneVms } from './state';
export { hostPlatform, type Platform } from './image/oci';

import { pull as pullImage } from './image/pull';
import { evict, gc, list, purge } from './image/cache';
/**
 * Image functions in one namespace: `image.pull(ref, { cacheDir })`, `image.list(cacheDir)`, ...
 * (`cacheDir` defaults to `<dataRoot>/cache`, see {@link defaultCacheDir}).
 */
export const image = { pull: pullImage, list, evict, gc, purge } as const;
