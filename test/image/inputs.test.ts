/**
 * Image inputs that never end or are not regular files are refused up front, without blocking and
 * without spinning: an archive that is /dev/zero, a FIFO or a directory; a layout whose index.json
 * or blob is one. And an archive's own errors name the user's file, not the scratch directory it was
 * unpacked into.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { listImages, pull } from '../../lib';
import { scratch } from '../helpers';

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-inputs-');
});
afterEach(() => s.cleanup());

const refuse = async (ref: string, what: RegExp): Promise<void> => {
  const cacheDir = path.join(s.dir, 'cache');
  await expect(pull(ref, { cacheDir })).rejects.toMatchObject({
    code: 'ERR_MICROVM_IMAGE_INPUT',
    message: expect.stringMatching(what),
  });
  expect(listImages(cacheDir)).toEqual([]);
};

test.each(['oci-archive', 'docker-archive'])(
  '%s: /dev/zero, a FIFO and a directory are refused at once',
  async (kind) => {
    const fifo = path.join(s.dir, 'fifo.tar');
    execFileSync('mkfifo', [fifo]);
    await refuse(`${kind}:/dev/zero`, /\/dev\/zero is a device, not a regular file/);
    await refuse(`${kind}:${fifo}`, /fifo\.tar is a FIFO, not a regular file/); // no writer: an open would block
    await refuse(`${kind}:${s.dir}`, /is a directory, not a regular file/);
  },
);

test('an OCI layout whose index.json or layer blob is a FIFO or a device is refused, not read', async () => {
  const layout = path.join(s.dir, 'layout');
  fs.mkdirSync(layout);
  execFileSync('mkfifo', [path.join(layout, 'index.json')]);
  await refuse(`oci:${layout}`, /index\.json is a FIFO/);
  // A well-formed index and manifest whose layer blob is /dev/zero (a symlink to it).
  fs.rmSync(path.join(layout, 'index.json'));
  const blobs = path.join(layout, 'blobs', 'sha256');
  fs.mkdirSync(blobs, { recursive: true });
  const put = (data: string): string => {
    const hex = createHash('sha256').update(data).digest('hex');
    fs.writeFileSync(path.join(blobs, hex), data);
    return `sha256:${hex}`;
  };
  const config = put(JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [] } }));
  const layer = `sha256:${'a'.repeat(64)}`;
  fs.symlinkSync('/dev/zero', path.join(blobs, 'a'.repeat(64)));
  const manifest = put(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: config, size: 1 },
      layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar', digest: layer, size: 1024 }],
    }),
  );
  fs.writeFileSync(
    path.join(layout, 'index.json'),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{ mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: manifest, size: 1 }],
    }),
  );
  await refuse(`oci:${layout}`, /layer.* is a device, not a regular file/);
});

test("an archive that is not one: the error names the user's file, not the scratch directory", async () => {
  const bad = path.join(s.dir, 'not-a.tar');
  fs.writeFileSync(bad, Buffer.alloc(4096, 0x41));
  const err = (await pull(`oci-archive:${bad}`, { cacheDir: path.join(s.dir, 'cache') }).catch(
    (e: unknown) => e,
  )) as Error;
  expect(err).toMatchObject({ code: expect.stringMatching(/^ERR_MICROVM_IMAGE_/) });
  expect(err.message).toContain(bad);
  expect(err.message).not.toContain(path.join(s.dir, 'cache', 'tmp'));
});
