/** Default locations, and the move of a pre-0.2 cache (`<dataDir>/images`) to `<dataDir>/cache`. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { defaultCacheDir, defaultDataRoot, image } from '../lib';
import { writeState } from '../lib/state';
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

  test('a legacy cache is moved whole when no VM runs; kept in place (and used) while one does', async () => {
    const legacy = path.join(s.dir, 'images');
    fs.mkdirSync(path.join(legacy, 'images', 'abc'), { recursive: true });
    fs.writeFileSync(path.join(legacy, 'refs.json'), '{}');
    // A running VM (this test's child process, recorded as the VM's process).
    const child = spawn('sleep', ['30']);
    try {
      const exe = fs.realpathSync(`/proc/${child.pid}/exe`);
      const st = fs.readFileSync(`/proc/${child.pid}/stat`, 'utf8');
      const start = st.slice(st.lastIndexOf(')') + 2).split(' ')[19];
      const vmDir = path.join(s.dir, 'vms', 'live');
      fs.mkdirSync(vmDir, { recursive: true });
      await writeState(vmDir, {
        id: 'i',
        name: 'live',
        backend: 'qemu',
        pid: child.pid as number,
        pidStartTime: start,
        executable: exe,
        image: 'x',
        cpus: 1,
        memoryMiB: 64,
        ports: [],
        rootfsPath: '/',
        cloneStrategy: 'copy',
        createdAt: new Date().toISOString(),
      });
      expect(defaultCacheDir(s.dir)).toBe(legacy);
      expect(fs.existsSync(path.join(legacy, 'images', 'abc'))).toBe(true);
    } finally {
      child.kill('SIGKILL');
      await new Promise((r) => child.once('exit', r));
    }
    expect(defaultCacheDir(s.dir)).toBe(path.join(s.dir, 'cache'));
    expect(fs.existsSync(path.join(s.dir, 'cache', 'images', 'abc'))).toBe(true);
    expect(fs.existsSync(legacy)).toBe(false);
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
