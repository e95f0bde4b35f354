/**
 * Stage microvm.RootfsClone: give the VM its own view of the image's root filesystem without ever
 * modifying the shared (cached) tree. Strategies, tried in this order unless one is forced:
 *
 * - `overlay`: O(1). The runner mounts overlayfs in a private (user+)mount namespace with the
 *   shared tree as the read-only lower layer and this VM's `upper/` as the writable one, and serves
 *   the merged view. Needs a backend that supports it and (unprivileged) user namespaces.
 * - `reflink`: copy-on-write file clones (FICLONE), where the filesystem supports them.
 * - `copy`: a parallel copy; O(bytes).
 *
 * Hooks and the backend's config files write into {@link ClonedRootfs.writableDir}.
 */
import { execFile, execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import * as os from 'node:os';
import { MicrovmError } from '../errors';
import { addon } from '../native';
import * as v from '../validate';

export type CloneStrategy = 'overlay' | 'reflink' | 'copy';

/** The VM's root filesystem. */
export interface ClonedRootfs {
  strategy: CloneStrategy;
  /** The directory the VMM serves as `/` (for overlay: the mount point, live only in the runner). */
  rootPath: string;
  /** Where hooks write (overlay: the upper layer; otherwise the same as rootPath). */
  writableDir: string;
  /** The shared, read-only source tree. */
  sourceDir: string;
  /** Set for the overlay strategy. */
  overlay?: { lower: string; upper: string; work: string; merged: string };
}

/** Options of {@link cloneRootfs}. */
export interface CloneOptions {
  /** The shared tree to clone (never modified). */
  sourceDir: string;
  /** The VM's directory: the clone goes to `<vmDir>/rootfs*`. */
  vmDir: string;
  /** Strategies to try, in order. Default: overlay (when allowed), reflink, copy. */
  strategies?: readonly CloneStrategy[];
  /** Whether the backend can mount an overlay itself. */
  overlaySupported: boolean;
  /** Number of files copied at once by the copy strategy's Node engine. Default 16. */
  concurrency?: number;
  /**
   * How the copy strategy copies: `native`, the addon's parallel copy (native/addon/tree_copy.cc; faster
   * than `cp -a` on the trees we clone, `bench/pipeline.js` prints both), GNU `cp -a
   * --reflink=auto`, or the Node walk. Default: native, else cp when GNU cp is on PATH, else node.
   */
  copyEngine?: 'native' | 'cp' | 'node';
  /** Files the native engine copies at once. Default: twice the CPUs, 2 to 16. */
  copyThreads?: number;
  signal?: AbortSignal;
}

/** Whether this process may create a user namespace (needed for an unprivileged overlay). */
export function userNamespacesAvailable(): boolean {
  if (process.getuid?.() === 0) return true;
  try {
    const v = fs.readFileSync('/proc/sys/kernel/unprivileged_userns_clone', 'utf8').trim();
    if (v === '0') return false;
  } catch {
    /* the knob does not exist on mainline kernels: allowed */
  }
  try {
    return Number(fs.readFileSync('/proc/sys/user/max_user_namespaces', 'utf8').trim()) > 0;
  } catch {
    return true;
  }
}

const OVERLAY_UNSAFE = /[,:\\]/;

async function cloneOverlay(o: CloneOptions): Promise<ClonedRootfs> {
  if (OVERLAY_UNSAFE.test(o.sourceDir) || OVERLAY_UNSAFE.test(o.vmDir)) {
    throw new MicrovmError(
      'ERR_MICROVM_CLONE_UNSUPPORTED',
      "overlay: paths containing ',', ':' or '\\' cannot be overlay layers",
    );
  }
  const base = path.join(o.vmDir, 'rootfs');
  const dirs = {
    lower: o.sourceDir,
    upper: path.join(base, 'upper'),
    work: path.join(base, 'work'),
    merged: path.join(base, 'merged'),
  };
  await fsp.mkdir(dirs.upper, { recursive: true, mode: 0o755 });
  await fsp.mkdir(dirs.work, { recursive: true, mode: 0o700 });
  await fsp.mkdir(dirs.merged, { recursive: true, mode: 0o755 });
  // The merged root takes its mode from the upper layer's root directory.
  const st = await fsp.stat(o.sourceDir);
  await fsp.chmod(dirs.upper, st.mode & 0o7777);
  return { strategy: 'overlay', rootPath: dirs.merged, writableDir: dirs.upper, sourceDir: o.sourceDir, overlay: dirs };
}

/** Walks `src`, recreating directories and symlinks and copying files with `copyFile`. */
async function copyTree(
  src: string,
  dest: string,
  copyFlags: number,
  concurrency: number,
  signal?: AbortSignal,
): Promise<void> {
  const files: [string, string, fs.Stats][] = [];
  const dirs: [string, fs.Stats][] = [];
  const inodes = new Map<string, string>(); // dev:ino -> first copy, to keep hardlinks
  const links: [string, string][] = []; // made once the first copies exist
  const walk = async (s: string, d: string): Promise<void> => {
    signal?.throwIfAborted();
    const st = await fsp.lstat(s);
    if (st.isDirectory()) {
      await fsp.mkdir(d, { mode: 0o700 });
      dirs.push([d, st]);
      for (const name of await fsp.readdir(s)) await walk(path.join(s, name), path.join(d, name));
    } else if (st.isSymbolicLink()) {
      await fsp.symlink(await fsp.readlink(s), d);
      await fsp.lchown(d, st.uid, st.gid).catch(() => undefined);
    } else if (st.isFile()) {
      const key = `${st.dev}:${st.ino}`;
      const first = st.nlink > 1 ? inodes.get(key) : undefined;
      if (first) links.push([first, d]);
      else {
        if (st.nlink > 1) inodes.set(key, d);
        files.push([s, d, st]);
      }
    }
    // Sockets, FIFOs and device nodes are not part of an image rootfs we copy.
  };
  await walk(src, dest);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < files.length) {
      signal?.throwIfAborted();
      const [s, d, st] = files[next++];
      await fsp.copyFile(s, d, copyFlags);
      // chown before chmod: chown clears setuid/setgid bits.
      await fsp.chown(d, st.uid, st.gid).catch(() => undefined);
      await fsp.chmod(d, st.mode & 0o7777);
      await fsp.utimes(d, st.atime, st.mtime);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, concurrency) }, worker));
  for (const [first, d] of links) await fsp.link(first, d);
  // Directory modes and times last (children changed their mtimes; a 0555 dir would block writes).
  for (const [d, st] of dirs.reverse()) {
    await fsp.chown(d, st.uid, st.gid).catch(() => undefined);
    await fsp.chmod(d, st.mode & 0o7777);
    await fsp.utimes(d, st.atime, st.mtime);
  }
}

let gnuCp: boolean | undefined;
function haveGnuCp(): boolean {
  if (gnuCp === undefined) {
    try {
      gnuCp = execFileSync('cp', ['--version'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).includes(
        'GNU coreutils',
      );
    } catch {
      gnuCp = false;
    }
  }
  return gnuCp;
}

function cpTree(src: string, dest: string, reflink: 'always' | 'auto', signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(
      'cp',
      ['-a', `--reflink=${reflink}`, '--', src, dest],
      { signal, maxBuffer: 1 << 20 },
      (err, _out, stderr) => {
        if (err)
          reject(
            signal?.aborted
              ? signal.reason
              : new MicrovmError('ERR_MICROVM_CLONE_COPY', `cp -a failed: ${String(stderr).trim() || err.message}`, {
                  cause: err,
                }),
          );
        else resolve();
      },
    );
  });
}

function nativeCopyAvailable(): boolean {
  try {
    return typeof addon().copyTree === 'function';
  } catch {
    return false; // no usable addon: the other engines need none
  }
}

async function nativeCopy(src: string, dest: string, reflink: 'always' | 'auto', options: CloneOptions): Promise<void> {
  const signal = options.signal;
  signal?.throwIfAborted();
  const threads =
    options.copyThreads === undefined
      ? Math.min(16, Math.max(2, os.availableParallelism() * 2))
      : v.integer('copyThreads', options.copyThreads, 1, 64);
  const job = addon().copyTree(src, dest, { reflink, threads });
  const onAbort = (): void => job.cancel();
  signal?.addEventListener('abort', onAbort, { once: true });
  try {
    await job.promise;
  } catch (err) {
    if (signal?.aborted) throw signal.reason;
    const e = err as Error & { code?: string; path?: string };
    if (e.code === 'ENOSPC' || e.code === 'EDQUOT')
      throw new MicrovmError(
        'ERR_MICROVM_NO_SPACE',
        `No space left to copy the rootfs (${e.code} at ${e.path ?? dest}); free space on the data dir's filesystem, or let the overlay strategy run (no copy)`,
        { cause: err },
      );
    throw new MicrovmError('ERR_MICROVM_CLONE_COPY', `copying the rootfs failed at ${e.path ?? src}: ${e.message}`, {
      cause: err,
    });
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
}

async function reflinkSupported(sourceDir: string, vmDir: string): Promise<boolean> {
  // Probe with a one-byte file on the destination filesystem, then one from the source.
  const probe = path.join(vmDir, '.reflink-probe');
  const probeSrc = path.join(vmDir, '.reflink-probe-src');
  try {
    await fsp.writeFile(probeSrc, 'x');
    await fsp.copyFile(probeSrc, probe, fs.constants.COPYFILE_FICLONE_FORCE);
    const st = await fsp.stat(sourceDir);
    const dst = await fsp.stat(vmDir);
    return st.dev === dst.dev; // FICLONE does not cross filesystems
  } catch {
    return false;
  } finally {
    await fsp.rm(probe, { force: true });
    await fsp.rm(probeSrc, { force: true });
  }
}

/** Runs the strategy chain and returns the first that works. */
export async function cloneRootfs(options: CloneOptions): Promise<ClonedRootfs> {
  const order = options.strategies ?? (['overlay', 'reflink', 'copy'] as const);
  const reasons: string[] = [];
  for (const strategy of order) {
    options.signal?.throwIfAborted();
    if (strategy === 'overlay') {
      if (!options.overlaySupported) {
        reasons.push('overlay: the backend cannot mount it');
        continue;
      }
      if (!userNamespacesAvailable()) {
        reasons.push('overlay: user namespaces are not available');
        continue;
      }
      try {
        return await cloneOverlay(options);
      } catch (err) {
        reasons.push((err as Error).message);
        continue;
      }
    }
    const dest = path.join(options.vmDir, 'rootfs');
    if (strategy === 'reflink' && !(await reflinkSupported(options.sourceDir, options.vmDir))) {
      reasons.push('reflink: the filesystem does not support FICLONE');
      continue;
    }
    await fsp.rm(dest, { recursive: true, force: true });
    const engine = options.copyEngine ?? (nativeCopyAvailable() ? 'native' : haveGnuCp() ? 'cp' : 'node');
    try {
      if (engine === 'native') {
        await nativeCopy(options.sourceDir, dest, strategy === 'reflink' ? 'always' : 'auto', options);
      } else if (engine === 'cp') {
        await cpTree(options.sourceDir, dest, strategy === 'reflink' ? 'always' : 'auto', options.signal);
      } else {
        const flags = strategy === 'reflink' ? fs.constants.COPYFILE_FICLONE_FORCE : fs.constants.COPYFILE_FICLONE;
        await copyTree(options.sourceDir, dest, flags, options.concurrency ?? 16, options.signal);
      }
    } catch (err) {
      await fsp.rm(dest, { recursive: true, force: true });
      throw err;
    }
    return { strategy, rootPath: dest, writableDir: dest, sourceDir: options.sourceDir };
  }
  throw new MicrovmError(
    'ERR_MICROVM_CLONE_UNSUPPORTED',
    `No rootfs clone strategy worked:\n  - ${reasons.join('\n  - ')}`,
  );
}
