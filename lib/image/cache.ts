/**
 * The image cache (default `<dataDir>/cache`):
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
import { vmsDir } from '../vm-dir';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { addon } from '../native';
import { defaultCacheDir } from '../paths';
import { isRecordedProcess, readState, withFileLock } from '../state';
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

/** What a reference resolved to, and (newest first, at most {@link HISTORY_MAX}) what it did before. */
export interface RefRecord {
  digest: string;
  /** When the reference was last resolved to `digest`. */
  at: string;
  /** Earlier digests of this reference, newest first, each with when it was replaced. */
  previous?: { digest: string; until: string }[];
}

/** How many earlier digests a reference remembers. */
export const HISTORY_MAX = 10;

export function readRefs(cacheDir: string): Record<string, RefRecord> {
  try {
    return JSON.parse(fs.readFileSync(paths(cacheDir).refs, 'utf8')) as Record<string, RefRecord>;
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

/**
 * Records `reference -> digest` (under the refs lock). When the reference pointed elsewhere, the
 * old digest goes to the front of its history. Returns the digest it replaced, if any.
 */
export async function setRef(cacheDir: string, reference: string, digest: string): Promise<string | undefined> {
  return withFileLock(paths(cacheDir).refsLock, () => {
    const refs = readRefs(cacheDir);
    const old = refs[reference];
    const now = new Date().toISOString();
    const moved = old && old.digest !== digest ? old.digest : undefined;
    const previous = moved
      ? [{ digest: moved, until: now }, ...(old.previous ?? [])].slice(0, HISTORY_MAX)
      : old?.previous;
    refs[reference] = { digest, at: now, ...(previous?.length ? { previous } : {}) };
    writeFileAtomic(paths(cacheDir).refs, `${JSON.stringify(refs, null, 2)}\n`);
    return moved;
  });
}

/** Marks an entry used now (its image.json's mtime): the least recently used go first under a size cap. */
export function touchEntry(cacheDir: string, digest: string): void {
  try {
    const now = new Date();
    fs.utimesSync(paths(cacheDir, digest).meta, now, now);
  } catch {
    /* a read-only cache still serves */
  }
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
  /** When a pull or run last used it. */
  lastUsedAt: string;
  bytes: number;
  path: string;
  /** References that pointed at this digest before they moved to another one. */
  formerReferences: { reference: string; until: string; now: string }[];
}

/** Lists complete entries with the references that point at them. */
export function list(cacheDir: string = defaultCacheDir()): CachedImage[] {
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
      const meta = path.join(paths(cacheDir).images, hex, 'image.json');
      const e = JSON.parse(fs.readFileSync(meta, 'utf8')) as CacheEntry;
      const name = (r: string): string => r.replace(/#[^#]*$/, '');
      out.push({
        digest: e.digest,
        references: Object.keys(refs)
          .filter((r) => refs[r].digest === e.digest)
          .map(name),
        createdAt: e.createdAt,
        lastUsedAt: fs.statSync(meta).mtime.toISOString(),
        bytes: e.tree.bytes,
        path: path.join(paths(cacheDir).images, hex, 'rootfs'),
        formerReferences: Object.keys(refs).flatMap((r) =>
          (refs[r].previous ?? [])
            .filter((p) => p.digest === e.digest)
            .slice(0, 1)
            .map((p) => ({ reference: name(r), until: p.until, now: refs[r].digest })),
        ),
      });
    } catch {
      /* incomplete: gc removes it */
    }
  }
  return out;
}

/**
 * Digests of images a live VM of this data root is running on (its overlay lower layer is the
 * cached tree): never removed under it. VMs are read from `<cacheDir>/../vms` (the default layout).
 */
export function imagesInUse(cacheDir: string): Set<string> {
  const used = new Set<string>();
  const vms = vmsDir(path.dirname(cacheDir));
  for (const name of fs.existsSync(vms) ? fs.readdirSync(vms) : []) {
    const st = readState(path.join(vms, name));
    if (st?.imageDigest && isRecordedProcess(st)) used.add(hexOf(st.imageDigest));
  }
  return used;
}

/** Drops references to removed digests (under the refs lock). */
async function dropRefs(cacheDir: string, removed: Set<string>): Promise<void> {
  if (removed.size === 0) return;
  await withFileLock(paths(cacheDir).refsLock, () => {
    const refs = readRefs(cacheDir);
    for (const r of Object.keys(refs)) if (removed.has(hexOf(refs[r].digest))) delete refs[r];
    writeFileAtomic(paths(cacheDir).refs, `${JSON.stringify(refs, null, 2)}\n`);
  });
}

/**
 * Removes entries older than `maxAgeMs` (and their references), except those a live VM runs on.
 * Returns the digests removed.
 */
export async function evict(cacheDir: string, maxAgeMs: number): Promise<string[]> {
  const cutoff = Date.now() - maxAgeMs;
  const busy = imagesInUse(cacheDir);
  const old = list(cacheDir).filter((i) => Date.parse(i.createdAt) < cutoff && !busy.has(hexOf(i.digest)));
  for (const i of old) fs.rmSync(paths(cacheDir, i.digest).entry, { recursive: true, force: true });
  await dropRefs(cacheDir, new Set(old.map((i) => hexOf(i.digest))));
  return old.map((i) => i.digest);
}

/** Bytes of the complete blobs kept in `blobs/sha256` (registry downloads). */
function blobFiles(cacheDir: string): { hex: string; file: string; bytes: number }[] {
  const dir = path.join(cacheDir, 'blobs', 'sha256');
  const out: { hex: string; file: string; bytes: number }[] = [];
  for (const name of fs.existsSync(dir) ? fs.readdirSync(dir) : []) {
    if (!/^[a-f0-9]{64}$/.test(name)) continue;
    try {
      out.push({ hex: name, file: path.join(dir, name), bytes: fs.statSync(path.join(dir, name)).size });
    } catch {
      /* removed meanwhile */
    }
  }
  return out;
}

/** The blobs (layers, config) the complete entries in `images` were made from. */
function blobsOf(cacheDir: string, images: CachedImage[]): Set<string> {
  const keep = new Set<string>();
  for (const i of images) {
    const e = readEntry(cacheDir, i.digest);
    for (const d of [...(e?.manifest.layers ?? []), ...(e?.manifest.config ? [e.manifest.config] : [])])
      keep.add(hexOf(d.digest));
  }
  return keep;
}

/**
 * Removes unreferenced or incomplete entries (not those a live VM runs on), downloaded blobs no
 * kept image was made from, and what killed pulls left (dead-pid temporary trees and `.part`
 * files). Returns what it removed.
 */
export async function gc(cacheDir: string = defaultCacheDir()): Promise<string[]> {
  const removed: string[] = [];
  const refs = readRefs(cacheDir);
  const referenced = new Set(Object.values(refs).map((r) => hexOf(r.digest)));
  const busy = imagesInUse(cacheDir);
  const p = paths(cacheDir);
  for (const name of fs.existsSync(p.images) ? fs.readdirSync(p.images) : []) {
    if (name.endsWith('.lock') || busy.has(name)) continue;
    const complete = fs.existsSync(path.join(p.images, name, 'image.json'));
    if (!complete || !referenced.has(name)) {
      fs.rmSync(path.join(p.images, name), { recursive: true, force: true });
      removed.push(name);
    }
  }
  const keep = blobsOf(cacheDir, list(cacheDir));
  for (const b of blobFiles(cacheDir)) {
    if (keep.has(b.hex)) continue;
    fs.rmSync(b.file, { force: true });
    removed.push(`blobs/sha256/${b.hex}`);
  }
  removed.push(...(await sweepAbandoned(cacheDir)));
  return removed;
}

/** Bytes the cache holds: extracted trees (regular-file bytes) and kept blobs. */
export function cacheBytes(cacheDir: string): number {
  return list(cacheDir).reduce((n, i) => n + i.bytes, 0) + blobFiles(cacheDir).reduce((n, b) => n + b.bytes, 0);
}

/**
 * Keeps the cache under `maxBytes`: removes the least recently used images (never `keep` nor
 * one a live VM runs on) and then blobs no remaining image was made from, until it fits or
 * nothing more may go. Returns the digests removed.
 */
export async function enforceCap(cacheDir: string, maxBytes: number, keep?: string): Promise<string[]> {
  if (cacheBytes(cacheDir) <= maxBytes) return [];
  const busy = imagesInUse(cacheDir);
  if (keep) busy.add(hexOf(keep));
  const images = list(cacheDir).sort((a, b) => a.lastUsedAt.localeCompare(b.lastUsedAt));
  const removed: string[] = [];
  let kept = images;
  const blobsNeeded = (): number => {
    const need = blobsOf(cacheDir, kept);
    return blobFiles(cacheDir)
      .filter((b) => need.has(b.hex))
      .reduce((n, b) => n + b.bytes, 0);
  };
  for (const i of images) {
    if (kept.reduce((n, x) => n + x.bytes, 0) + blobsNeeded() <= maxBytes) break;
    if (busy.has(hexOf(i.digest))) continue;
    fs.rmSync(paths(cacheDir, i.digest).entry, { recursive: true, force: true });
    removed.push(i.digest);
    kept = kept.filter((x) => x !== i);
  }
  await dropRefs(cacheDir, new Set(removed.map(hexOf)));
  const need = blobsOf(cacheDir, kept);
  for (const b of blobFiles(cacheDir)) if (!need.has(b.hex)) fs.rmSync(b.file, { force: true });
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
export function purge(cacheDir: string = defaultCacheDir()): void {
  fs.rmSync(cacheDir, { recursive: true, force: true });
}
