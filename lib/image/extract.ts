/**
 * Applying image layers to a root directory. Layers are hostile input: the addon's LayerExtractor
 * (native/addon/layer_extract.h) parses them and makes every filesystem change through root-scoped
 * primitives (native/addon/extract.h), so whatever an archive holds — absolute paths, `..`, symlinked
 * parents, hardlinks or whiteouts aimed outside — nothing outside the root is created, changed or
 * removed. Paths with `..` are refused outright; device nodes are skipped (with a warning). Caps
 * on total bytes, entry count and decompression ratio stop decompression bombs. OCI whiteouts
 * (`.wh.NAME`, `.wh..wh..opq`) affect lower layers only. This module picks the decompression,
 * moves the bytes, and turns native failures into MicrovmErrors.
 */
import { execFileSync, spawn } from 'node:child_process';
import { Readable } from 'node:stream';
import { MicrovmError } from '../errors';
import { addon, type NativeExtractResult, type NativeLayerExtractor } from '../native';
import type { SocketBody } from './http';
import { verifiesDigest } from './oci';

/** Limits for one image (all its layers together). */
export interface ExtractLimits {
  /** Uncompressed bytes (30 GiB). */
  maxBytes?: number;
  /** Archive members (1,000,000). */
  maxEntries?: number;
  /** Uncompressed / compressed, checked once past 1 MiB (250). */
  maxRatio?: number;
}

/**
 * A layer's bytes: a stream, or a SocketBody whose chunks are valid only during 'data' handlers
 * (`transient`) and which may ask for a copy of its bytes on a descriptor (`tee`).
 */
export type LayerInput = Readable | SocketBody;

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
      execFileSync('zstd', ['--version'], { stdio: 'ignore' });
      zstdBinary = true;
    } catch {
      zstdBinary = false;
    }
  }
  return zstdBinary;
}

/**
 * The zstd binary as a decompressor: the fallback when libzstd.so.1 cannot be loaded into the
 * addon (Node 20 has no zstd of its own).
 */
interface Zstd {
  input: NodeJS.WritableStream & { write(chunk: Buffer): boolean; end(): void };
  output: Readable;
  /** Settles with the child's exit status. */
  done: Promise<void>;
  destroy(): void;
}

function zstdDecompressor(): Zstd {
  if (!haveZstd())
    throw new MicrovmError(
      'ERR_MICROVM_IMAGE_ZSTD',
      'This layer is zstd-compressed: install libzstd1 or the zstd binary (apt-get install zstd)',
    );
  const child = spawn('zstd', ['-dc', '--no-progress'], { stdio: ['pipe', 'pipe', 'pipe'] });
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  child.stdin.on('error', () => undefined); // EPIPE when we stop early: the exit status says more
  const done = new Promise<void>((resolve, reject) =>
    child.on('close', (code, sig) =>
      code === 0
        ? resolve()
        : reject(
            new MicrovmError(
              'ERR_MICROVM_IMAGE_LAYER',
              `zstd failed: ${err.trim() || (sig ? `killed by ${sig}` : `exit ${String(code)}`)}`,
            ),
          ),
    ),
  );
  done.catch(() => undefined);
  return {
    input: child.stdin,
    output: child.stdout,
    done,
    destroy: () => {
      child.stdin.destroy();
      child.stdout.destroy();
      child.kill('SIGKILL');
    },
  };
}

/** Input queued in the extractor (bytes): above HIGH the source pauses until LOW. */
const HIGH_WATER = 4 << 20;
const LOW_WATER = 1 << 20;

/** A native failure as the extraction error it means. */
function fromNative(err: unknown): unknown {
  const e = err as Error & { code?: string; path?: string };
  if (e && (e.code === 'ENOSPC' || e.code === 'EDQUOT')) {
    return new MicrovmError(
      'ERR_MICROVM_NO_SPACE',
      `No space left to extract the image (${e.code}${e.path ? ` at ${e.path}` : ''}); free space on the cache's filesystem, run \`microvm cache gc\`, or cap the cache with maxCacheBytes`,
      { cause: err },
    );
  }
  if (e && (e.code === 'EROFS' || e.code === 'EIO' || e.code === 'EACCES')) {
    return new MicrovmError(
      'ERR_MICROVM_IMAGE_WRITE',
      `The image cache cannot be written (${e.code}${e.path ? ` at ${e.path}` : ''}): ${e.message}`,
      { cause: err },
    );
  }
  if (e && typeof e.code === 'string' && !e.code.startsWith('ERR_') && e.path !== undefined) {
    // A filesystem call under the root failed: a path that would leave it (ELOOP, EXDEV, a
    // dangling parent...), or a tree the layer cannot be applied to.
    return new MicrovmError('ERR_MICROVM_IMAGE_UNSAFE_ENTRY', `Layer entry could not be applied safely: ${e.message}`, {
      cause: err,
    });
  }
  if (
    e &&
    (e.code === 'ERR_MICROVM_IMAGE_LIMIT' ||
      e.code === 'ERR_MICROVM_IMAGE_UNSAFE_ENTRY' ||
      e.code === 'ERR_MICROVM_IMAGE_LAYER')
  ) {
    return new MicrovmError(e.code, e.message);
  }
  return err;
}

/**
 * Extracts one layer into `root`. The JS thread only moves bytes: the addon's LayerExtractor
 * decompresses (zlib; libzstd, loaded at run time), parses and applies the layer rules on one
 * thread and makes the filesystem changes on another (native/addon/layer_extract.h); without libzstd,
 * zstd layers go through the zstd binary first.
 * Rejects with ERR_MICROVM_IMAGE_LIMIT, ERR_MICROVM_IMAGE_UNSAFE_ENTRY or ERR_MICROVM_IMAGE_LAYER;
 * once it settles, nothing more is written.
 */
export async function applyLayer(
  root: string,
  input: LayerInput,
  options: {
    mediaType?: string;
    limits?: ExtractLimits;
    state: ExtractState;
    privileged?: boolean;
    signal?: AbortSignal;
    onBytes?: (compressedBytesRead: number) => void;
    /** zstd layers: libzstd in the addon when it loads, else the zstd binary ('binary': always; for tests). */
    zstd?: 'auto' | 'binary';
  },
): Promise<void> {
  const signal = options.signal;
  signal?.throwIfAborted();
  const native = addon();
  const maxBytes = options.limits?.maxBytes ?? 30 * 1024 ** 3;
  const maxEntries = options.limits?.maxEntries ?? 1_000_000;
  const maxRatio = options.limits?.maxRatio ?? 250;
  const state = options.state;
  const privileged = options.privileged ?? process.geteuid?.() === 0;

  let x: NativeLayerExtractor | undefined;
  let zstd: Zstd | undefined;
  const transient = 'transient' in input && input.transient;
  const tee = 'tee' in input ? input.tee : undefined;
  const verified = verifiesDigest(input);
  try {
    await new Promise<void>((resolve, reject) => {
      let settled = false;
      let inputEnded = false;
      // A malformed layer from a digest-verified input: its bytes are read out (not extracted)
      // to learn whether they were what the descriptor says. If not, the digest error is the
      // answer (a blob damaged in transit), else this one (a blob that is malformed as published).
      let draining: unknown;
      const detach = (): void => {
        settled = true;
        signal?.removeEventListener('abort', onAbort);
      };
      const settle = (err: unknown): void => {
        detach();
        input.destroy();
        zstd?.destroy();
        x?.close();
        reject(err);
      };
      // A failure of the extraction (native, zstd); ignored while the input is read out.
      const fail = (err: unknown): void => {
        if (settled || draining !== undefined) return;
        const e = fromNative(err);
        if (verified && !inputEnded && (e as { code?: string }).code === 'ERR_MICROVM_IMAGE_LAYER') {
          draining = e;
          zstd?.destroy();
          x?.close();
          input.resume();
          return;
        }
        settle(e);
      };
      // A failure of the input (its digest, the network) or an abort: always the answer.
      const failInput = (err: unknown): void => {
        if (settled) return;
        if (draining !== undefined) return settle(err);
        fail(err);
      };
      const onAbort = (): void =>
        failInput(
          signal?.reason instanceof Error ? signal.reason : new DOMException('The operation was aborted', 'AbortError'),
        );
      signal?.addEventListener('abort', onAbort, { once: true });

      const nativeZstd = options.zstd !== 'binary' && native.zstdAvailable();
      const start = (compression: LayerCompression): void => {
        x = new native.LayerExtractor(root, {
          gzip: compression === 'gzip',
          zstd: compression === 'zstd' && nativeZstd,
          chown: privileged,
          overrideXattr: !privileged,
          maxBytes,
          maxEntries,
          maxRatio,
          bytesBefore: state.bytes,
          entriesBefore: state.entries,
          teeFd: tee && (compression !== 'zstd' || nativeZstd) ? tee.fd : -1,
          // A digest-verified input errors before anything is trusted: gzip's trailer is redundant.
          checkTrailer: !verified,
        });
      };
      // Bytes for the extractor; the source is held while more than HIGH_WATER wait there. The
      // extractor takes one waiter at a time: a source may still deliver (or end) while held.
      let waiting: Promise<void> | undefined;
      const feed = (chunk: Buffer, pause: () => void, resume: () => void): void => {
        let queued: number;
        try {
          queued = (x as NativeLayerExtractor).write(chunk);
        } catch (err) {
          return fail(err);
        }
        if (queued > HIGH_WATER) {
          pause();
          if (waiting) return;
          try {
            waiting = (x as NativeLayerExtractor).wait(LOW_WATER).then(() => {
              waiting = undefined;
              if (!settled) resume();
            }, fail);
          } catch (err) {
            fail(err);
          }
        }
      };
      const finish = (): void => {
        if (settled || draining !== undefined) return;
        if (waiting) {
          void waiting.then(finish); // the end came while the source was held
          return;
        }
        const ex = x as NativeLayerExtractor;
        ex.end();
        let done: Promise<NativeExtractResult>;
        try {
          done = ex.done();
        } catch (err) {
          return fail(err);
        }
        done
          .then(async (r) => {
            await zstd?.done;
            if (settled) return;
            detach();
            state.bytes = r.bytes;
            state.entries = r.entries;
            state.warnings.push(...r.warnings);
            tee?.commit(r.teeOk);
            resolve();
          })
          .catch(fail);
      };

      let compressedBytes = 0;
      let zstdBytes = 0;
      // The first bytes pick the decompressor when the media type does not say.
      const begin = (head: Buffer): boolean => {
        const compression = layerCompression(
          options.mediaType,
          head.length >= 4 ? head : Buffer.concat([head, Buffer.alloc(4)]),
        );
        try {
          start(compression);
          if (compression === 'zstd' && !nativeZstd) zstd = zstdDecompressor();
        } catch (err) {
          fail(err);
          return false;
        }
        if (zstd) {
          const z = zstd;
          z.output.on('data', (c: Buffer) => {
            if (settled || draining !== undefined) return;
            zstdBytes += c.length;
            if (zstdBytes > 1 << 20 && zstdBytes / compressedBytes > maxRatio)
              return fail(
                new MicrovmError(
                  'ERR_MICROVM_IMAGE_LIMIT',
                  `Image exceeds the decompression ratio (${maxRatio}:1) limit`,
                ),
              );
            feed(
              c,
              () => z.output.pause(),
              () => z.output.resume(),
            );
          });
          z.output.on('end', finish);
          z.output.on('error', (e) =>
            fail(new MicrovmError('ERR_MICROVM_IMAGE_LAYER', `Cannot decompress layer: ${e.message}`, { cause: e })),
          );
          z.done.catch(fail);
        }
        return true;
      };
      const push = (chunk: Buffer, owned: boolean): void => {
        compressedBytes += chunk.length;
        options.onBytes?.(compressedBytes);
        if (!zstd)
          return feed(
            chunk,
            () => input.pause(),
            () => input.resume(),
          );
        if (!zstd.input.write(owned ? chunk : Buffer.from(chunk))) {
          input.pause();
          (zstd.input as NodeJS.EventEmitter).once('drain', () => {
            if (!settled) input.resume();
          });
        }
      };
      let early: Buffer[] = [];
      let earlyBytes = 0;
      input.on('data', (chunk: Buffer) => {
        if (settled || draining !== undefined) return;
        if (x) return push(chunk, !transient);
        early.push(Buffer.from(chunk)); // a SocketBody's chunk lives only for this call
        earlyBytes += chunk.length;
        if (earlyBytes < 4) return;
        const head = Buffer.concat(early);
        early = [];
        if (begin(head)) push(head, true);
      });
      input.on('end', () => {
        inputEnded = true;
        if (settled) return;
        if (draining !== undefined) return settle(draining); // the bytes were right: the layer is not
        if (!x) {
          const head = Buffer.concat(early);
          if (!begin(head)) return;
          if (head.length) push(head, true);
          if (settled) return;
        }
        if (zstd) zstd.input.end();
        else finish();
      });
      input.on('error', (e: Error) => failInput(e));
      input.resume(); // a SocketBody starts paused
    });
  } finally {
    x?.close();
    tee?.commit(false); // no-op after a commit
  }
}
