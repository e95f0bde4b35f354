/** Default locations. */
import * as path from 'node:path';
import { defaultCacheDir, defaultDataRoot, image } from '../lib';
import { scratch } from './helpers';

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-paths-');
});
afterEach(() => s.cleanup());

describe('default paths', () => {
  test('the data root: $MICROVM_DATA_DIR, else $XDG_DATA_HOME/node-microvm; the cache under it', () => {
    expect(defaultDataRoot({ MICROVM_DATA_DIR: '/x' })).toBe('/x');
    expect(defaultDataRoot({ XDG_DATA_HOME: '/xdg' })).toBe('/xdg/node-microvm');
    expect(defaultCacheDir(s.dir)).toBe(path.join(s.dir, 'cache'));
  });

  test('image.pull and image.list without cacheDir use <$MICROVM_DATA_DIR>/cache', async () => {
    const layout = process.env.MICROVM_TEST_LAYOUT;
    if (!layout) throw new Error('MICROVM_TEST_LAYOUT is not set (global setup builds it)');
    const old = process.env.MICROVM_DATA_DIR;
    process.env.MICROVM_DATA_DIR = s.dir;
    try {
      const r = await image.pull(`oci:${layout}:test`);
      expect(r.path.startsWith(path.join(s.dir, 'cache', 'images'))).toBe(true);
      expect(image.list().map((i) => i.digest)).toEqual([r.digest]);
    } finally {
      if (old === undefined) delete process.env.MICROVM_DATA_DIR;
      else process.env.MICROVM_DATA_DIR = old;
    }
  });
});
