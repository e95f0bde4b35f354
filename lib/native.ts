/**
 * The one file that loads the native addon (through node-gyp-build: a matching prebuild under
 * `prebuilds/` first, then the local `build/Release`). Everything else imports the typed
 * {@link NativeAddon} from here: no `any` crosses the boundary.
 *
 * The addon never links libkrun: it dlopen()s the library path it is given. Loading this module
 * therefore works on machines without libkrun or KVM.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { MicrovmErrorCode } from './errors/codes';
import { MicrovmError } from './errors';

/** What the addon reports about a libkrunfw library it opened. */
export interface NativeFirmwareProbe {
  /** The file the dynamic loader actually opened. */
  path: string;
  /** `krunfw_get_version()`. */
  abiVersion: number;
  /** Size in bytes of the raw kernel image `krunfw_get_kernel()` returns. */
  kernelSize: number;
  /** Guest-physical load address of the kernel. */
  loadAddress: number;
  /** Guest-physical entry point. */
  entryAddress: number;
}

/** A libkrun library the addon loaded. */
export interface NativeLibkrunProbe {
  path: string;
  /** Whether the library exports `krun_has_feature`. */
  hasFeatureCall: boolean;
  /** KRUN_FEATURE_* numbers the library reports as built in. */
  features: number[];
}

/** One libkrun configuration context, as the addon exposes it. Arguments arrive validated. */
export interface NativeKrunContext {
  readonly id: number;
  readonly freed: boolean;
  readonly libkrunPath: string;
  setLogLevel(level: number): void;
  setVmConfig(cpus: number, memoryMiB: number): void;
  setRoot(path: string): void;
  addVirtiofs(tag: string, path: string, readOnly: boolean): void;
  setPortMap(map: 'all' | 'none' | string[]): void;
  setExec(path: string, args: string[], env: string[] | null): void;
  setEnv(env: string[]): void;
  setWorkdir(path: string): void;
  setRlimits(rlimits: string[]): void;
  setConsoleOutput(path: string): void;
  addNet(
    kind: 'unixstream' | 'unixgram',
    path: string | null,
    fd: number,
    mac: number[],
    features: number,
    flags: number,
  ): void;
  addVsockPort(port: number, path: string, listen: boolean | undefined): void;
  hasFeature(feature: number): boolean;
  free(): void;
}

/** The addon's exports. */
export interface NativeAddon {
  /** Version of this interface; bumped when the native surface changes. */
  readonly abiVersion: number;
  errnoName(errno: number): string;
  probeFirmware(candidate: string): Promise<NativeFirmwareProbe>;
  readFirmwareKernel(path: string): Promise<NativeFirmwareProbe & { kernel: Buffer }>;
  probeLibkrun(path: string): Promise<NativeLibkrunProbe>;
  createContext(libkrunPath: string, firmwarePath: string): Promise<NativeKrunContext>;
  checkPlan(planJson: string): void;
  validatePlan(planJson: string): Promise<void>;
  /**
   * Writes `data` to root/components... without following any symlink (each component is opened
   * with O_NOFOLLOW relative to its parent). Missing directories get dirAttrs[i] = [mode, uid, gid]
   * (uid/gid -1: leave). Replaces the file atomically (rename). Throws with `code` (errno name).
   */
  writeFileBeneath(
    root: string,
    components: string[],
    data: Buffer,
    mode: number,
    uid: number,
    gid: number,
    dirAttrs: [number, number, number][],
  ): void;
  /**
   * The entries under `root` and the bytes of its regular files, never following a symlink.
   * Throws an Error with `code` (an errno name) and `path` (relative to root).
   */
  summarizeTree(root: string): { entries: number; bytes: number };
  /**
   * Sets FS_TOPDIR_FL (`chattr +T`) on `dir`, so that ext4 gives each new subdirectory a block
   * group of its own. Returns null, or the errno name when the filesystem has no such attribute.
   */
  markTopDirectory(dir: string): string | null;
  /** Whether libzstd.so.1 can be loaded (then LayerExtractor decompresses zstd itself). */
  zstdAvailable(): boolean;
  /**
   * Sets `user.containers.override_stat` (libkrun's virtio-fs: the owner and mode the guest sees,
   * "uid:gid:0mode") on `path` itself, never through a symlink. Returns null, or the errno name.
   */
  setOverrideStat(path: string, value: string): string | null;
  /** The entry's `user.containers.override_stat`, or null when it has none. */
  getOverrideStat(path: string): string | null;
  /**
   * Copies the tree at `src` to `dst` (which must not exist) off the JS thread, like `cp -a`
   * (modes, owners where permitted, times, xattrs, symlinks as links, hard links kept), `threads`
   * files at a time; FICLONE first (`reflink: 'always'`: nothing else). `cancel()` stops it between
   * files (the promise rejects with code ECANCELED). What was made under `dst` stays on failure.
   */
  copyTree(
    src: string,
    dst: string,
    options: { reflink: 'auto' | 'always'; threads: number },
  ): { promise: Promise<TreeCopyResult>; cancel(): void };
  /** Applies one image layer under `root`, never leaving it (see NativeLayerExtractor). */
  LayerExtractor: new (root: string, options: NativeExtractOptions) => NativeLayerExtractor;
}

/** What {@link NativeAddon.copyTree} copied. */
export interface TreeCopyResult {
  dirs: number;
  files: number;
  /** Hard links made to a file copied once. */
  links: number;
  symlinks: number;
  bytes: number;
  /** Files cloned with FICLONE (no data copied). */
  reflinked: number;
}

/** What a layer extractor was told (native/addon/layer_extract.h). */
export interface NativeExtractOptions {
  /** The input is gzip (else the tar itself, or zstd). */
  gzip: boolean;
  /** The input is zstd frames, decompressed with libzstd (only when zstdAvailable()). */
  zstd: boolean;
  /** Set owners (privileged). */
  chown: boolean;
  /** Record uid:gid:mode in user.containers.override_stat instead. */
  overrideXattr: boolean;
  maxBytes: number;
  maxEntries: number;
  /** Uncompressed / compressed cap (gzip and zstd; 0: none). */
  maxRatio: number;
  /** Totals of the image's earlier layers (the caps are per image). */
  bytesBefore: number;
  entriesBefore: number;
  /** Also write the input bytes to this descriptor (-1: no); it stays open (the caller's). */
  teeFd: number;
  /** Check each gzip member's trailer, CRC-32 and length (false only when the caller verifies the input's digest). */
  checkTrailer: boolean;
}

/** A layer applied: image totals including it, its own byte counts, and what was skipped. */
export interface NativeExtractResult {
  bytes: number;
  entries: number;
  compressed: number;
  uncompressed: number;
  /** Every input byte reached teeFd. */
  teeOk: boolean;
  warnings: string[];
}

/**
 * One layer, from its bytes to files under a root, on the addon's threads (gunzip + tar parsing
 * + the layer rules on one, filesystem calls on another; native/addon/layer_extract.h). Failures carry
 * `code`: an ERR_MICROVM_IMAGE_* code for a refused layer, or an errno name with `path` (the entry)
 * when a filesystem call failed.
 */
export interface NativeLayerExtractor {
  /** Queues input (copied); returns the input bytes queued. Throws the first failure. */
  write(chunk: Buffer): number;
  /** No more input. */
  end(): void;
  /** Resolves once at most `lowBytes` of input are queued; rejects with the first failure. */
  wait(lowBytes: number): Promise<void>;
  /** Resolves once the layer is completely applied (after end()). */
  done(): Promise<NativeExtractResult>;
  /** Stops its threads and drops what is queued: nothing is written after it returns. */
  close(): void;
}

/** The package root (holds package.json, build/ and prebuilds/). */
export const packageRoot: string = findPackageRoot(__dirname);

function findPackageRoot(start: string): string {
  let dir = start;
  for (;;) {
    if (fs.existsSync(path.join(dir, 'binding.gyp'))) return dir;
    const parent = path.dirname(dir);
    if (parent === dir) return path.resolve(start, '..');
    dir = parent;
  }
}

const EXPECTED_ABI = 5;
let cached: NativeAddon | undefined;
let loadedFrom: string | undefined;

/**
 * Loads (once) and returns the addon. Throws `ERR_MICROVM_ADDON_LOAD` with the loader's reason
 * and the fix when no usable binary exists.
 */
export function addon(): NativeAddon {
  if (cached) return cached;
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const load = require('node-gyp-build') as ((dir: string) => unknown) & { resolve?: (dir: string) => string };
  let mod: unknown;
  try {
    loadedFrom = load.resolve ? load.resolve(packageRoot) : undefined;
    mod = load(packageRoot);
  } catch (err) {
    throw new MicrovmError(
      'ERR_MICROVM_ADDON_LOAD',
      `Cannot load the node-microvm native addon from ${packageRoot}: ${(err as Error).message}. ` +
        `No prebuild here fits ${process.platform}-${process.arch} (the package ships linux-x64); build it with ` +
        '`npm rebuild node-microvm` (in a checkout: `npm run build:native`), which needs python3, make and a C++ compiler.',
      { cause: err },
    );
  }
  const a = mod as NativeAddon;
  if (a.abiVersion !== EXPECTED_ABI) {
    throw new MicrovmError(
      'ERR_MICROVM_ADDON_LOAD',
      `The native addon at ${loadedFrom ?? packageRoot} has interface version ${String(a.abiVersion)}, expected ${EXPECTED_ABI}; rebuild it with \`npm rebuild node-microvm\` (in a checkout: \`npm run build:native\`).`,
    );
  }
  cached = a;
  return a;
}

/** Path of the addon binary that was loaded (prebuild or local build), for diagnostics. */
export function addonPath(): string | undefined {
  addon();
  return loadedFrom;
}

/** A file the package ships beside the addon (else in this package's build); `code` when missing. */
export function shippedFile(name: string, code: MicrovmErrorCode): string {
  const candidates = [
    path.join(path.dirname(addonPath() ?? ''), name),
    path.join(packageRoot, 'build', 'Release', name),
  ];
  const found = candidates.find((c) => fs.existsSync(c));
  if (!found)
    throw new MicrovmError(
      code,
      `${name} was not found (looked in ${candidates.join(', ')}); build it with \`npm rebuild node-microvm\` (in a checkout: \`npm run build:native\`)`,
    );
  return found;
}
