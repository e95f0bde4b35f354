/**
 * OCI / Docker schema 2 manifests and indexes: parsing, platform selection, digests.
 */
import { createHash } from 'node:crypto';
import { MicrovmError } from '../errors';

export const MEDIA = {
  OCI_INDEX: 'application/vnd.oci.image.index.v1+json',
  OCI_MANIFEST: 'application/vnd.oci.image.manifest.v1+json',
  DOCKER_LIST: 'application/vnd.docker.distribution.manifest.list.v2+json',
  DOCKER_MANIFEST: 'application/vnd.docker.distribution.manifest.v2+json',
} as const;

/**
 * Marks a stream that errors (instead of ending) unless its bytes match their descriptor's digest
 * and size. Consumers that discard everything on an error may then skip weaker checks of the same
 * bytes (the extractor skips gzip's trailer: CRC-32 and length).
 */
export const VERIFIES_DIGEST: unique symbol = Symbol('microvm.verifiesDigest');

/** Whether `stream` carries the VERIFIES_DIGEST mark. */
export function verifiesDigest(stream: object): boolean {
  return (stream as { [VERIFIES_DIGEST]?: boolean })[VERIFIES_DIGEST] === true;
}

/** Sets the VERIFIES_DIGEST mark on `stream` and returns it. */
export function markVerifying<T extends object>(stream: T): T {
  (stream as { [VERIFIES_DIGEST]?: boolean })[VERIFIES_DIGEST] = true;
  return stream;
}

export interface Descriptor {
  mediaType?: string;
  digest: string;
  size: number;
  platform?: { os?: string; architecture?: string; variant?: string };
  annotations?: Record<string, string>;
}

export interface ImageManifest {
  mediaType?: string;
  config: Descriptor;
  layers: Descriptor[];
}

export interface ImageIndex {
  mediaType?: string;
  manifests: Descriptor[];
}

/** The parts of an image config run() uses. */
export interface ImageConfigFile {
  architecture?: string;
  os?: string;
  config?: {
    Entrypoint?: string[] | null;
    Cmd?: string[] | null;
    Env?: string[] | null;
    WorkingDir?: string;
    User?: string;
  };
}

/** A platform to select from an index. */
export interface Platform {
  os: string;
  architecture: string;
  variant?: string;
}

/** linux + this Node's architecture (or `arch`, a `process.arch` value) in OCI terms. */
export function hostPlatform(arch: string = process.arch): Platform {
  const names: Record<string, string> = {
    x64: 'amd64',
    arm64: 'arm64',
    arm: 'arm',
    ia32: '386',
    ppc64: 'ppc64le',
    s390x: 's390x',
    riscv64: 'riscv64',
  };
  return {
    os: 'linux',
    architecture: names[arch] ?? arch,
    ...(arch === 'arm64' ? { variant: 'v8' } : {}),
  };
}

/** sha256 digest string of a buffer. */
export function sha256(data: Buffer): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

/** Throws ERR_MICROVM_IMAGE_DIGEST when `data` does not hash to `digest`. */
export function verifyDigest(data: Buffer, digest: string, what: string): void {
  const [alg] = digest.split(':');
  if (alg !== 'sha256' && alg !== 'sha512')
    throw new MicrovmError('ERR_MICROVM_IMAGE_DIGEST', `${what}: unsupported digest algorithm ${alg}`);
  const got = `${alg}:${createHash(alg).update(data).digest('hex')}`;
  if (got !== digest)
    throw new MicrovmError('ERR_MICROVM_IMAGE_DIGEST', `${what}: digest mismatch (expected ${digest}, got ${got})`);
}

export function isIndex(doc: { mediaType?: string; manifests?: unknown }, mediaType?: string): boolean {
  const mt = mediaType ?? doc.mediaType;
  return mt === MEDIA.OCI_INDEX || mt === MEDIA.DOCKER_LIST || (mt === undefined && Array.isArray(doc.manifests));
}

/** Picks the manifest for `platform` from an index; ERR_MICROVM_IMAGE_PLATFORM lists what exists. */
export function selectPlatform(index: ImageIndex, platform: Platform, what: string): Descriptor {
  if (
    !Array.isArray(index.manifests) ||
    index.manifests.some((d) => !d || typeof d !== 'object' || typeof d.digest !== 'string')
  ) {
    throw new MicrovmError('ERR_MICROVM_IMAGE_MANIFEST', `${what} is an index without a valid "manifests" list`);
  }
  for (const d of index.manifests) checkSize(d, what);
  const candidates = index.manifests.filter(
    (d) => d.platform && d.platform.os === platform.os && d.platform.architecture === platform.architecture,
  );
  const exact = candidates.find(
    (d) => !platform.variant || !d.platform?.variant || d.platform.variant === platform.variant,
  );
  if (exact) return exact;
  const available = index.manifests.map((d) =>
    d.platform
      ? `${d.platform.os}/${d.platform.architecture}${d.platform.variant ? `/${d.platform.variant}` : ''}`
      : '(no platform)',
  );
  throw new MicrovmError(
    'ERR_MICROVM_IMAGE_PLATFORM',
    `${what} has no image for ${platform.os}/${platform.architecture}${platform.variant ? `/${platform.variant}` : ''}; available: ${available.join(', ') || 'none'}`,
  );
}

/** Parses a JSON document, throwing ERR_MICROVM_IMAGE_MANIFEST with `what` on failure. */
export function parseJson<T>(data: Buffer, what: string): T {
  try {
    return JSON.parse(data.toString('utf8')) as T;
  } catch (err) {
    throw new MicrovmError('ERR_MICROVM_IMAGE_MANIFEST', `${what} is not valid JSON`, { cause: err });
  }
}

/** A descriptor's size, when given, is a whole number of bytes (hostile input: no -5, no 1e300). */
function checkSize(d: { size?: unknown; digest: string }, what: string): void {
  if (d.size !== undefined && !(Number.isSafeInteger(d.size) && (d.size as number) >= 0)) {
    throw new MicrovmError(
      'ERR_MICROVM_IMAGE_MANIFEST',
      `${what}: descriptor ${d.digest} has a bad size ${JSON.stringify(d.size)}`,
    );
  }
}

export function checkManifest(m: ImageManifest, what: string): ImageManifest {
  if (
    !m ||
    typeof m !== 'object' ||
    !m.config ||
    typeof m.config.digest !== 'string' ||
    !Array.isArray(m.layers) ||
    m.layers.some((l) => typeof l?.digest !== 'string')
  ) {
    throw new MicrovmError('ERR_MICROVM_IMAGE_MANIFEST', `${what} is not an image manifest`);
  }
  for (const d of [m.config, ...m.layers]) {
    if (!/^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$/.test(d.digest))
      throw new MicrovmError('ERR_MICROVM_IMAGE_MANIFEST', `${what} has a bad digest ${JSON.stringify(d.digest)}`);
    checkSize(d, what);
  }
  return m;
}
