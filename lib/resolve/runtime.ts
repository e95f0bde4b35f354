/**
 * Runtime resolution: which libkrun to dlopen, and which runner executable to start.
 *
 * libkrun search order: `libDir`, then `$MICROVM_LIBKRUN_DIR` (colon-separated), then
 * `pkg-config --variable=libdir libkrun`, then the system library directories, then the dynamic
 * loader's own search. The runner: `runnerPath`, then `$MICROVM_RUNNER`, then the directory of
 * the addon that node-gyp-build loaded, then this package's local build
 * (`build/Release/microvm-runner`), then its prebuild (`prebuilds/<platform>-<arch>/`).
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { awaitNative, MicrovmError } from '../errors';
import { addon, addonPath, packageRoot } from '../native';
import * as v from '../validate';
import { formatAttempts, type SearchAttempt, splitDirs, systemLibraryDirs } from './search';

/** The soname of libkrun 1.x. */
export const LIBKRUN_SONAME = 'libkrun.so.1';

/** Options of {@link resolveRuntime}. */
export interface ResolveRuntimeOptions {
  /** Directory holding libkrun.so.1, searched first. */
  libDir?: string;
  /** Runner executable to use instead of this package's own. */
  runnerPath?: string;
  /** Environment for `MICROVM_LIBKRUN_DIR` / `MICROVM_RUNNER`. Default: `process.env`. */
  env?: NodeJS.ProcessEnv;
  /** Ask pkg-config for libkrun's libdir. Default: true. */
  pkgConfig?: boolean;
  /** Replace the system library directories (mainly for tests). */
  systemDirs?: readonly string[];
  /** Also try the dynamic loader's own search by soname. Default: true. */
  loaderSearch?: boolean;
}

/** What {@link resolveRuntime} found. */
export interface RuntimeInfo {
  /** The libkrun library file that was opened. */
  libkrunPath: string;
  /** Its directory (where libkrunfw is often installed too). */
  libDir: string;
  /** The runner executable. */
  runnerPath: string;
  /** KRUN_FEATURE_* numbers this libkrun reports as built in (empty without krun_has_feature). */
  features: number[];
}

export const LIBKRUN_INSTALL_HINT =
  'Install libkrun 1.x (Fedora: `dnf install libkrun`; Homebrew: `brew install slp/krun/libkrun`; ' +
  'or build it from source) and point MICROVM_LIBKRUN_DIR at the directory holding libkrun.so.1. ' +
  "Without libkrun, use the QEMU backend (`backend: 'qemu'`).";

function pkgConfigLibdir(): Promise<string | undefined> {
  return new Promise((resolve) => {
    execFile('pkg-config', ['--variable=libdir', 'libkrun'], { timeout: 5000 }, (err, stdout) => {
      const dir = String(stdout).trim();
      resolve(err || !dir || !path.isAbsolute(dir) ? undefined : dir);
    });
  });
}

function isExecutable(file: string): boolean {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}

/** Finds the runner executable, or throws `ERR_MICROVM_RUNNER_NOT_FOUND` listing the places tried. */
export function resolveRunner(options: { runnerPath?: string; env?: NodeJS.ProcessEnv } = {}): string {
  const env = options.env ?? process.env;
  const tried: SearchAttempt[] = [];
  const list: { source: string; candidate: string }[] = [];
  if (options.runnerPath !== undefined)
    list.push({ source: 'runnerPath option', candidate: v.absolutePath('runnerPath', options.runnerPath) });
  if (env.MICROVM_RUNNER) list.push({ source: 'MICROVM_RUNNER', candidate: env.MICROVM_RUNNER });
  // Next to the addon that was loaded, so both always come from the same build; then the usual places.
  const loaded = addonPath();
  if (loaded)
    list.push({ source: 'beside the loaded addon', candidate: path.join(path.dirname(loaded), 'microvm-runner') });
  list.push({ source: 'local build', candidate: path.join(packageRoot, 'build', 'Release', 'microvm-runner') });
  list.push({
    source: 'prebuild',
    candidate: path.join(packageRoot, 'prebuilds', `${process.platform}-${process.arch}`, 'microvm-runner'),
  });
  const seen = new Set<string>();
  for (const { source, candidate } of list) {
    if (seen.has(candidate)) continue;
    seen.add(candidate);
    if (isExecutable(candidate)) return candidate;
    tried.push({ source, candidate, reason: fs.existsSync(candidate) ? 'not an executable file' : 'not present' });
  }
  throw new MicrovmError(
    'ERR_MICROVM_RUNNER_NOT_FOUND',
    `The microvm-runner executable was not found.\nSearched:\n${formatAttempts(tried)}\nBuild it with \`npm rebuild node-microvm\` (in a checkout: \`npm run build:native\`).`,
  );
}

/**
 * Finds and opens libkrun and the runner. Throws `ERR_MICROVM_LIBKRUN_NOT_FOUND` listing every place
 * searched, or `ERR_MICROVM_RUNNER_NOT_FOUND`.
 */
export async function resolveRuntime(options: ResolveRuntimeOptions = {}): Promise<RuntimeInfo> {
  v.object('options', options);
  v.knownKeys('options', options as Record<string, unknown>, [
    'libDir',
    'runnerPath',
    'env',
    'pkgConfig',
    'systemDirs',
    'loaderSearch',
  ]);
  const env = options.env ?? process.env;
  const list: { source: string; candidate: string }[] = [];
  const add = (source: string, dir: string): void => {
    list.push({ source, candidate: path.join(dir, LIBKRUN_SONAME) });
  };
  if (options.libDir !== undefined) add('libDir option', v.absolutePath('libDir', options.libDir));
  for (const d of splitDirs(env.MICROVM_LIBKRUN_DIR)) add('MICROVM_LIBKRUN_DIR', d);
  if (options.pkgConfig !== false) {
    const dir = await pkgConfigLibdir();
    if (dir) add('pkg-config', dir);
  }
  for (const d of options.systemDirs ?? systemLibraryDirs()) add('system', d);
  if (options.loaderSearch !== false) list.push({ source: 'dynamic loader search', candidate: LIBKRUN_SONAME });

  const attempts: SearchAttempt[] = [];
  const seen = new Set<string>();
  const native = addon();
  for (const { source, candidate } of list) {
    if (seen.has(candidate)) continue;
    seen.add(candidate);
    if (path.isAbsolute(candidate) && !fs.existsSync(candidate)) {
      attempts.push({ source, candidate, reason: 'not present' });
      continue;
    }
    try {
      const probe = await awaitNative(native.probeLibkrun(candidate));
      const runnerPath = resolveRunner({ runnerPath: options.runnerPath, env });
      return { libkrunPath: probe.path, libDir: path.dirname(probe.path), runnerPath, features: probe.features };
    } catch (err) {
      if ((err as MicrovmError).code === 'ERR_MICROVM_RUNNER_NOT_FOUND') throw err;
      attempts.push({ source, candidate, reason: (err as Error).message });
    }
  }
  throw new MicrovmError(
    'ERR_MICROVM_LIBKRUN_NOT_FOUND',
    `libkrun (${LIBKRUN_SONAME}) was not found.\nSearched:\n${formatAttempts(attempts)}\n${LIBKRUN_INSTALL_HINT}`,
  );
}
