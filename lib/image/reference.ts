/**
 * Image references: registry references with Docker's defaults (`busybox` is
 * `docker.io/library/busybox:latest`), registries with ports, digests, and local sources for
 * offline use: `oci:PATH[:TAG]` (an OCI image layout directory).
 */
import * as path from 'node:path';
import * as v from '../validate';

/** A parsed reference. */
export type ImageReference =
  | { kind: 'registry'; registry: string; repository: string; tag?: string; digest?: string; canonical: string }
  | { kind: 'oci-layout'; path: string; tag?: string; canonical: string }
  | { kind: 'oci-archive'; path: string; tag?: string; canonical: string }
  | { kind: 'docker-archive'; path: string; tag?: string; canonical: string };

const COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const TAG = /^[\w][\w.-]{0,127}$/;
const DIGEST = /^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$/;
const DOMAIN =
  /^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*(?::[0-9]{1,5})?$|^\[[0-9a-fA-F:]+\](?::[0-9]{1,5})?$/;

/** A reference that does not parse: a TypeError with Node's `ERR_INVALID_ARG_VALUE`. */
function invalid(ref: string, why: string): TypeError & { code: 'ERR_INVALID_ARG_VALUE' } {
  return Object.assign(new TypeError(`Invalid image reference ${JSON.stringify(ref.slice(0, 200))}: ${why}`), {
    code: 'ERR_INVALID_ARG_VALUE' as const,
  });
}

/** Parses `ref`; throws TypeError naming the reference and what is wrong. */
export function parseReference(ref: string): ImageReference {
  if (typeof ref !== 'string' || ref.length === 0 || ref.includes('\0'))
    throw v.typeError(`Invalid image reference ${v.describe(ref)}: expected a non-empty string`);
  if (ref.startsWith('oci:')) {
    let p = ref.slice(4);
    let tag: string | undefined;
    const colon = p.lastIndexOf(':');
    if (colon > 0 && !p.slice(colon + 1).includes('/')) {
      tag = p.slice(colon + 1);
      p = p.slice(0, colon);
      if (!TAG.test(tag)) throw invalid(ref, `bad tag ${JSON.stringify(tag)}`);
    }
    if (!p) throw invalid(ref, 'empty layout path');
    const abs = path.resolve(p);
    return { kind: 'oci-layout', path: abs, tag, canonical: `oci:${abs}${tag ? `:${tag}` : ''}` };
  }
  for (const kind of ['oci-archive', 'docker-archive'] as const) {
    if (!ref.startsWith(`${kind}:`)) continue;
    let p = ref.slice(kind.length + 1);
    let tag: string | undefined;
    if (kind === 'oci-archive') {
      // oci-archive:FILE[:TAG]
      const colon = p.lastIndexOf(':');
      if (colon > 0 && TAG.test(p.slice(colon + 1))) {
        tag = p.slice(colon + 1);
        p = p.slice(0, colon);
      }
    } else {
      // docker-archive:FILE[:REPO:TAG] — FILE ends in .tar (or .tar.gz)
      const m = /^(.*?\.tar(?:\.gz)?):(.+)$/.exec(p);
      if (m) {
        p = m[1];
        tag = m[2];
      }
    }
    if (!p) throw invalid(ref, 'empty archive path');
    const abs = path.resolve(p);
    return { kind, path: abs, tag, canonical: `${kind}:${abs}${tag ? `:${tag}` : ''}` };
  }
  let rest = ref;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST.test(digest)) throw invalid(ref, `bad digest ${JSON.stringify(digest)}`);
  }
  let tag: string | undefined;
  const slash = rest.lastIndexOf('/');
  const colon = rest.lastIndexOf(':');
  if (colon > slash) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!TAG.test(tag)) throw invalid(ref, `bad tag ${JSON.stringify(tag)}`);
  }
  const parts = rest.split('/');
  let registry = 'docker.io';
  if (
    parts.length > 1 &&
    (parts[0].includes('.') || parts[0].includes(':') || parts[0] === 'localhost' || parts[0].startsWith('['))
  ) {
    registry = parts.shift() as string;
    if (!DOMAIN.test(registry)) throw invalid(ref, `bad registry ${JSON.stringify(registry)}`);
  }
  if (registry === 'index.docker.io' || registry === 'registry-1.docker.io') registry = 'docker.io';
  if (parts.length === 0 || parts.some((c) => !COMPONENT.test(c)))
    throw invalid(ref, 'repository must be lowercase path components ([a-z0-9] with . _ __ - separators)');
  if (registry === 'docker.io' && parts.length === 1) parts.unshift('library');
  const repository = parts.join('/');
  if (repository.length > 255) throw invalid(ref, 'repository name too long');
  if (!tag && !digest) tag = 'latest';
  const canonical = `${registry}/${repository}${tag ? `:${tag}` : ''}${digest ? `@${digest}` : ''}`;
  return { kind: 'registry', registry, repository, tag, digest, canonical };
}
