/**
 * The image cache (default `<dataDir>/images`):
 *
 *   refs.json                  "reference#os/arch" -> manifest digest (the zero-network fast path)
 *   images/<hex>/rootfs/       the unpacked root filesystem (never modified by VMs)
 *   images/<hex>/image.json    manifest, config, and the tree's integrity summary
 *   images/<hex>.lock          held while one process extracts it
 *   blobs/sha256/<hex>         downloaded layer blobs, verified, by digest
 *   tmp/                       extractions in progress (same filesystem: published by rename)
 *
 * An entry appears only complete: it is extracted under tmp/, fsynced, and renamed into place.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { addon } from '../native';
import { withFileLock } from '../state';
import type { ImageConfigFile, ImageManifest } from './oci';

/** What image.json records. */
export interface CacheEntry {
  digest: string;
  reference: string;
  manifest: ImageManifest;
  config: ImageConfigFile;
  createdAt: string;
  /** Integrity summary of rootfs/: entry count and total regular-file bytes. */
  tree: { entries: number; bytes: number };
}

export const hexOf = (digest: string): string => digest.replace(/^[a-z0-9]+:/, '');

export function paths(cacheDir: string, digest?: string) {
  const hex = digest ? hexOf(digest) : '';
  return {
    refs: path.join(cacheDir, 'refs.json'),
    refsLock: path.join(cacheDir, 'refs.lock'),
    images: path.join(cacheDir, 'images'),
    tmp: path.join(cacheDir, 'tmp'),
    entry: path.join(cacheDir, 'images', hex),
    rootfs: path.join(cacheDir, 'images', hex, 'rootfs'),
    meta: path.join(cacheDir, 'images', hex, 'image.json'),
    lock: path.join(cacheDir, 'images', `${hex}.lock`),
  };
}

export function readRefs(cacheDir: string): Record<string, { digest: string; at: string }> {
  try {
    return JSON.parse(fs.readFileSync(paths(cacheDir).refs, 'utf8')) as Record<string, { digest: string; at: string }>;
  } catch {
    return {};
  }
}

function writeFileAtomic(file: string, data: string): void {
  const tmp = `${file}.${process.pid}.tmp`;
  const fd = fs.openSync(tmp, 'w', 0o644);
  try {
    fs.writeSync(fd, data);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}

/** Records `reference -> digest` (under the refs lock). */
export async function setRef(cacheDir: string, reference: string, digest: string): Promise<void> {
  await withFileLock(paths(cacheDir).refsLock, () => {
    const refs = readRefs(cacheDir);
    refs[reference] = { digest, at: new Date().toISOString() };
    writeFileAtomic(paths(cacheDir).refs, `${JSON.stringify(refs, null, 2)}\n`);
  });
}

/** Counts entries and regular-file bytes under `dir` (without following symlinks; in the addon). */
export function treeSummary(dir: string): { entries: number; bytes: number } {
  return addon().summarizeTree(dir);
}

/** The cache entry for `digest` if it is complete (and, with verify 'full', intact). */
export function readEntry(cacheDir: string, digest: string, verify: 'fast' | 'full' = 'fast'): CacheEntry | undefined {
  const p = paths(cacheDir, digest);
  let entry: CacheEntry;
  try {
    entry = JSON.parse(fs.readFileSync(p.meta, 'utf8')) as CacheEntry;
    if (entry.digest !== digest || !fs.statSync(p.rootfs).isDirectory()) return undefined;
  } catch {
    return undefined;
  }
  if (verify === 'full') {
    let now: { entries: number; bytes: number };
    try {
      now = treeSummary(p.rootfs);
    } catch {
      return undefined; // unreadable: re-extract
    }
    if (now.entries !== entry.tree.entries || now.bytes !== entry.tree.bytes) return undefined;
  }
  return entry;
}

/** Publishes an extracted tree: writes image.json, fsyncs, renames `staged` into place. */
export function publish(cacheDir: string, staged: string, entry: CacheEntry): void {
  const p = paths(cacheDir, entry.digest);
  writeFileAtomic(path.join(staged, 'image.json'), `${JSON.stringify(entry)}\n`);
  const dirFd = fs.openSync(staged, 'r');
  fs.fsyncSync(dirFd);
  fs.closeSync(dirFd);
  fs.rmSync(p.entry, { recursive: true, force: true }); // a damaged earlier copy
  fs.renameSync(staged, p.entry);
}

/** A cached image, as list() reports it. */
export interface CachedImage {
  digest: string;
  references: string[];
  createdAt: string;
  bytes: number;
  path: string;
}

/** Lists complete entries with the references that point at them. */
export function list(cacheDir: string): CachedImage[] {
  const refs = readRefs(cacheDir);
  const out: CachedImage[] = [];
  let names: string[] = [];
  try {
    names = fs.readdirSync(paths(cacheDir).images).filter((n) => /^[a-f0-9]{64,128}$/.test(n));
  } catch {
    return [];
  }
  for (const hex of names) {
    try {
      const e = JSON.parse(fs.readFileSync(path.join(paths(cacheDir).images, hex, 'image.json'), 'utf8')) as CacheEntry;
      out.push({
        digest: e.digest,
        references: Object.keys(refs)
          .filter((r) => refs[r].digest === e.digest)
          .map((r) => r.replace(/#[^#]*$/, '')),
        createdAt: e.createdAt,
        bytes: e.tree.bytes,
        path: path.join(paths(cacheDir).images, hex, 'rootfs'),
      });
    } catch {
      /* incomplete: gc removes it */
    }
  }
  return out;
}

/** Removes entries older than `maxAgeMs` (and their references). Returns the digests removed. */
export async function evict(cacheDir: string, maxAgeMs: number): Promise<string[]> {
  const cutoff = Date.now() - maxAgeMs;
  const old = list(cacheDir).filter((i) => Date.parse(i.createdAt) < cutoff);
  for (const i of old) fs.rmSync(paths(cacheDir, i.digest).entry, { recursive: true, force: true });
  await withFileLock(paths(cacheDir).refsLock, () => {
    const refs = readRefs(cacheDir);
    for (const r of Object.keys(refs)) if (old.some((i) => i.digest === refs[r].digest)) delete refs[r];
    writeFileAtomic(paths(cacheDir).refs, `${JSON.stringify(refs, null, 2)}\n`);
  });
  return old.map((i) => i.digest);
}

/** Removes unreferenced or incomplete entries and abandoned temporary extractions. */
export async function gc(cacheDir: string): Promise<string[]> {
  const removed: string[] = [];
  const refs = readRefs(cacheDir);
  const referenced = new Set(Object.values(refs).map((r) => hexOf(r.digest)));
  const p = paths(cacheDir);
  for (const name of fs.existsSync(p.images) ? fs.readdirSync(p.images) : []) {
    if (name.endsWith('.lock')) continue;
    const complete = fs.existsSync(path.join(p.images, name, 'image.json'));
    if (!complete || !referenced.has(name)) {
      fs.rmSync(path.join(p.images, name), { recursive: true, force: true });
      removed.push(name);
    }
  }
  removed.push(...(await sweepAbandoned(cacheDir)));
  return removed;
}

function pidAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Removes what pulls killed mid-way left behind: extraction trees `tmp/x-<pid>-*` and blob
 * downloads `blobs/sha256/<hex>.<pid>.*.part` whose process is gone (a live pid, even a reused
 * one, keeps its files: never a half-written file of a running pull). Called by gc and after
 * every cold pull, so kill -9 of a pull does not leak disk for long. Returns what it removed.
 */
export async function sweepAbandoned(cacheDir: string): Promise<string[]> {
  const removed: string[] = [];
  const p = paths(cacheDir);
  for (const name of fs.existsSync(p.tmp) ? fs.readdirSync(p.tmp) : []) {
    const m = /^x-(\d+)-/.exec(name);
    if (m && pidAlive(Number(m[1]))) continue;
    await fs.promises.rm(path.join(p.tmp, name), { recursive: true, force: true });
    removed.push(`tmp/${name}`);
  }
  const blobs = path.join(cacheDir, 'blobs', 'sha256');
  for (const name of fs.existsSync(blobs) ? fs.readdirSync(blobs) : []) {
    const m = /^[a-f0-9]{64}\.(\d+)\.[a-z0-9]*\.part$/.exec(name);
    if (!m || pidAlive(Number(m[1]))) continue;
    await fs.promises.rm(path.join(blobs, name), { force: true });
    removed.push(`blobs/sha256/${name}`);
  }
  return removed;
}

/** Removes the whole cache. */
export function purge(cacheDir: string): void {
  fs.rmSync(cacheDir, { recursive: true, force: true });
}
