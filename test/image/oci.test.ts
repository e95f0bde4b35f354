/** Manifest and index checks on hostile documents: every bad shape is a coded error, never a TypeError. */
import { checkManifest, selectPlatform } from '../../lib/image/oci';

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
