/** Manifest and index checks on hostile documents: every bad shape is a coded error, never a TypeError. */
import { createHash } from 'node:crypto';
import { MicrovmError } from '../../lib/errors';
import {
  checkManifest,
  type Descriptor,
  hostPlatform,
  isIndex,
  markVerifying,
  MEDIA,
  parseJson,
  type Platform,
  selectPlatform,
  sha256,
  verifiesDigest,
  verifyDigest,
  VERIFIES_DIGEST,
} from '../../lib/image/oci';

const digest = `sha256:${'a'.repeat(64)}`;
const platform = { os: 'linux', architecture: 'amd64' };

describe('index and manifest checks', () => {
  test('an index without a manifests list (or with junk in it) is ERR_MICROVM_IMAGE_MANIFEST', () => {
    for (const index of [{}, { manifests: 'no' }, { manifests: [null] }, { manifests: [{ size: 1 }] }]) {
      expect(() => selectPlatform(index as never, platform, 'img')).toThrow(
        expect.objectContaining({ code: 'ERR_MICROVM_IMAGE_MANIFEST' }),
      );
    }
    const ok = { manifests: [{ digest, size: 10, mediaType: 'x', platform }] };
    expect(selectPlatform(ok as never, platform, 'img').digest).toBe(digest);
  });

  test('negative, fractional or huge sizes are refused in manifests and indexes', () => {
    for (const size of [-5, 1.5, 1e300, '10']) {
      const m = { config: { digest, size: 2 }, layers: [{ digest, size }] };
      expect(() => checkManifest(m as never, 'img')).toThrow(
        expect.objectContaining({ code: 'ERR_MICROVM_IMAGE_MANIFEST', message: expect.stringContaining('bad size') }),
      );
      expect(() => selectPlatform({ manifests: [{ digest, size, platform }] } as never, platform, 'img')).toThrow(
        expect.objectContaining({ code: 'ERR_MICROVM_IMAGE_MANIFEST' }),
      );
    }
    expect(checkManifest({ config: { digest, size: 2 }, layers: [{ digest, size: 0 }] }, 'img').layers).toHaveLength(1);
  });
});

describe('digests, media types, platforms (exact values)', () => {
  test('sha256 of a buffer; verifyDigest: sha256 and sha512 accepted, a mismatch and other algorithms refused with the exact message', () => {
    const data = Buffer.from('hello\n');
    expect(sha256(data)).toBe('sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03');
    expect(() => verifyDigest(data, sha256(data), 'blob')).not.toThrow();
    const s512 = `sha512:${createHash('sha512').update(data).digest('hex')}`;
    expect(() => verifyDigest(data, s512, 'blob')).not.toThrow();
    expect(() => verifyDigest(data, `sha256:${'0'.repeat(64)}`, 'layer 1')).toThrow(
      new MicrovmError(
        'ERR_MICROVM_IMAGE_DIGEST',
        `layer 1: digest mismatch (expected sha256:${'0'.repeat(64)}, got ${sha256(data)})`,
      ),
    );
    expect(() => verifyDigest(data, 'md5:abc', 'cfg')).toThrow(
      expect.objectContaining({ code: 'ERR_MICROVM_IMAGE_DIGEST', message: 'cfg: unsupported digest algorithm md5' }),
    );
  });

  test('the digest mark: set by markVerifying only', () => {
    const s = {};
    expect(verifiesDigest(s)).toBe(false);
    expect(markVerifying(s)).toBe(s);
    expect(verifiesDigest(s)).toBe(true);
    expect(verifiesDigest({ [VERIFIES_DIGEST]: 'yes' })).toBe(false);
  });

  test('hostPlatform: linux and the OCI name of this architecture', () => {
    const want: Record<string, Platform> = {
      x64: { os: 'linux', architecture: 'amd64' },
      arm64: { os: 'linux', architecture: 'arm64', variant: 'v8' },
    };
    expect(hostPlatform()).toEqual(want[process.arch] ?? { os: 'linux', architecture: process.arch });
    const table = ['x64', 'arm64', 'arm', 'ia32', 'ppc64', 's390x', 'riscv64', 'mips'].map((a) => hostPlatform(a));
    expect(table).toEqual([
      { os: 'linux', architecture: 'amd64' },
      { os: 'linux', architecture: 'arm64', variant: 'v8' },
      { os: 'linux', architecture: 'arm' },
      { os: 'linux', architecture: '386' },
      { os: 'linux', architecture: 'ppc64le' },
      { os: 'linux', architecture: 's390x' },
      { os: 'linux', architecture: 'riscv64' },
      { os: 'linux', architecture: 'mips' },
    ]);
  });

  test('isIndex: by media type (given or in the document), else by a manifests array', () => {
    expect(isIndex({ mediaType: MEDIA.OCI_INDEX })).toBe(true);
    expect(isIndex({ mediaType: MEDIA.DOCKER_LIST })).toBe(true);
    expect(isIndex({ mediaType: MEDIA.OCI_MANIFEST, manifests: [] })).toBe(false);
    expect(isIndex({}, MEDIA.DOCKER_LIST)).toBe(true);
    expect(isIndex({ mediaType: MEDIA.OCI_INDEX }, MEDIA.DOCKER_MANIFEST)).toBe(false); // the header wins
    expect(isIndex({ manifests: [] })).toBe(true);
    expect(isIndex({ manifests: 'x' })).toBe(false);
    expect(isIndex({})).toBe(false);
    expect(MEDIA).toEqual({
      OCI_INDEX: 'application/vnd.oci.image.index.v1+json',
      OCI_MANIFEST: 'application/vnd.oci.image.manifest.v1+json',
      DOCKER_LIST: 'application/vnd.docker.distribution.manifest.list.v2+json',
      DOCKER_MANIFEST: 'application/vnd.docker.distribution.manifest.v2+json',
    });
  });

  const d = (n: string, p?: Descriptor['platform']): Descriptor => ({
    digest: `sha256:${n.repeat(64)}`,
    size: 1,
    platform: p,
  });
  test('selectPlatform: os and architecture must match; a variant only when both sides name one; the first match wins', () => {
    const index = {
      manifests: [
        d('1', { os: 'windows', architecture: 'amd64' }),
        d('2', { os: 'linux', architecture: 'arm64', variant: 'v7' }),
        d('3', { os: 'linux', architecture: 'arm64', variant: 'v8' }),
        d('4', { os: 'linux', architecture: 'amd64' }),
        d('5', { os: 'linux', architecture: 'amd64' }),
        d('6'),
      ],
    };
    expect(selectPlatform(index, { os: 'linux', architecture: 'amd64' }, 'i').digest).toBe(d('4').digest);
    expect(selectPlatform(index, { os: 'linux', architecture: 'arm64', variant: 'v8' }, 'i').digest).toBe(
      d('3').digest,
    );
    expect(selectPlatform(index, { os: 'linux', architecture: 'arm64' }, 'i').digest).toBe(d('2').digest);
    const noVariant = { manifests: [d('7', { os: 'linux', architecture: 'arm64' })] };
    expect(selectPlatform(noVariant, { os: 'linux', architecture: 'arm64', variant: 'v8' }, 'i').digest).toBe(
      d('7').digest,
    );
    expect(() => selectPlatform(index, { os: 'linux', architecture: 'arm64', variant: 'v6' }, 'img:1')).toThrow(
      new MicrovmError(
        'ERR_MICROVM_IMAGE_PLATFORM',
        'img:1 has no image for linux/arm64/v6; available: windows/amd64, linux/arm64/v7, linux/arm64/v8, linux/amd64, linux/amd64, (no platform)',
      ),
    );
    expect(() => selectPlatform({ manifests: [] }, { os: 'linux', architecture: 'amd64' }, 'e')).toThrow(
      new MicrovmError('ERR_MICROVM_IMAGE_PLATFORM', 'e has no image for linux/amd64; available: none'),
    );
    expect(() =>
      selectPlatform({ manifests: [d('8', { architecture: 'amd64' })] }, { os: 'linux', architecture: 'amd64' }, 'e'),
    ).toThrow(expect.objectContaining({ code: 'ERR_MICROVM_IMAGE_PLATFORM' }));
    expect(() => selectPlatform({ manifests: [{ digest: 5 }] } as never, platform, 'x')).toThrow(
      new MicrovmError('ERR_MICROVM_IMAGE_MANIFEST', 'x is an index without a valid "manifests" list'),
    );
    expect(() => selectPlatform({ manifests: [d('9', platform), null] } as never, platform, 'x')).toThrow(
      expect.objectContaining({ code: 'ERR_MICROVM_IMAGE_MANIFEST' }),
    );
  });

  test('parseJson: the value, or ERR_MICROVM_IMAGE_MANIFEST naming the document, with the cause', () => {
    expect(parseJson(Buffer.from('{"a":[1]}'), 'm')).toEqual({ a: [1] });
    const err = (() => {
      try {
        parseJson(Buffer.from('{'), 'the manifest');
      } catch (e) {
        return e as MicrovmError;
      }
      return undefined;
    })();
    expect(err).toMatchObject({ code: 'ERR_MICROVM_IMAGE_MANIFEST', message: 'the manifest is not valid JSON' });
    expect(err?.cause).toBeInstanceOf(SyntaxError);
  });

  test('checkManifest: every malformed shape, bad digests and sizes, with exact messages', () => {
    const good = { config: { digest, size: 2 }, layers: [{ digest, size: 3 }] };
    expect(checkManifest(good, 'm')).toBe(good);
    expect(checkManifest({ config: { digest }, layers: [] } as never, 'm').layers).toEqual([]); // size optional
    for (const bad of [
      null,
      'str',
      {},
      { config: null, layers: [] },
      { config: { digest: 1 }, layers: [] },
      { config: { digest }, layers: 'x' },
      { config: { digest }, layers: [{ digest }, null] },
      { config: { digest }, layers: [{}] },
    ]) {
      expect(() => checkManifest(bad as never, 'm1')).toThrow(
        new MicrovmError('ERR_MICROVM_IMAGE_MANIFEST', 'm1 is not an image manifest'),
      );
    }
    for (const bad of [
      'sha256:abc',
      `sha256:${'A'.repeat(64)}`,
      `sha384:${'a'.repeat(96)}`,
      `x${digest}`,
      `${digest}x`,
    ]) {
      expect(() => checkManifest({ config: { digest: bad, size: 1 }, layers: [] }, 'm2')).toThrow(
        new MicrovmError('ERR_MICROVM_IMAGE_MANIFEST', `m2 has a bad digest ${JSON.stringify(bad)}`),
      );
      expect(() => checkManifest({ config: { digest, size: 1 }, layers: [{ digest: bad }] } as never, 'm2')).toThrow(
        new MicrovmError('ERR_MICROVM_IMAGE_MANIFEST', `m2 has a bad digest ${JSON.stringify(bad)}`),
      );
    }
    expect(
      checkManifest({ config: { digest: `sha512:${'f'.repeat(128)}` }, layers: [] } as never, 'm').config.digest,
    ).toBe(`sha512:${'f'.repeat(128)}`);
    expect(() => checkManifest({ config: { digest, size: -1 }, layers: [] }, 'm3')).toThrow(
      new MicrovmError('ERR_MICROVM_IMAGE_MANIFEST', `m3: descriptor ${digest} has a bad size -1`),
    );
  });
});
