/** cloneRootfs on real trees: both copy engines keep contents, modes, symlinks and hardlinks. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { cloneRootfs } from '../lib';
import { scratch } from './helpers';

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-clone-');
});
afterEach(() => s.cleanup());

function tree(): string {
  const src = path.join(s.dir, 'src');
  fs.mkdirSync(path.join(src, 'usr', 'bin'), { recursive: true });
  fs.mkdirSync(path.join(src, 'root'), { mode: 0o700 });
  fs.writeFileSync(path.join(src, 'usr', 'bin', 'tool'), 'binary', { mode: 0o4755 });
  fs.chmodSync(path.join(src, 'usr', 'bin', 'tool'), 0o4755);
  fs.symlinkSync('/usr/bin/tool', path.join(src, 'usr', 'bin', 'abs-link'));
  fs.linkSync(path.join(src, 'usr', 'bin', 'tool'), path.join(src, 'usr', 'bin', 'hard'));
  return src;
}

describe.each(['cp', 'node'] as const)('copy strategy, %s engine', (copyEngine) => {
  test('keeps contents, modes, absolute symlink targets and hardlinks; the source is untouched', async () => {
    const src = tree();
    const vmDir = path.join(s.dir, 'vm');
    fs.mkdirSync(vmDir);
    const r = await cloneRootfs({ sourceDir: src, vmDir, overlaySupported: false, strategies: ['copy'], copyEngine });
    expect(r).toMatchObject({ strategy: 'copy', rootPath: path.join(vmDir, 'rootfs'), writableDir: path.join(vmDir, 'rootfs') });
    const dst = r.rootPath;
    expect(fs.readFileSync(path.join(dst, 'usr/bin/tool'), 'utf8')).toBe('binary');
    expect(fs.statSync(path.join(dst, 'usr/bin/tool')).mode & 0o7777).toBe(0o4755);
    expect(fs.statSync(path.join(dst, 'root')).mode & 0o777).toBe(0o700);
    expect(fs.readlinkSync(path.join(dst, 'usr/bin/abs-link'))).toBe('/usr/bin/tool');
    expect(fs.statSync(path.join(dst, 'usr/bin/hard')).ino).toBe(fs.statSync(path.join(dst, 'usr/bin/tool')).ino);
    expect(fs.statSync(path.join(dst, 'usr/bin/tool')).ino).not.toBe(fs.statSync(path.join(src, 'usr/bin/tool')).ino);
  });

  test('an abort stops the copy and leaves no partial clone', async () => {
    const src = tree();
    const vmDir = path.join(s.dir, 'vm');
    fs.mkdirSync(vmDir);
    const ac = new AbortController();
    ac.abort();
    await expect(cloneRootfs({ sourceDir: src, vmDir, overlaySupported: false, strategies: ['copy'], copyEngine, signal: ac.signal })).rejects.toMatchObject({ name: 'AbortError' });
    expect(fs.existsSync(path.join(vmDir, 'rootfs'))).toBe(false);
  });
});

test('no working strategy: a coded error that says why each was skipped', async () => {
  const src = tree();
  const vmDir = path.join(s.dir, 'vm');
  fs.mkdirSync(vmDir);
  const err = await cloneRootfs({ sourceDir: src, vmDir, overlaySupported: false, strategies: ['overlay'] }).catch((e: Error) => e);
  expect(err).toMatchObject({ code: 'ERR_MICROVM_CLONE_UNSUPPORTED' });
  expect((err as Error).message).toContain('overlay: the backend cannot mount it');
});
