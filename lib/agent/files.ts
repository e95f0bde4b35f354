/**
 * Files and trees between host and guest over the agent: `copyIn`, `copyOut`, `readFile`,
 * `writeFile`. Atomic on the destination: a tree is built under a temporary name beside it and
 * renamed into place (a file is written to a temporary name and renamed), so a failure leaves
 * nothing partial behind.
 *
 * copyOut writes what the guest describes, and the guest is hostile: every name is checked (one
 * plain component at a time, no `..`, no NUL, bounded length), every file is created with
 * O_EXCL|O_NOFOLLOW inside the temporary tree, nothing is ever written through a symlink the guest
 * made, and counts and bytes are capped.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { MicrovmError } from '../errors';
import type { AgentClient } from './client';
import { MAX_PAYLOAD } from './protocol';

/** Limits of {@link copyOut} (and readFile). */
export interface CopyOutLimits {
  /** Most entries in a tree. Default 1,000,000. */
  maxEntries?: number;
  /** Most bytes in all. Default 64 GiB (readFile: 256 MiB). */
  maxBytes?: number;
}

const isRoot = (): boolean => process.getuid?.() === 0;

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
  if (typeof j.p !== 'string') throw copyError('The guest sent an entry without a path');
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

async function putFile(agent: AgentClient, file: string, guestPath: string, st: fs.Stats): Promise<void> {
  const owner = isRoot() ? { uid: st.uid, gid: st.gid } : {};
  const put = agent.op({ op: 'put', path: guestPath, mode: st.mode & 0o7777, ...owner });
  const fh = await fsp.open(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
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
  } finally {
    await fh.close();
  }
  await put.done;
}

/**
 * Copies a host file or directory tree into the guest at `guestPath` (into it, when that is an
 * existing directory, as `docker cp` does). Modes and symlinks (as links) are kept, owners when
 * this process is root. Nothing is left at the destination when it fails.
 */
export async function copyIn(agent: AgentClient, hostPath: string, guestPath: string): Promise<void> {
  const st = await fsp.lstat(hostPath);
  let dest = guestPath;
  const at = await guestStat(agent, guestPath);
  if (at?.t === 'd') dest = path.posix.join(guestPath, path.basename(hostPath));
  if (st.isFile()) return putFile(agent, hostPath, dest, st);
  if (!st.isDirectory() && !st.isSymbolicLink()) throw copyError(`${hostPath} is not a file, directory or symlink`);
  const tmp = tempName(guestDirname(dest), path.posix.basename(dest));
  const dirs: { guest: string; st: fs.Stats }[] = [];
  const walk = async (host: string, guest: string, s: fs.Stats): Promise<void> => {
    if (s.isSymbolicLink()) {
      await agent.op({ op: 'symlink', path: guest, target: await fsp.readlink(host) }).done;
      if (isRoot()) await agent.op({ op: 'attr', path: guest, uid: s.uid, gid: s.gid }).done;
    } else if (s.isDirectory()) {
      await agent.op({ op: 'mkdir', path: guest, mode: 0o700 }).done;
      dirs.push({ guest, st: s });
      for (const name of await fsp.readdir(host)) {
        const h = path.join(host, name);
        await walk(h, path.posix.join(guest, name), await fsp.lstat(h));
      }
    } else if (s.isFile()) {
      await putFile(agent, host, guest, s);
    } // sockets, fifos, devices: skipped
  };
  try {
    await walk(hostPath, tmp, st);
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

/** Reads a guest file into a host file descriptor's place `file` (created O_EXCL|O_NOFOLLOW). */
async function getFile(agent: AgentClient, guestPath: string, file: string, budget: { bytes: number }): Promise<Entry> {
  const fh = await fsp.open(
    file,
    fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW,
    0o600,
  );
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
  } finally {
    await fh.close();
  }
  if (!info) throw copyError('The guest sent no description of the file');
  return info;
}

/**
 * Copies a guest file or tree to `hostPath` (into it, when that is an existing directory). Built
 * under a temporary name beside the destination and renamed into place; removed on failure.
 */
export async function copyOut(
  agent: AgentClient,
  guestPath: string,
  hostPath: string,
  limits: CopyOutLimits = {},
): Promise<void> {
  const maxEntries = limits.maxEntries ?? 1_000_000;
  const budget = { bytes: limits.maxBytes ?? 64 * 2 ** 30 };
  let dest = path.resolve(hostPath);
  const there = await fsp.lstat(dest).catch(() => undefined);
  if (there?.isDirectory()) dest = path.join(dest, path.posix.basename(guestPath) || 'root');
  const tmp = tempName(path.dirname(dest), path.basename(dest));
  const entries: Entry[] = [];
  await agent.op(
    { op: 'list', path: guestPath },
    {
      onInfo: (j) => {
        if (entries.length >= maxEntries) throw copyError(`The tree has more than ${maxEntries} entries`);
        entries.push(toEntry(j));
      },
    },
  ).done;
  const root = entries[0];
  if (!root || root.p !== '') throw copyError('The guest listed no root entry');
  try {
    if (root.t === 'f') {
      await getFile(agent, guestPath, tmp, budget);
      await fsp.chmod(tmp, root.m);
      if (isRoot()) await fsp.lchown(tmp, root.u, root.g);
    } else if (root.t === 'l') {
      await fsp.symlink(root.l as string, tmp);
    } else if (root.t === 'd') {
      await fsp.mkdir(tmp, { mode: 0o700 });
      const dirs = new Map<string, Entry>([['', root]]);
      const seen = new Set<string>(['']);
      for (const e of entries.slice(1)) {
        const rel = safeRelative(e.p);
        const parent = path.posix.dirname(e.p) === '.' ? '' : path.posix.dirname(e.p);
        // Only into directories this copy created: never through a link, never twice.
        if (!dirs.has(parent) || seen.has(e.p)) throw copyError(`The guest sent ${JSON.stringify(e.p)} out of order`);
        seen.add(e.p);
        const target = path.join(tmp, rel);
        if (e.t === 'd') {
          await fsp.mkdir(target, { mode: 0o700 });
          dirs.set(e.p, e);
        } else if (e.t === 'l') {
          await fsp.symlink(e.l as string, target);
          if (isRoot()) await fsp.lchown(target, e.u, e.g);
        } else if (e.t === 'f') {
          await getFile(agent, path.posix.join(guestPath, e.p), target, budget);
          await fsp.chmod(target, e.m);
          if (isRoot()) await fsp.lchown(target, e.u, e.g);
        }
      }
      for (const [rel, e] of [...dirs.entries()].reverse()) {
        const target = rel ? path.join(tmp, safeRelative(rel)) : tmp;
        if (isRoot()) await fsp.lchown(target, e.u, e.g);
        await fsp.chmod(target, e.m);
      }
    } else {
      throw copyError(`${guestPath} is not a file, directory or symlink`);
    }
    await fsp.rename(tmp, dest);
  } catch (err) {
    await fsp.rm(tmp, { recursive: true, force: true }).catch(() => undefined);
    throw err;
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
