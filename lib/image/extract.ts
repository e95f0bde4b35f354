/**
 * Applying image layers to a root directory. Layers are hostile input: every filesystem change goes
 * through the addon's root-scoped primitives (native/extract.h), so whatever an archive holds —
 * absolute paths, `..`, symlinked parents, hardlinks or whiteouts aimed outside — nothing outside
 * the root is created, changed or removed. Paths with `..` are refused outright; device nodes are
 * skipped (with a warning). Caps on total bytes, entry count and decompression ratio stop
 * decompression bombs. OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) affect lower layers only.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { Readable } from 'node:stream';
import * as zlib from 'node:zlib';
import { MicrovmError } from '../errors';
import { addon } from '../native';
import { type TarHeader, TarReader } from './tar';

/** Limits for one image (all its layers together). */
export interface ExtractLimits {
  /** Uncompressed bytes (30 GiB). */
  maxBytes?: number;
  /** Archive members (1,000,000). */
  maxEntries?: number;
  /** Uncompressed / compressed, checked once past 1 MiB (250). */
  maxRatio?: number;
}

/** Running totals across the layers of one image. */
export interface ExtractState {
  bytes: number;
  entries: number;
  warnings: string[];
}

export type LayerCompression = 'gzip' | 'zstd' | 'none';

/** Compression from an OCI/Docker media type, else from the first bytes. */
export function layerCompression(mediaType: string | undefined, head?: Buffer): LayerCompression {
  if (mediaType) {
    if (/gzip/.test(mediaType)) return 'gzip';
    if (/zstd/.test(mediaType)) return 'zstd';
    if (/tar$/.test(mediaType)) return 'none';
  }
  if (head && head[0] === 0x1f && head[1] === 0x8b) return 'gzip';
  if (head && head.readUInt32LE(0) === 0xfd2fb528) return 'zstd';
  return 'none';
}

let zstdBinary: boolean | undefined;
function haveZstd(): boolean {
  if (zstdBinary === undefined) {
    try {
      require('node:child_process').execFileSync('zstd', ['--version'], { stdio: 'ignore' });
      zstdBinary = true;
    } catch {
      zstdBinary = false;
    }
  }
  return zstdBinary;
}

/** Decompresses `input` as `compression`; zstd through the system binary (Node 20 has none). */
function decompress(input: Readable, compression: LayerCompression): { output: Readable; done: Promise<void> } {
  if (compression === 'gzip') {
    // 1 MiB output chunks: the default 16 KiB makes decompression ~2x slower here.
    const gunzip = zlib.createGunzip({ chunkSize: 1 << 20 });
    input.on('error', (e) => gunzip.destroy(e));
    input.pipe(gunzip);
    return { output: gunzip, done: Promise.resolve() };
  }
  if (compression === 'zstd') {
    if (!haveZstd()) throw new MicrovmError('ERR_MICROVM_IMAGE_ZSTD', 'This layer is zstd-compressed; install the zstd binary (apt-get install zstd)');
    const child = spawn('zstd', ['-dc', '--no-progress'], { stdio: ['pipe', 'pipe', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    input.on('error', (e) => child.stdout.destroy(e));
    input.pipe(child.stdin);
    child.stdin.on('error', () => undefined);
    const done = new Promise<void>((resolve, reject) =>
      child.on('close', (code) => (code === 0 ? resolve() : reject(new MicrovmError('ERR_MICROVM_IMAGE_LAYER', `zstd failed: ${err.trim() || `exit ${String(code)}`}`)))),
    );
    return { output: child.stdout, done };
  }
  return { output: input, done: Promise.resolve() };
}

/** Splits an archive path into safe components, or explains why it is refused. */
export function entryComponents(p: string): string[] | string {
  if (p.includes('\0')) return 'NUL in path';
  const parts = p.split('/').filter((c) => c !== '' && c !== '.');
  if (parts.some((c) => c === '..')) return "'..' in path";
  return parts;
}

const WH = '.wh.';
const OPAQUE = '.wh..wh..opq';

/**
 * Extracts one layer into `root`. `compressedSize` (when known) feeds the ratio cap. Resolves with
 * this layer's byte and entry counts; rejects with ERR_MICROVM_IMAGE_LIMIT,
 * ERR_MICROVM_IMAGE_UNSAFE_ENTRY or ERR_MICROVM_IMAGE_LAYER.
 */
export async function applyLayer(
  root: string,
  input: Readable,
  options: { mediaType?: string; limits?: ExtractLimits; state: ExtractState; privileged?: boolean; signal?: AbortSignal; onBytes?: (compressedBytesRead: number) => void },
): Promise<void> {
  const signal = options.signal;
  signal?.throwIfAborted();
  const native = addon();
  const maxBytes = options.limits?.maxBytes ?? 30 * 1024 ** 3;
  const maxEntries = options.limits?.maxEntries ?? 1_000_000;
  const maxRatio = options.limits?.maxRatio ?? 250;
  const state = options.state;
  const privileged = options.privileged ?? process.geteuid?.() === 0;

  // Take the first chunk to pick the decompressor when the media type does not say, then go on
  // reading through the same iterator, counting compressed bytes (for the ratio cap).
  const iter = (input as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
  const first = await iter.next();
  let compressedBytes = 0;
  const counted = Readable.from(
    (async function* () {
      if (first.done) return;
      compressedBytes += first.value.length;
      options.onBytes?.(compressedBytes);
      yield first.value;
      for (;;) {
        signal?.throwIfAborted();
        const r = await iter.next();
        if (r.done) return;
        compressedBytes += r.value.length;
        options.onBytes?.(compressedBytes);
        yield r.value;
      }
    })(),
    { objectMode: false },
  );
  const firstBytes: Buffer = first.done ? Buffer.alloc(0) : Buffer.from(first.value);
  const head = firstBytes.length >= 4 ? firstBytes : Buffer.concat([firstBytes, Buffer.alloc(4)]);
  const { output, done } = decompress(counted, layerCompression(options.mediaType, head));

  const created = new Set<string>(); // paths this layer made (whiteouts must not touch them)
  const dirAttrs: [string[], TarHeader][] = [];
  let fd = -1;
  let current: string[] | undefined;
  let currentHeader: TarHeader | undefined;
  let decompressedBytes = 0; // actually produced by the decompressor (for the ratio cap)

  const unsafe = (path: string, why: string): MicrovmError =>
    new MicrovmError('ERR_MICROVM_IMAGE_UNSAFE_ENTRY', `Refusing layer entry ${JSON.stringify(path.slice(0, 200))}: ${why}`);
  const limit = (what: string): MicrovmError => new MicrovmError('ERR_MICROVM_IMAGE_LIMIT', `Image exceeds the ${what} limit`);
  const applyAttrs = (comps: string[], h: TarHeader, kind: 'file' | 'dir' | 'symlink' | 'hardlink'): void => {
    const sec = Math.floor(h.mtime);
    native.setEntryAttrs(root, comps, kind, h.mode, h.uid, h.gid, sec, Math.round((h.mtime - sec) * 1e9), privileged, !privileged);
  };

  const reader = new TarReader({
    entry(h) {
      if (++state.entries > maxEntries) throw limit(`entry count (${maxEntries})`);
      const comps = entryComponents(h.path);
      if (typeof comps === 'string') throw unsafe(h.path, comps);
      if (comps.length === 0) return; // "./" itself
      const name = comps[comps.length - 1];
      const key = comps.join('/');
      if (name === OPAQUE) {
        const dir = comps.slice(0, -1);
        const prefix = dir.length ? `${dir.join('/')}/` : '';
        const keep = [...created].filter((p) => p.startsWith(prefix) && !p.slice(prefix.length).includes('/')).map((p) => p.slice(prefix.length));
        native.clearDirectory(root, dir, keep);
        return;
      }
      if (name.startsWith(WH)) {
        const target = [...comps.slice(0, -1), name.slice(WH.length)];
        if (name.length === WH.length) throw unsafe(h.path, 'empty whiteout');
        if (!created.has(target.join('/'))) native.removeEntry(root, target);
        return;
      }
      created.add(key);
      switch (h.type) {
        case 'dir':
          native.extractEntry(root, comps, 'dir', '', [], true);
          dirAttrs.push([comps, h]);
          return;
        case 'file':
          state.bytes += h.size; // what headers claim: fails early, before any data is written
          if (state.bytes > maxBytes) throw limit(`size (${maxBytes} bytes)`);
          fd = native.extractEntry(root, comps, 'file', '', [], true);
          current = comps;
          currentHeader = h;
          return;
        case 'symlink':
          if (h.linkpath.includes('\0')) throw unsafe(h.path, 'NUL in link target');
          native.extractEntry(root, comps, 'symlink', h.linkpath, [], true);
          applyAttrs(comps, h, 'symlink');
          return;
        case 'hardlink': {
          const target = entryComponents(h.linkpath);
          if (typeof target === 'string' || target.length === 0) throw unsafe(h.path, `hard link target ${JSON.stringify(h.linkpath)}: ${typeof target === 'string' ? target : 'empty'}`);
          native.extractEntry(root, comps, 'hardlink', '', target, true);
          return;
        }
        default:
          state.warnings.push(`skipped ${h.type} ${h.path} (device nodes and FIFOs are not created)`);
          created.delete(key);
      }
    },
    data(chunk) {
      let off = 0;
      while (off < chunk.length) off += fs.writeSync(fd, chunk, off, chunk.length - off);
    },
    endEntry() {
      if (fd >= 0) {
        // Attributes through the open descriptor: no second path walk. chown before chmod
        // (chown clears setuid/setgid); the override xattr needs a path, so unprivileged
        // extraction still goes through setEntryAttrs.
        const h = currentHeader as TarHeader;
        if (privileged) {
          fs.fchownSync(fd, h.uid, h.gid);
          fs.fchmodSync(fd, h.mode);
          fs.futimesSync(fd, h.mtime, h.mtime);
          fs.closeSync(fd);
        } else {
          fs.closeSync(fd);
          if (current) applyAttrs(current, h, 'file');
        }
        fd = -1;
      }
    },
  });

  try {
    await new Promise<void>((resolve, reject) => {
      const onAbort = (): void => {
        input.destroy();
        output.destroy();
        reject(signal?.reason instanceof Error ? signal.reason : new DOMException('The operation was aborted', 'AbortError'));
      };
      if (signal?.aborted) return onAbort();
      signal?.addEventListener('abort', onAbort, { once: true });
      output.on('data', (chunk: Buffer) => {
        try {
          decompressedBytes += chunk.length;
          if (decompressedBytes > (1 << 20) && compressedBytes > 0 && decompressedBytes / compressedBytes > maxRatio) throw limit(`decompression ratio (${maxRatio}:1)`);
          reader.feed(chunk);
        } catch (err) {
          output.destroy();
          input.destroy();
          reject(err);
        }
      });
      output.on('error', (e) => reject(e instanceof MicrovmError || e.name === 'AbortError' ? e : new MicrovmError('ERR_MICROVM_IMAGE_LAYER', `Cannot decompress layer: ${e.message}`, { cause: e })));
      output.on('end', () => {
        try {
          reader.end();
          resolve();
        } catch (err) {
          reject(err);
        }
      });
      output.resume();
    });
    await done;
    // Directory attributes last (their contents changed their mtimes), deepest first.
    for (const [comps, h] of dirAttrs.reverse()) applyAttrs(comps, h, 'dir');
  } catch (err) {
    const e = err as Error & { code?: string; path?: string };
    if (typeof e.code === 'string' && !e.code.startsWith('ERR_') && e.path !== undefined) {
      throw new MicrovmError('ERR_MICROVM_IMAGE_UNSAFE_ENTRY', `Layer entry could not be applied safely: ${e.message}`, { cause: err });
    }
    throw err;
  } finally {
    if (fd >= 0) fs.closeSync(fd);
  }
}
