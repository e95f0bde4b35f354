/**
 * Stage microvm.ImagePull: `pull(ref)` turns a reference into an unpacked root filesystem in the
 * content-addressed cache, with the seed's sub-spans:
 *
 *   microvm.image.CacheLookup  (cache_hit)    ref -> digest -> complete entry: zero network
 *   microvm.image.Fetch                       resolve manifest (+ platform); the config of a
 *                                             registry image downloads during Extract
 *   microvm.image.Extract      (layered)      layers applied in order into a temporary tree
 *   microvm.image.CacheStore                  fsync + rename into place; ref recorded
 *
 * Concurrent pulls of one image (in any number of processes) extract it once: a per-digest lock,
 * re-checked after it is taken. A failed or aborted pull leaves nothing in the cache.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { context, type Span } from '@opentelemetry/api';
import type { ImageRuntimeConfig } from '../backends/types';
import { MicrovmError } from '../errors';
import { addon } from '../native';
import { withFileLock } from '../state';
import { ATTR, SPAN } from '../telemetry/attributes';
import { getTracer, inSpan, type SpanScope } from '../telemetry/tracer';
import * as v from '../validate';
import { type CacheEntry, paths, publish, readEntry, readRefs, setRef, sweepAbandoned, treeSummary } from './cache';
import { applyLayer, type ExtractLimits, type ExtractState } from './extract';
import { hostPlatform, type ImageConfigFile, type Platform } from './oci';
import { parseReference } from './reference';
import type { RegistryCredentials } from './registry';
import { type ResolvedImage, resolveArchive, resolveOciLayout } from './source';

/** Progress of a pull, per layer. */
export interface PullProgress {
  layer: number;
  layers: number;
  digest: string;
  /** Compressed bytes read so far / in total. */
  bytes: number;
  total: number;
}

/** Options of {@link pull}. */
export interface PullOptions {
  /** Cache directory (default `<dataDir>/images`). */
  cacheDir?: string;
  /** Platform to select from multi-platform images (linux + the host architecture). */
  platform?: Platform;
  /** Registries reached over plain HTTP besides loopback ones. */
  insecureRegistries?: string[];
  /** Registry credentials (default: Docker's config.json and credential helpers). Never logged. */
  credentials?: RegistryCredentials;
  limits?: ExtractLimits;
  /** 'full' re-walks a cached tree and compares it with its integrity summary ('fast'). */
  verify?: 'fast' | 'full';
  onProgress?: (p: PullProgress) => void;
  signal?: AbortSignal;
  /**
   * Deadline for each small registry document (manifest, token) to arrive whole, ms (60000): a
   * registry that drips bytes fails with ERR_MICROVM_REGISTRY_TIMEOUT instead of stalling the pull.
   */
  documentTimeoutMs?: number;
  /** Parent span scope (run() passes microvm.ImagePull's). */
  scope?: SpanScope;
}

/** A pulled image. */
export interface PullResult {
  /** The unpacked root filesystem (shared: never modify it). */
  path: string;
  /** Manifest digest. */
  digest: string;
  config: ImageConfigFile;
  fromCache: boolean;
  reference: string;
  warnings: string[];
}

async function resolveSource(
  ref: ReturnType<typeof parseReference>,
  platform: Platform,
  options: PullOptions,
): Promise<ResolvedImage> {
  if (ref.kind === 'oci-layout') return resolveOciLayout(ref.path, ref.tag, platform);
  if (ref.kind === 'oci-archive' || ref.kind === 'docker-archive') {
    const scratchDir = path.join(
      options.cacheDir as string,
      'tmp',
      `a-${process.pid}-${randomBytes(4).toString('hex')}`,
    );
    return resolveArchive(ref.kind, ref.path, ref.tag, platform, scratchDir);
  }
  const { resolveRegistryImage } = await import('./registry');
  return resolveRegistryImage(ref, platform, {
    insecureRegistries: options.insecureRegistries,
    credentials: options.credentials,
    signal: options.signal,
    documentTimeoutMs: options.documentTimeoutMs,
    blobDir: path.join(options.cacheDir as string, 'blobs'),
  });
}

/** Pulls `reference` into the cache (or finds it there). */
export async function pull(reference: string, options: PullOptions & { cacheDir: string }): Promise<PullResult> {
  const o = v.object('options', options);
  v.knownKeys('options', o, [
    'cacheDir',
    'platform',
    'insecureRegistries',
    'credentials',
    'limits',
    'verify',
    'onProgress',
    'signal',
    'scope',
    'documentTimeoutMs',
  ]);
  if (o.documentTimeoutMs !== undefined) v.integer('documentTimeoutMs', o.documentTimeoutMs, 1, 3_600_000);
  const cacheDir = v.absolutePath('cacheDir', o.cacheDir);
  const ref = parseReference(reference);
  const platform = options.platform ?? hostPlatform();
  const verify = options.verify ?? 'fast';
  const scope = options.scope ?? { tracer: getTracer(), ctx: context.active() };
  // One reference can name different images per platform: the index key includes it.
  const refKey = `${ref.canonical}#${platform.os}/${platform.architecture}${platform.variant ? `/${platform.variant}` : ''}`;
  const signal = options.signal;
  signal?.throwIfAborted();

  const hit = await inSpan(scope, SPAN.IMAGE_CACHE_LOOKUP, { [ATTR.IMAGE]: ref.canonical }, (span) => {
    const digest = ref.kind === 'registry' && ref.digest ? ref.digest : readRefs(cacheDir)[refKey]?.digest;
    const entry = digest ? readEntry(cacheDir, digest, verify) : undefined;
    span.setAttribute(ATTR.IMAGE_CACHE_HIT, !!entry);
    if (entry) span.setAttribute(ATTR.IMAGE_DIGEST, entry.digest);
    return entry;
  });
  if (hit)
    return {
      path: paths(cacheDir, hit.digest).rootfs,
      digest: hit.digest,
      config: hit.config,
      fromCache: true,
      reference: ref.canonical,
      warnings: [],
    };

  const image = await inSpan(scope, SPAN.IMAGE_FETCH, { [ATTR.IMAGE]: ref.canonical }, async (span) => {
    const r = await resolveSource(ref, platform, options);
    span.setAttribute(ATTR.IMAGE_DIGEST, r.digest);
    span.setAttribute('microvm.image.layers', r.manifest.layers.length);
    span.setAttribute(
      'microvm.image.bytes',
      r.manifest.layers.reduce((n, l) => n + (l.size ?? 0), 0),
    );
    return r;
  });

  try {
    return await store(cacheDir, ref.canonical, refKey, image, options, verify, scope, signal);
  } finally {
    image.close?.();
  }
}

async function store(
  cacheDir: string,
  canonical: string,
  refKey: string,
  image: ResolvedImage,
  options: PullOptions,
  verify: 'fast' | 'full',
  scope: SpanScope,
  signal: AbortSignal | undefined,
): Promise<PullResult> {
  // Synchronous on purpose: a few cheap calls, and the thread pool's round trips cost 10-20 ms
  // here while a download is starting (measured).
  // Image trees keep their set-ID files (a guest's sudo needs them); no other host user may reach
  // them, so the tree's root is the caller's alone (0700), also for caches made before this rule.
  fs.mkdirSync(paths(cacheDir).images, { recursive: true, mode: 0o700 });
  if (fs.statSync(paths(cacheDir).images).mode & 0o077) fs.chmodSync(paths(cacheDir).images, 0o700);
  fs.mkdirSync(paths(cacheDir).tmp, { recursive: true, mode: 0o700 });
  // Each extraction then starts in a block group of its own (ext4's Orlov allocator treats
  // subdirectories of a "top" directory like those of /): not in the group where earlier
  // extractions were just deleted, whose freed inodes a journal-less ext4 skips one by one for
  // every new file (measured here: a cold pull right after three extracted trees were deleted
  // took 0.59-0.62 s, 0.27-0.33 s with the attribute). Elsewhere it is a no-op.
  addon().markTopDirectory(paths(cacheDir).tmp);
  const p = paths(cacheDir, image.digest);
  let warnings: string[] = [];
  const entry = await withFileLock(p.lock, async () => {
    // Someone else may have extracted it while we waited (or under another reference).
    const existing = readEntry(cacheDir, image.digest, verify);
    if (existing) return { entry: existing, extracted: false };
    const staged = path.join(paths(cacheDir).tmp, `x-${process.pid}-${randomBytes(4).toString('hex')}`);
    const rootfs = path.join(staged, 'rootfs');
    try {
      fs.mkdirSync(rootfs, { recursive: true, mode: 0o755 });
      const state: ExtractState = { bytes: 0, entries: 0, warnings: [] };
      await inSpan(
        scope,
        SPAN.IMAGE_EXTRACT,
        {
          [ATTR.IMAGE_LAYERED]: image.manifest.layers.length > 1,
          'microvm.image.layers': image.manifest.layers.length,
        },
        async (span: Span) => {
          const layers = image.manifest.layers;
          for (let i = 0; i < layers.length; i++) {
            signal?.throwIfAborted();
            const d = layers[i];
            const blob = await image.openBlob(d, signal);
            const onBytes = options.onProgress
              ? (read: number) =>
                  options.onProgress?.({
                    layer: i + 1,
                    layers: layers.length,
                    digest: d.digest,
                    bytes: read,
                    total: d.size,
                  })
              : undefined;
            await applyLayer(rootfs, blob, { mediaType: d.mediaType, limits: options.limits, state, signal, onBytes });
          }
          span.setAttribute('microvm.image.entries', state.entries);
          span.setAttribute('microvm.image.uncompressed_bytes', state.bytes);
        },
      );
      warnings = state.warnings;
      return await inSpan(scope, SPAN.IMAGE_CACHE_STORE, { [ATTR.IMAGE_DIGEST]: image.digest }, async () => {
        const config = await image.config; // a registry's downloads while the layers extract
        const e: CacheEntry = {
          digest: image.digest,
          reference: canonical,
          manifest: image.manifest,
          config,
          createdAt: new Date().toISOString(),
          tree: treeSummary(rootfs),
        };
        publish(cacheDir, staged, e);
        return { entry: e, extracted: true };
      });
    } catch (err) {
      await fsp.rm(staged, { recursive: true, force: true });
      throw err;
    }
  });
  await setRef(cacheDir, refKey, image.digest);
  // What pulls killed mid-way left (their trees can be gigabytes): gone once a pull got through.
  if (entry.extracted) await sweepAbandoned(cacheDir);
  return {
    path: p.rootfs,
    digest: image.digest,
    config: entry.entry.config,
    fromCache: !entry.extracted,
    reference: canonical,
    warnings,
  };
}

/** The runtime config run() needs from an image config file. */
export function runtimeConfig(config: ImageConfigFile): ImageRuntimeConfig {
  const c = config.config ?? {};
  return { entrypoint: c.Entrypoint ?? [], cmd: c.Cmd ?? [], env: c.Env ?? [], workingDir: c.WorkingDir ?? '' };
}

/** The result of the image stage: an unpacked root tree and its runtime config. */
export interface PulledImage {
  rootfsDir: string;
  config: ImageRuntimeConfig;
  source: 'rootfsPath' | 'pull';
}

export const EMPTY_IMAGE_CONFIG: ImageRuntimeConfig = { entrypoint: [], cmd: [], env: [], workingDir: '' };

/** A given rootfsPath as the image stage's result. */
export function localRootfs(
  rootfsPath: string,
  config: Partial<ImageRuntimeConfig> | undefined,
  span: Span,
): PulledImage {
  let st: fs.Stats;
  try {
    st = fs.statSync(rootfsPath);
  } catch (err) {
    throw new MicrovmError('ERR_MICROVM_ROOTFS_NOT_FOUND', `rootfsPath ${rootfsPath} does not exist`, { cause: err });
  }
  if (!st.isDirectory())
    throw new MicrovmError('ERR_MICROVM_ROOTFS_NOT_FOUND', `rootfsPath ${rootfsPath} is not a directory`);
  span.setAttribute(ATTR.IMAGE_SOURCE, 'rootfsPath');
  return { rootfsDir: rootfsPath, config: { ...EMPTY_IMAGE_CONFIG, ...config }, source: 'rootfsPath' };
}
