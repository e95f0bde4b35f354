/**
 * libkrunfw resolution. libkrun itself dlopen()s `libkrunfw.so.5` by soname when a context is
 * created; we resolve it ourselves first so that the choice is explicit, reported, and handed to the
 * runner (which preloads it by path so libkrun's soname lookup finds exactly this copy).
 *
 * Search order: `dir`, then `dirs`, then `$MICROVM_LIBKRUNFW_DIR` (colon-separated), then the
 * runtime's lib dir (libkrunfw is normally installed next to libkrun), then the system library
 * directories, then the copy `scripts/fetch-libkrunfw.sh` put in this package's `vendor/`, then the
 * dynamic loader's own search (LD_LIBRARY_PATH, ld.so.cache).
 */
import { defaultDataRoot } from '../paths';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { awaitNative, MicrovmError } from '../errors';
import { addon, packageRoot } from '../native';
import * as v from '../validate';
import { formatAttempts, multiarchTriplet, type SearchAttempt, splitDirs, systemLibraryDirs } from './search';

/** The soname libkrun 1.x loads. */
export const LIBKRUNFW_SONAME = 'libkrunfw.so.5';
/** The `krunfw_get_version()` value that goes with {@link LIBKRUNFW_SONAME}. */
export const LIBKRUNFW_ABI_VERSION = 5;

/** Options of {@link resolveFirmware}. */
export interface ResolveFirmwareOptions {
  /** A directory to look in first. */
  dir?: string;
  /** More directories to look in, in order, after `dir`. */
  dirs?: readonly string[];
  /** The lib directory of the resolved libkrun (searched after the environment variable). */
  runtimeLibDir?: string;
  /** Environment to read `MICROVM_LIBKRUNFW_DIR` from. Default: `process.env`. */
  env?: NodeJS.ProcessEnv;
  /** Replace the system library directories and this package's fetched copy (mainly for tests). */
  systemDirs?: readonly string[];
  /** Also try the dynamic loader's own search by soname. Default: true. */
  loaderSearch?: boolean;
  /** ABI version to require. Default: {@link LIBKRUNFW_ABI_VERSION}. */
  abiVersion?: number;
}

/** A usable libkrunfw. */
export interface FirmwareInfo {
  /** The library file that was opened. */
  path: string;
  /** `krunfw_get_version()`. */
  abiVersion: number;
  /** Size in bytes of the raw kernel image. */
  kernelSize: number;
  /** Guest-physical load address of the kernel. */
  loadAddress: number;
  /** Guest-physical entry address. */
  entryAddress: number;
}

export const FIRMWARE_INSTALL_HINT =
  'Install libkrunfw 5 (Debian trixie/sid: `apt-get install libkrunfw5`; Fedora: `dnf install libkrunfw`), ' +
  "or let `microvm setup` fetch Debian's package into the data dir (Debian/Ubuntu hosts; `npx microvm setup` from a project).";

function candidates(opts: ResolveFirmwareOptions): { source: string; candidate: string }[] {
  const env = opts.env ?? process.env;
  const out: { source: string; candidate: string }[] = [];
  const add = (source: string, dir: string): void => {
    out.push({ source, candidate: path.join(dir, LIBKRUNFW_SONAME) });
  };
  if (opts.dir !== undefined) add('dir option', v.absolutePath('dir', opts.dir));
  (opts.dirs ?? []).forEach((d, i) => add('dirs option', v.absolutePath(`dirs[${i}]`, d)));
  for (const d of splitDirs(env.MICROVM_LIBKRUNFW_DIR)) add('MICROVM_LIBKRUNFW_DIR', d);
  if (opts.runtimeLibDir !== undefined) add('libkrun lib dir', v.absolutePath('runtimeLibDir', opts.runtimeLibDir));
  for (const d of opts.systemDirs ?? systemLibraryDirs()) add('system', d);
  if (opts.systemDirs === undefined) {
    const triplet = multiarchTriplet();
    if (triplet) {
      add('fetched by `microvm setup`', path.join(defaultDataRoot(env), 'libkrunfw', 'usr', 'lib', triplet));
      add('fetched into this package', path.join(packageRoot, 'vendor', 'libkrunfw', 'usr', 'lib', triplet));
    }
  }
  if (opts.loaderSearch !== false) out.push({ source: 'dynamic loader search', candidate: LIBKRUNFW_SONAME });
  // The same file can come up twice (e.g. env and system): try it once.
  const seen = new Set<string>();
  return out.filter((c) => (seen.has(c.candidate) ? false : (seen.add(c.candidate), true)));
}

/**
 * Finds and opens libkrunfw, checks its ABI version and returns where it is and what kernel it
 * carries. Throws `ERR_MICROVM_LIBKRUNFW_NOT_FOUND` listing every place searched, or
 * `ERR_MICROVM_LIBKRUNFW_ABI` when only libraries of another ABI version were found.
 */
export async function resolveFirmware(options: ResolveFirmwareOptions = {}): Promise<FirmwareInfo> {
  v.object('options', options);
  v.knownKeys('options', options as Record<string, unknown>, [
    'dir',
    'dirs',
    'runtimeLibDir',
    'env',
    'systemDirs',
    'loaderSearch',
    'abiVersion',
  ]);
  const wanted =
    options.abiVersion === undefined ? LIBKRUNFW_ABI_VERSION : v.integer('abiVersion', options.abiVersion, 1, 1000);
  const native = addon();
  const attempts: SearchAttempt[] = [];
  let mismatch: FirmwareInfo | undefined;
  for (const { source, candidate } of candidates(options)) {
    if (path.isAbsolute(candidate) && !fs.existsSync(candidate)) {
      attempts.push({ source, candidate, reason: 'not present' });
      continue;
    }
    try {
      const fw = await awaitNative(native.probeFirmware(candidate));
      if (fw.abiVersion !== wanted) {
        attempts.push({ source, candidate, reason: `ABI version ${fw.abiVersion}, expected ${wanted}` });
        mismatch ??= fw;
        continue;
      }
      return { ...fw };
    } catch (err) {
      attempts.push({ source, candidate, reason: (err as Error).message });
    }
  }
  if (mismatch) {
    throw new MicrovmError(
      'ERR_MICROVM_LIBKRUNFW_ABI',
      `libkrunfw at ${mismatch.path} has ABI version ${mismatch.abiVersion}, but version ${wanted} is required.\n` +
        `Searched:\n${formatAttempts(attempts)}\n${FIRMWARE_INSTALL_HINT}`,
    );
  }
  throw new MicrovmError(
    'ERR_MICROVM_LIBKRUNFW_NOT_FOUND',
    `libkrunfw (${LIBKRUNFW_SONAME}) was not found.\nSearched:\n${formatAttempts(attempts)}\n${FIRMWARE_INSTALL_HINT}`,
  );
}

/** The raw kernel image carried by the libkrunfw at `firmwarePath` (a copy), with its geometry. */
export async function readFirmwareKernel(firmwarePath: string): Promise<FirmwareInfo & { kernel: Buffer }> {
  v.absolutePath('firmwarePath', firmwarePath);
  const r = await awaitNative(addon().readFirmwareKernel(firmwarePath));
  return { ...r };
}
