/**
 * Files and trees between host and guest over the agent: `copyIn`, `copyOut`, `readFile`,
 * `writeFile`. Atomic on the destination: a tree is built under a temporary name beside it and
 * renamed into place (a file is written to a temporary name and renamed), so a failure leaves
 * nothing partial behind.
 *
 * copyOut writes what the guest describes, and the guest is hostile: every name is checked (one
 * plain component at a time, no `..`, no NUL, bounded length), every file is created with
 * O_EXCL|O_NOFOLLOW inside a private temporary directory, entered only through directory
 * descriptors (never a path a guest could swap), set-ID bits are not taken from the guest, and
 * counts and bytes are capped. copyIn reads host trees the same way, without following links.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { asNoSpace, MicrovmError } from '../errors';
import type { AgentClient } from './client';
import { MAX_PAYLOAD } from './protocol';
import { DirHandle } from '../host/dir-handle';

/** Limits of {@link copyOut} (and readFile). */
export interface CopyOutLimits {
  /** Most entries in a tree. Default 1,000,000. */
  maxEntries?: number;
  /** Most bytes in all. Default 64 GiB (readFile: 256 MiB). */
  maxBytes?: number;
  /**
   * Keep set-user-ID and set-group-ID bits the guest reports (only when this process is root;
   * default false: they are dropped, so a copy never makes a set-ID file from guest metadata).
   */
  keepSetId?: boolean;
}

const isRoot = (): boolean => process.getuid?.() === 0;

/** The most bytes of names (paths and link targets) a tree listing may hold (64 MiB). */
export const MAX_LISTING_NAME_BYTES = 64 * 2 ** 20;

function copyError(message: string, cause?: unknown): MicrovmError {
  return new MicrovmError('ERR_MICROVM_COPY', message, { cause });
}

function tempName(dir: string, base: string): string {
  return path.join(dir, `.${base}.microvm-${randomBytes(6).toString('hex')}`);
}

function guestDirname(p: string): string {
  const d = path.posix.dirname(p);
  return d;
}

/** A relative path from the guest, checked component by component. */
export function safeRelative(p: unknown): string {
  if (typeof p !== 'string' || p.length === 0 || p.length > 4096 || p.includes('\0'))
    throw copyError(`The guest sent an unusable path ${JSON.stringify(String(p).slice(0, 100))}`);
  const parts = p.split('/');
  for (const c of parts) {
    if (c === '' || c === '.' || c === '..' || Buffer.byteLength(c) > 255)
      throw copyError(`The guest sent an unsafe path ${JSON.stringify(p.slice(0, 200))}`);
  }
  return parts.join(path.sep);
}

interface Entry {
  p: string;
  t: 'd' | 'f' | 'l' | 'o';
  m: number;
  s: number;
  u: number;
  g: number;
  l?: string;
}

function toEntry(j: Record<string, unknown>): Entry {
  const num = (k: string): number => {
    const x = j[k];
    if (typeof x !== 'number' || !Number.isSafeInteger(x) || x < 0)
      throw copyError(`The guest sent a bad entry field ${k}`);
    return x;
  };
  const t = j.t;
  if (t !== 'd' && t !== 'f' && t !== 'l' && t !== 'o') throw copyError('The guest sent an entry of unknown type');
  // Bounded before anything keeps it: a path longer than PATH_MAX is refused here.
  if (typeof j.p !== 'string') throw copyError('The guest sent an entry without a path');
  if (j.p.length > 4096) throw copyError('The guest sent an entry with a path over 4096 characters');
  const e: Entry = { p: j.p, t, m: num('m') & 0o7777, s: num('s'), u: num('u'), g: num('g') };
  if (t === 'l') {
    if (typeof j.l !== 'string' || j.l.length === 0 || j.l.length > 4096 || j.l.includes('\0'))
      throw copyError('The guest sent a symlink without a usable target');
    e.l = j.l;
  }
  return e;
}

/** Metadata of a guest path (lstat), or undefined when it does not exist. */
export async function guestStat(agent: AgentClient, guestPath: string): Promise<Entry | undefined> {
  let entry: Entry | undefined;
  try {
    await agent.op({ op: 'stat', path: guestPath }, { onInfo: (j) => (entry = toEntry(j)) }).done;
  } catch (err) {
    if ((err as { guestCode?: string }).guestCode === 'ENOENT') return undefined;
    throw err;
  }
  return entry;
}

/** Sends one host file (open, checked regular) to `guestPath`; the descriptor is closed. */
async function putFile(agent: AgentClient, fh: fsp.FileHandle, st: fs.Stats, guestPath: string): Promise<void> {
  const owner = isRoot() ? { uid: st.uid, gid: st.gid } : {};
  try {
    const put = agent.op({ op: 'put', path: guestPath, mode: st.mode & 0o7777, ...owner });
    try {
      const buf = Buffer.allocUnsafe(MAX_PAYLOAD * 4);
      for (;;) {
        const { bytesRead } = await fh.read(buf, 0, buf.length);
        if (bytesRead === 0) break;
        await put.write(Buffer.from(buf.subarray(0, bytesRead)));
      }
      put.end();
    } catch (err) {
      put.cancel();
      await put.done.catch(() => undefined);
      throw err;
    }
    await put.done;
  } finally {
    await fh.close();
  }
}

/** A host-side failure of a copy (the tree changed under it, a file vanished) as ERR_MICROVM_COPY. */
function hostFailure(what: string, err: unknown): MicrovmError {
  const e = err as NodeJS.ErrnoException;
  if (e instanceof MicrovmError) return e;
  const full = asNoSpace(err, `Cannot copy ${what}`);
  if (full !== err) return full as MicrovmError;
  const why =
    e.code === 'ELOOP' || e.code === 'ENOTDIR'
      ? 'it was replaced by a symlink or another kind of file during the copy'
      : (e.code ?? e.message);
  return copyError(`Cannot copy ${what}: ${why}`, err);
}

/**
 * Copies a host file or directory tree into the guest at `guestPath` (into it, when that is an
 * existing directory, as `docker cp` does). Modes and symlinks (as links) are kept, owners when
 * this process is root. Nothing is left at the destination when it fails.
 *
 * `hostPath` is resolved as given, its last component not followed; everything below it is read
 * through directory descriptors without following a link (lib/host/dir-handle.ts), and only
 * regular files are read (checked on the open descriptor): a guest that swaps parts of the tree
 * for symlinks or FIFOs while it is copied (a share it can write) gets an error, never a host file
 * from elsewhere.
 */
export async function copyIn(agent: AgentClient, hostPath: string, guestPath: string): Promise<void> {
  const st = await fsp.lstat(hostPath);
  let dest = guestPath;
  const at = await guestStat(agent, guestPath);
  if (at?.t === 'd') dest = path.posix.join(guestPath, path.basename(hostPath));
  if (st.isFile()) {
    const fh = await fsp
      .open(hostPath, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK)
      .catch((err: unknown) => {
        throw hostFailure(hostPath, err);
      });
    const fst = await fh.stat();
    if (!fst.isFile()) {
      await fh.close();
      throw copyError(`Cannot copy ${hostPath}: it is no longer a regular file`);
    }
    return putFile(agent, fh, fst, dest);
  }
  if (!st.isDirectory() && !st.isSymbolicLink()) throw copyError(`${hostPath} is not a file, directory or symlink`);
  const tmp = tempName(guestDirname(dest), path.posix.basename(dest));
  const dirs: { guest: string; st: fs.Stats }[] = [];
  const walk = async (dir: DirHandle, guest: string): Promise<void> => {
    const names = await dir.readdir();
    for (const name of names) {
      const g = path.posix.join(guest, name);
      const s = await dir.lstat(name);
      if (!s) continue; // gone since the listing
      if (s.isSymbolicLink()) {
        await agent.op({ op: 'symlink', path: g, target: await dir.readlink(name) }).done;
        if (isRoot()) await agent.op({ op: 'attr', path: g, uid: s.uid, gid: s.gid }).done;
      } else if (s.isDirectory()) {
        const sub = await dir.dir(name);
        try {
          const own = sub.stat();
          await agent.op({ op: 'mkdir', path: g, mode: 0o700 }).done;
          dirs.push({ guest: g, st: own });
          await walk(sub, g);
        } finally {
          sub.close();
        }
      } else if (s.isFile()) {
        const { fh, st: fst } = await dir.openRegular(name);
        await putFile(agent, fh, fst, g);
      } // sockets, fifos, devices: skipped
    }
  };
  try {
    if (st.isSymbolicLink()) {
      await agent.op({ op: 'symlink', path: tmp, target: await fsp.readlink(hostPath) }).done;
      if (isRoot()) await agent.op({ op: 'attr', path: tmp, uid: st.uid, gid: st.gid }).done;
    } else {
      const top = await DirHandle.open(hostPath, { noFollow: true }).catch((err: unknown) => {
        throw hostFailure(hostPath, err);
      });
      try {
        await agent.op({ op: 'mkdir', path: tmp, mode: 0o700 }).done;
        dirs.push({ guest: tmp, st: top.stat() });
        await walk(top, tmp).catch((err: unknown) => {
          throw hostFailure(`${hostPath} (a part of the tree)`, err);
        });
      } finally {
        top.close();
      }
    }
    // Modes last (a read-only directory could not be filled), deepest first.
    for (const d of dirs.reverse()) {
      const owner = isRoot() ? { uid: d.st.uid, gid: d.st.gid } : {};
      await agent.op({ op: 'attr', path: d.guest, mode: d.st.mode & 0o7777, ...owner }).done;
    }
    await agent.op({ op: 'rename', path: tmp, to: dest }).done;
  } catch (err) {
    await agent.op({ op: 'remove', path: tmp }).done.catch(() => undefined);
    throw err;
  }
}

/** The mode to give a copied entry: set-user-ID and set-group-ID only when asked for (and root). */
function hostMode(e: Entry, keepSetId: boolean): number {
  return keepSetId && isRoot() ? e.m : e.m & ~0o6000;
}

/**
 * Reads a guest file into a new file `name` of `dir` (created 0600, O_EXCL|O_NOFOLLOW), then sets
 * its owner (root only) and then its mode, through the descriptor.
 */
async function getFile(
  agent: AgentClient,
  guestPath: string,
  dir: DirHandle,
  name: string,
  budget: { bytes: number },
  mode: (e: Entry) => number,
): Promise<Entry> {
  const fh = await dir.openFile(name, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
  let info: Entry | undefined;
  try {
    const get = agent.op(
      { op: 'get', path: guestPath },
      {
        onInfo: (j) => {
          if (info) throw copyError('The guest sent two descriptions of one file');
          info = toEntry(j);
        },
        onData: async (b) => {
          budget.bytes -= b.length;
          if (budget.bytes < 0) throw copyError('The copy exceeds maxBytes');
          await fh.write(b);
        },
      },
    );
    await get.done;
    if (!info) throw copyError('The guest sent no description of the file');
    if (isRoot()) await fh.chown(info.u, info.g);
    await fh.chmod(mode(info));
  } finally {
    await fh.close();
  }
  return info;
}

/** Directory handles of a tree being built, by relative path; a few kept open at a time. */
class TreeDirs {
  #open = new Map<string, DirHandle>();
  constructor(private readonly root: DirHandle) {}
  /** The handle of `rel` ('' is the root), entered component by component without following links. */
  async get(rel: string): Promise<DirHandle> {
    if (rel === '') return this.root;
    const hit = this.#open.get(rel);
    if (hit) return hit;
    const parent = await this.get(path.posix.dirname(rel) === '.' ? '' : path.posix.dirname(rel));
    if (this.#open.size >= 64) this.closeAll();
    const h = await parent.dir(path.posix.basename(rel));
    this.#open.set(rel, h);
    return h;
  }
  closeAll(): void {
    for (const h of this.#open.values()) h.close();
    this.#open.clear();
  }
}

/**
 * Copies a guest file or tree to `hostPath` (into it, when that is an existing directory).
 *
 * The guest is hostile and may also be changing the destination's directory (a share it can
 * write) while this runs, so: `hostPath`'s directory is opened once; everything is built in a
 * private directory (0700) made there, through directory descriptors that never follow a link
 * (lib/host/dir-handle.ts); files are created 0600 and get their owner (root only) before their
 * mode; set-user-ID and set-group-ID bits from the guest are dropped unless `keepSetId` (and
 * root); the finished entry is renamed into place; on failure nothing is left.
 */
export async function copyOut(
  agent: AgentClient,
  guestPath: string,
  hostPath: string,
  limits: CopyOutLimits = {},
): Promise<void> {
  const maxEntries = limits.maxEntries ?? 1_000_000;
  const budget = { bytes: limits.maxBytes ?? 64 * 2 ** 30 };
  const mode = (e: Entry): number => hostMode(e, limits.keepSetId === true);
  let dest = path.resolve(hostPath);
  const there = await fsp.lstat(dest).catch(() => undefined);
  if (there?.isDirectory()) dest = path.join(dest, path.posix.basename(guestPath) || 'root');
  const entries: Entry[] = [];
  // The listing is held until the copy starts: bounded by count and by the bytes of its names.
  let nameBytes = 0;
  await agent.op(
    { op: 'list', path: guestPath },
    {
      onInfo: (j) => {
        if (entries.length >= maxEntries) throw copyError(`The tree has more than ${maxEntries} entries`);
        const e = toEntry(j);
        nameBytes += e.p.length + (e.l?.length ?? 0);
        if (nameBytes > MAX_LISTING_NAME_BYTES)
          throw copyError(`The tree's names take more than ${MAX_LISTING_NAME_BYTES} bytes`);
        entries.push(e);
      },
    },
  ).done;
  const root = entries[0];
  if (!root || root.p !== '') throw copyError('The guest listed no root entry');
  if (root.t !== 'f' && root.t !== 'l' && root.t !== 'd')
    throw copyError(`${guestPath} is not a file, directory or symlink`);
  const parent = await DirHandle.open(path.dirname(dest)).catch((err: unknown) => {
    throw hostFailure(path.dirname(dest), err);
  });
  const name = path.basename(dest);
  const work = `.microvm-copy-${randomBytes(6).toString('hex')}`;
  let tmp: DirHandle | undefined;
  try {
    await parent.mkdir(work, 0o700);
    tmp = await parent.dir(work);
    const ENTRY = 'entry';
    if (root.t === 'f') {
      await getFile(agent, guestPath, tmp, ENTRY, budget, mode);
    } else if (root.t === 'l') {
      await tmp.symlink(root.l as string, ENTRY);
      if (isRoot()) await tmp.lchown(ENTRY, root.u, root.g);
    } else {
      await tmp.mkdir(ENTRY, 0o700);
      const top = await tmp.dir(ENTRY);
      const tree = new TreeDirs(top);
      try {
        const dirs = new Map<string, Entry>([['', root]]);
        const seen = new Set<string>(['']);
        for (const e of entries.slice(1)) {
          safeRelative(e.p);
          const up = path.posix.dirname(e.p) === '.' ? '' : path.posix.dirname(e.p);
          // Only into directories this copy created: never through a link, never twice.
          if (!dirs.has(up) || seen.has(e.p)) throw copyError(`The guest sent ${JSON.stringify(e.p)} out of order`);
          seen.add(e.p);
          const at = await tree.get(up);
          const base = path.posix.basename(e.p);
          if (e.t === 'd') {
            await at.mkdir(base, 0o700);
            dirs.set(e.p, e);
          } else if (e.t === 'l') {
            await at.symlink(e.l as string, base);
            if (isRoot()) await at.lchown(base, e.u, e.g);
          } else if (e.t === 'f') {
            await getFile(agent, path.posix.join(guestPath, e.p), at, base, budget, mode);
          }
        }
        // Directories last (a read-only one could not be filled), deepest first: owner, then mode.
        for (const [rel, e] of [...dirs.entries()].reverse())
          (await tree.get(rel)).chownChmod(isRoot() ? { uid: e.u, gid: e.g } : undefined, mode(e));
      } finally {
        tree.closeAll();
        top.close();
      }
    }
    await tmp.rename(ENTRY, parent, name);
  } catch (err) {
    throw err instanceof MicrovmError || (err as { name?: string }).name === 'AbortError'
      ? err
      : hostFailure(dest, err);
  } finally {
    tmp?.close();
    await parent.removeTree(work);
    parent.close();
  }
}

/** A guest file's contents (at most `maxBytes`, default 256 MiB). */
export async function readFile(agent: AgentClient, guestPath: string, maxBytes = 256 * 2 ** 20): Promise<Buffer> {
  const parts: Buffer[] = [];
  let total = 0;
  await agent.op(
    { op: 'get', path: guestPath },
    {
      onData: (b) => {
        total += b.length;
        if (total > maxBytes) throw copyError(`${guestPath} is larger than maxBytes (${maxBytes})`);
        parts.push(b);
      },
    },
  ).done;
  return Buffer.concat(parts);
}

/** Writes `data` to a guest file atomically (temporary name, then rename). */
export async function writeFile(
  agent: AgentClient,
  guestPath: string,
  data: Buffer | string,
  mode = 0o644,
): Promise<void> {
  const put = agent.op({ op: 'put', path: guestPath, mode });
  const buf = typeof data === 'string' ? Buffer.from(data) : data;
  try {
    await put.write(buf);
    put.end();
  } catch (err) {
    put.cancel();
    await put.done.catch(() => undefined);
    throw err;
  }
  await put.done;
}
