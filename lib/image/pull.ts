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
import { defaultCacheDir } from '../paths';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { context, type Span } from '@opentelemetry/api';
import type { ImageRuntimeConfig } from '../backends/types';
import { asNoSpace, MicrovmError } from '../errors';
import { addon } from '../native';
import { withFileLock } from '../state';
import { ATTR, SPAN } from '../telemetry/attributes';
import { getTracer, inSpan, type SpanScope } from '../telemetry/tracer';
import * as v from '../validate';
import {
  type CacheEntry,
  enforceCap,
  paths,
  publish,
  readEntry,
  readRefs,
  setRef,
  sweepAbandoned,
  touchEntry,
  treeSummary,
} from './cache';
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
  /** Cache directory (default `<dataRoot>/cache`: $MICROVM_DATA_DIR or ~/.local/share/node-microvm). */
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
  /**
   * Minimum download rate of a registry blob while it is read: fewer than `minBytesPerSecond`
   * (1024) on average over any `windowMs` (30000) is ERR_MICROVM_REGISTRY_TIMEOUT.
   */
  throughput?: { minBytesPerSecond?: number; windowMs?: number };
  /**
   * When to ask the source what a tag names now. 'always' (pull()'s default): every pull resolves
   * the tag (one manifest request, or the layout's index) and a moved tag gets its new image;
   * 'missing' (run()'s default): a tag already in the cache is used without asking; 'never': only
   * the cache, ERR_MICROVM_IMAGE_NOT_CACHED otherwise. A digest reference is immutable: served
   * from the cache whenever it is there.
   */
  policy?: PullPolicy;
  /**
   * Cap on the cache's size in bytes (extracted trees plus kept downloads): after a pull, the least
   * recently used images (never the one just pulled, nor one a live VM runs on) are removed until
   * it fits. Default: no cap.
   */
  maxCacheBytes?: number;
  /** Parent span scope (run() passes microvm.ImagePull's). */
  scope?: SpanScope;
}

/** See {@link PullOptions.policy}. */
export type PullPolicy = 'always' | 'missing' | 'never';

/** Checks a pull policy option. */
export function parsePullPolicy(name: string, value: unknown): PullPolicy {
  if (value === 'always' || value === 'missing' || value === 'never') return value;
  throw v.rangeError(`Expected ${name} to be 'always', 'missing' or 'never' but received ${v.describe(value)}`);
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
  /** The digest the reference named before this pull, when the pull found that it had moved. */
  previousDigest?: string;
}

async function resolveSource(
  ref: ReturnType<typeof parseReference>,
  platform: Platform,
  options: PullOptions & { have?: (digest: string) => boolean; fetchScope?: SpanScope },
): Promise<ResolvedImage> {
  if (ref.kind === 'oci-layout') return resolveOciLayout(ref.path, ref.tag, platform);
  if (ref.kind === 'oci-archive' || ref.kind === 'docker-archive') {
    const scratchDir = path.join(
      options.cacheDir as string,
      'tmp',
      `a-${process.pid}-${randomBytes(4).toString('hex')}`,
    );
    return resolveArchive(ref.kind, ref.path, ref.tag, platform, scratchDir, options.signal);
  }
  const { resolveRegistryImage } = await import('./registry');
  return resolveRegistryImage(ref, platform, {
    insecureRegistries: options.insecureRegistries,
    credentials: options.credentials,
    signal: options.signal,
    documentTimeoutMs: options.documentTimeoutMs,
    throughput: options.throughput,
    blobDir: path.join(options.cacheDir as string, 'blobs'),
    have: options.have,
    scope: options.fetchScope,
  });
}

/** Pulls `reference` into the cache (or finds it there). */
export async function pull(reference: string, options: PullOptions = {}): Promise<PullResult> {
  return pullImage(reference, options).catch((err: unknown) => {
    throw asNoSpace(err, `pull ${reference}`);
  });
}

async function pullImage(reference: string, options: PullOptions): Promise<PullResult> {
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
    'policy',
    'maxCacheBytes',
    'throughput',
  ]);
  if (o.throughput !== undefined) {
    const t = v.object('throughput', o.throughput);
    v.knownKeys('throughput', t, ['minBytesPerSecond', 'windowMs']);
    if (t.minBytesPerSecond !== undefined) v.integer('throughput.minBytesPerSecond', t.minBytesPerSecond, 0, 2 ** 40);
    if (t.windowMs !== undefined) v.integer('throughput.windowMs', t.windowMs, 100, 3_600_000);
  }
  if (o.documentTimeoutMs !== undefined) v.integer('documentTimeoutMs', o.documentTimeoutMs, 1, 3_600_000);
  const policy = o.policy === undefined ? 'always' : parsePullPolicy('policy', o.policy);
  if (o.maxCacheBytes !== undefined) v.integer('maxCacheBytes', o.maxCacheBytes, 0, Number.MAX_SAFE_INTEGER);
  const cacheDir = o.cacheDir === undefined ? defaultCacheDir() : v.absolutePath('cacheDir', o.cacheDir);
  const ref = parseReference(reference);
  const platform = options.platform ?? hostPlatform();
  const verify = options.verify ?? 'fast';
  if (!options.scope) {
    // Called on its own: one root microvm.ImagePull (the caller's active span as its parent), so
    // the lookup, fetch, extract and store spans share a trace instead of being four roots.
    return inSpan(
      { tracer: getTracer(), ctx: context.active() },
      SPAN.IMAGE_PULL,
      { [ATTR.IMAGE_REF]: reference, [ATTR.IMAGE_SOURCE]: 'pull' },
      async (span, inner) => {
        const r = await pull(reference, { ...options, scope: inner });
        span.setAttribute(ATTR.IMAGE_DIGEST, r.digest);
        span.setAttribute(ATTR.IMAGE_FROM_CACHE, r.fromCache);
        return r;
      },
    );
  }
  const scope = options.scope;
  // One reference can name different images per platform: the index key includes it.
  const refKey = `${ref.canonical}#${platform.os}/${platform.architecture}${platform.variant ? `/${platform.variant}` : ''}`;
  const signal = options.signal;
  signal?.throwIfAborted();

  const pinned = ref.kind === 'registry' && ref.digest !== undefined;
  const hit = await inSpan(scope, SPAN.IMAGE_CACHE_LOOKUP, { [ATTR.IMAGE]: ref.canonical }, (span) => {
    const digest = pinned ? ref.digest : readRefs(cacheDir)[refKey]?.digest;
    const entry = digest ? readEntry(cacheDir, digest, verify) : undefined;
    // A tag is served from the cache without asking only under 'missing'/'never'.
    const use = entry && (pinned || policy !== 'always') ? entry : undefined;
    span.setAttribute(ATTR.IMAGE_CACHE_HIT, !!use);
    span.setAttribute('microvm.image.pull_policy', policy);
    if (entry) span.setAttribute(ATTR.IMAGE_DIGEST, entry.digest);
    return use;
  });
  // The size cap applies after every pull, a cached one included.
  const capped = async (r: PullResult): Promise<PullResult> => {
    if (o.maxCacheBytes !== undefined) await enforceCap(cacheDir, o.maxCacheBytes as number, r.digest);
    return r;
  };
  if (hit) {
    touchEntry(cacheDir, hit.digest);
    return capped({
      path: paths(cacheDir, hit.digest).rootfs,
      digest: hit.digest,
      config: hit.config,
      fromCache: true,
      reference: ref.canonical,
      warnings: [],
    });
  }
  if (policy === 'never')
    throw new MicrovmError(
      'ERR_MICROVM_IMAGE_NOT_CACHED',
      `${ref.canonical} is not in the image cache and the pull policy is 'never'; pull it first (\`microvm pull ${reference}\`) or use policy 'missing'`,
    );

  let known: CacheEntry | undefined; // the resolved image, when it is already unpacked
  const image = await inSpan(scope, SPAN.IMAGE_FETCH, { [ATTR.IMAGE]: ref.canonical }, async (span, fetchScope) => {
    const r = await resolveSource(ref, platform, {
      ...options,
      fetchScope,
      cacheDir,
      have: (digest) => (known = readEntry(cacheDir, digest, verify)) !== undefined,
    });
    span.setAttribute(ATTR.IMAGE_DIGEST, r.digest);
    span.setAttribute('microvm.image.layers', r.manifest.layers.length);
    span.setAttribute(
      'microvm.image.bytes',
      r.manifest.layers.reduce((n, l) => n + (l.size ?? 0), 0),
    );
    return r;
  });

  // A re-resolved tag naming an image already unpacked (under this or another reference).
  if (known?.digest !== image.digest) known = readEntry(cacheDir, image.digest, verify);
  if (known) {
    image.close?.();
    const previousDigest = await setRef(cacheDir, refKey, known.digest);
    touchEntry(cacheDir, known.digest);
    return capped({
      path: paths(cacheDir, known.digest).rootfs,
      digest: known.digest,
      config: known.config,
      fromCache: true,
      reference: ref.canonical,
      warnings: [],
      ...(previousDigest ? { previousDigest } : {}),
    });
  }
  let result: PullResult;
  try {
    result = await store(cacheDir, ref.canonical, refKey, image, options, verify, scope, signal);
  } finally {
    image.close?.();
  }
  return capped(result);
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
  const previousDigest = await setRef(cacheDir, refKey, image.digest);
  if (!entry.extracted) touchEntry(cacheDir, image.digest);
  // What pulls killed mid-way left (their trees can be gigabytes): gone once a pull got through.
  if (entry.extracted) await sweepAbandoned(cacheDir);
  return {
    path: p.rootfs,
    digest: image.digest,
    config: entry.entry.config,
    fromCache: !entry.extracted,
    reference: canonical,
    warnings,
    ...(previousDigest ? { previousDigest } : {}),
  };
}

/** The runtime config run() needs from an image config file. */
export function runtimeConfig(config: ImageConfigFile): ImageRuntimeConfig {
  const c = config.config ?? {};
  return {
    entrypoint: c.Entrypoint ?? [],
    cmd: c.Cmd ?? [],
    env: c.Env ?? [],
    workingDir: c.WorkingDir ?? '',
    ...(c.User ? { user: c.User } : {}),
  };
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
  span.setAttribute(ATTR.IMAGE_PREBUILT, true);
  return { rootfsDir: rootfsPath, config: { ...EMPTY_IMAGE_CONFIG, ...config }, source: 'rootfsPath' };
}
