/**
 * Where image content comes from. An ImageSource resolves a reference to a manifest (selecting the
 * platform from an index) and opens blobs as streams whose digest and size are verified as they
 * are read. `oci-layout` reads an OCI image layout directory; the registry source lives in
 * registry.ts.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Readable, Transform } from 'node:stream';
import { MicrovmError } from '../errors';
import type { LayerInput } from './extract';
import {
  checkManifest,
  type Descriptor,
  type ImageConfigFile,
  type ImageIndex,
  type ImageManifest,
  isIndex,
  markVerifying,
  parseJson,
  type Platform,
  selectPlatform,
  verifyDigest,
} from './oci';

/** A reference resolved to one image. */
export interface ResolvedImage {
  /** Digest of the (platform-specific) image manifest: the cache key. */
  digest: string;
  manifest: ImageManifest;
  /** The image config, or its download (a registry's comes while the first layer extracts). */
  config: ImageConfigFile | Promise<ImageConfigFile>;
  /** A stream of the blob's bytes that fails with ERR_MICROVM_IMAGE_DIGEST if they do not match. */
  openBlob(d: Descriptor, signal?: AbortSignal): Promise<LayerInput>;
  /** Releases temporary files (archives are unpacked first). */
  close?(): void;
}

/** Wraps `input` so that its bytes are hashed and counted; the stream errors at the end on a mismatch. */
export function verifying(input: Readable, d: Descriptor, what: string): Readable {
  const [alg, want] = d.digest.split(':');
  const hash = createHash(alg);
  let size = 0;
  const t = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      size += chunk.length;
      if (d.size >= 0 && size > d.size)
        return cb(
          new MicrovmError('ERR_MICROVM_IMAGE_DIGEST', `${what}: more than the ${d.size} bytes its descriptor states`),
        );
      hash.update(chunk);
      cb(null, chunk);
    },
    flush(cb) {
      const got = hash.digest('hex');
      if (got !== want)
        return cb(
          new MicrovmError(
            'ERR_MICROVM_IMAGE_DIGEST',
            `${what}: digest mismatch (expected ${d.digest}, got ${alg}:${got})`,
          ),
        );
      if (d.size >= 0 && size !== d.size)
        return cb(new MicrovmError('ERR_MICROVM_IMAGE_DIGEST', `${what}: ${size} bytes, descriptor says ${d.size}`));
      cb();
    },
  });
  input.on('error', (e) => t.destroy(e));
  return markVerifying(input.pipe(t));
}

/** What kind of file `st` is, in words, for a refusal. */
function fileKind(st: fs.Stats): string {
  if (st.isFIFO()) return 'a FIFO';
  if (st.isCharacterDevice() || st.isBlockDevice()) return 'a device';
  if (st.isDirectory()) return 'a directory';
  if (st.isSocket()) return 'a socket';
  return 'not a regular file';
}

/**
 * Opens an image input (an archive, a layout's index or blob) for reading only if it is a regular
 * file, checked on the open descriptor: a FIFO, a device (`/dev/zero`) or a directory could be read
 * forever or block, so it is refused up front (ERR_MICROVM_IMAGE_INPUT). The open never blocks
 * (O_NONBLOCK, which reads of a regular file ignore).
 */
export function openImageInput(file: string, what: string): number {
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new MicrovmError(
      code === 'ENOENT' ? 'ERR_MICROVM_IMAGE_NOT_FOUND' : 'ERR_MICROVM_IMAGE_INPUT',
      `${what}: ${file} ${code === 'ENOENT' ? 'does not exist' : `cannot be read (${code ?? (err as Error).message})`}`,
      { cause: err },
    );
  }
  const st = fs.fstatSync(fd);
  if (!st.isFile()) {
    fs.closeSync(fd);
    throw new MicrovmError(
      'ERR_MICROVM_IMAGE_INPUT',
      `${what}: ${file} is ${fileKind(st)}, not a regular file: refused (it could be read forever or block)`,
    );
  }
  return fd;
}

/** A whole small image input (index, manifest, config), read through {@link openImageInput}. */
function readImageInput(file: string, what: string): Buffer {
  const fd = openImageInput(file, what);
  try {
    return fs.readFileSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function blobPath(layout: string, digest: string): string {
  const m = /^(sha256|sha512):([a-f0-9]+)$/.exec(digest);
  if (!m) throw new MicrovmError('ERR_MICROVM_IMAGE_MANIFEST', `bad digest ${JSON.stringify(digest)}`);
  return path.join(layout, 'blobs', m[1], m[2]);
}

function readBlob(layout: string, d: Descriptor, what: string, max = 4 * 1024 * 1024): Buffer {
  let data: Buffer;
  try {
    const p = blobPath(layout, d.digest);
    const fd = openImageInput(p, what);
    try {
      if (fs.fstatSync(fd).size > max)
        throw new MicrovmError('ERR_MICROVM_IMAGE_MANIFEST', `${what} is larger than ${max} bytes`);
      data = fs.readFileSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  } catch (err) {
    if (String((err as MicrovmError).code).startsWith('ERR_')) throw err;
    throw new MicrovmError('ERR_MICROVM_IMAGE_NOT_FOUND', `${what} (${d.digest}) is missing from the layout`, {
      cause: err,
    });
  }
  verifyDigest(data, d.digest, what);
  return data;
}

/** Resolves `oci:PATH[:TAG]`. */
export function resolveOciLayout(layout: string, tag: string | undefined, platform: Platform): ResolvedImage {
  const where = `OCI layout ${layout}`;
  let index: ImageIndex;
  try {
    index = parseJson<ImageIndex>(readImageInput(path.join(layout, 'index.json'), where), `${where} index.json`);
  } catch (err) {
    const code = (err as MicrovmError).code;
    if (code === 'ERR_MICROVM_IMAGE_MANIFEST' || code === 'ERR_MICROVM_IMAGE_INPUT') throw err;
    throw new MicrovmError('ERR_MICROVM_IMAGE_NOT_FOUND', `${where} has no readable index.json`, { cause: err });
  }
  if (!Array.isArray(index.manifests))
    throw new MicrovmError('ERR_MICROVM_IMAGE_MANIFEST', `${where} index.json has no manifests`);
  const tags = index.manifests
    .map((d) => d.annotations?.['org.opencontainers.image.ref.name'])
    .filter((t): t is string => !!t);
  let desc: Descriptor | undefined;
  if (tag) desc = index.manifests.find((d) => d.annotations?.['org.opencontainers.image.ref.name'] === tag);
  else if (index.manifests.length === 1) desc = index.manifests[0];
  if (!desc) {
    throw new MicrovmError(
      'ERR_MICROVM_IMAGE_NOT_FOUND',
      `${where} has no image ${tag ? `tagged ${JSON.stringify(tag)}` : 'without a tag'}; tags: ${tags.join(', ') || 'none'}`,
    );
  }
  let doc = readBlob(layout, desc, `${where} manifest`);
  let parsed = parseJson<ImageManifest & ImageIndex>(doc, `${where} manifest`);
  for (let depth = 0; isIndex(parsed, desc.mediaType); depth++) {
    if (depth > 4) throw new MicrovmError('ERR_MICROVM_IMAGE_MANIFEST', `${where}: indexes nested too deep`);
    desc = selectPlatform(parsed, platform, where);
    doc = readBlob(layout, desc, `${where} manifest`);
    parsed = parseJson<ImageManifest & ImageIndex>(doc, `${where} manifest`);
  }
  const manifest = checkManifest(parsed, `${where} manifest`);
  const config = parseJson<ImageConfigFile>(readBlob(layout, manifest.config, `${where} config`), `${where} config`);
  return {
    digest: desc.digest,
    manifest,
    config,
    async openBlob(d) {
      const p = blobPath(layout, d.digest);
      if (!fs.existsSync(p))
        throw new MicrovmError('ERR_MICROVM_IMAGE_NOT_FOUND', `${where}: layer ${d.digest} is missing`);
      const fd = openImageInput(p, `${where}: layer`);
      return verifying(fs.createReadStream('', { fd, highWaterMark: 1 << 20 }), d, `layer ${d.digest}`);
    },
  };
}

/**
 * An unpacked archive is read by path (manifest.json, the config, index.json, blobs): a symlink
 * member must not lead those reads out of it (`config.json -> /root/.docker/config.json` would put a
 * host file's bytes into the cache). Links that stay inside (docker save links repeated layers) are
 * fine; the tree is ours and no longer changes, so resolving once is enough.
 */
function confineSymlinks(root: string, where: string): void {
  const realRoot = fs.realpathSync(root);
  const walk = (dir: string): void => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isSymbolicLink()) {
        let real = '';
        try {
          real = fs.realpathSync(p);
        } catch {
          /* dangling: refused below */
        }
        if (!real.startsWith(`${realRoot}${path.sep}`)) {
          throw new MicrovmError(
            'ERR_MICROVM_IMAGE_UNSAFE_ENTRY',
            `${where}: member ${JSON.stringify(path.relative(root, p))} is a symlink that leads out of the archive (to ${JSON.stringify(fs.readlinkSync(p))}); refused`,
          );
        }
      } else if (e.isDirectory()) walk(p);
    }
  };
  walk(root);
}

/**
 * Archives: the archive (a tar) is unpacked with the same hostile-input rules as layers into
 * `scratchDir`, then read as an OCI layout (`oci-archive:`) or as `docker save` output
 * (`docker-archive:`: manifest.json + config + uncompressed layer tars, each layer verified against
 * the config's rootfs.diff_ids).
 */
export async function resolveArchive(
  kind: 'oci-archive' | 'docker-archive',
  file: string,
  tag: string | undefined,
  platform: Platform,
  scratchDir: string,
  signal?: AbortSignal,
): Promise<ResolvedImage> {
  const { applyLayer } = await import('./extract');
  const fd = openImageInput(file, kind);
  fs.mkdirSync(scratchDir, { recursive: true, mode: 0o700 });
  const close = (): void => fs.rmSync(scratchDir, { recursive: true, force: true });
  try {
    try {
      await applyLayer(scratchDir, fs.createReadStream('', { fd, highWaterMark: 1 << 20 }), {
        state: { bytes: 0, entries: 0, warnings: [] },
        privileged: false,
        signal,
      });
    } catch (err) {
      // Name the user's archive, not the scratch directory it was unpacked into.
      const e = err as Error;
      if (e.name === 'AbortError') throw err;
      if (err instanceof MicrovmError)
        throw new MicrovmError(err.code, `${kind} ${file}: ${e.message.split(scratchDir).join('<archive>')}`, {
          cause: err,
        });
      throw err;
    }
    confineSymlinks(scratchDir, `${kind} ${file}`);
    if (kind === 'oci-archive') return { ...resolveOciLayout(scratchDir, tag, platform), close };
    const where = `docker-archive ${file}`;
    const entries = parseJson<{ Config: string; RepoTags?: string[]; Layers: string[] }[]>(
      fs.readFileSync(path.join(scratchDir, 'manifest.json')),
      `${where} manifest.json`,
    );
    const wanted = tag
      ? entries.find((e) => (e.RepoTags ?? []).some((t) => t === tag || t.endsWith(`/${tag}`)))
      : entries.length === 1
        ? entries[0]
        : undefined;
    if (!wanted)
      throw new MicrovmError(
        'ERR_MICROVM_IMAGE_NOT_FOUND',
        `${where} has no image ${tag ? JSON.stringify(tag) : 'without a reference'}; images: ${entries.flatMap((e) => e.RepoTags ?? []).join(', ') || 'untagged'}`,
      );
    const inside = (rel: string): string => {
      const p = path.resolve(scratchDir, rel);
      if (!p.startsWith(`${scratchDir}${path.sep}`))
        throw new MicrovmError(
          'ERR_MICROVM_IMAGE_MANIFEST',
          `${where}: path ${JSON.stringify(rel)} leaves the archive`,
        );
      return p;
    };
    const configBytes = fs.readFileSync(inside(wanted.Config));
    const configDigest = `sha256:${createHash('sha256').update(configBytes).digest('hex')}`;
    const config = parseJson<ImageConfigFile & { rootfs?: { diff_ids?: string[] } }>(configBytes, `${where} config`);
    const diffIds = config.rootfs?.diff_ids ?? [];
    if (diffIds.length !== wanted.Layers.length)
      throw new MicrovmError(
        'ERR_MICROVM_IMAGE_MANIFEST',
        `${where}: ${wanted.Layers.length} layers but ${diffIds.length} diff_ids`,
      );
    const layers: Descriptor[] = wanted.Layers.map((l, i) => ({
      mediaType: 'application/vnd.docker.image.rootfs.diff.tar',
      digest: diffIds[i],
      size: fs.statSync(inside(l)).size,
      annotations: { file: l },
    }));
    return {
      digest: configDigest, // docker save has no manifest digest: the image ID keys the cache
      manifest: { config: { digest: configDigest, size: configBytes.length }, layers },
      config,
      async openBlob(d) {
        return verifying(
          fs.createReadStream(inside(d.annotations?.file ?? ''), { highWaterMark: 1 << 20 }),
          d,
          `layer ${d.digest}`,
        );
      },
      close,
    };
  } catch (err) {
    close();
    throw err;
  }
}
