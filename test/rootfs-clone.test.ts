/** cloneRootfs on real trees: both copy engines keep contents, modes, symlinks and hardlinks. */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
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
    expect(r).toMatchObject({
      strategy: 'copy',
      rootPath: path.join(vmDir, 'rootfs'),
      writableDir: path.join(vmDir, 'rootfs'),
    });
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
    await expect(
      cloneRootfs({
        sourceDir: src,
        vmDir,
        overlaySupported: false,
        strategies: ['copy'],
        copyEngine,
        signal: ac.signal,
      }),
    ).rejects.toMatchObject({ name: 'AbortError' });
    expect(fs.existsSync(path.join(vmDir, 'rootfs'))).toBe(false);
  });
});

test('no working strategy: a coded error that says why each was skipped', async () => {
  const src = tree();
  const vmDir = path.join(s.dir, 'vm');
  fs.mkdirSync(vmDir);
  const err = await cloneRootfs({ sourceDir: src, vmDir, overlaySupported: false, strategies: ['overlay'] }).catch(
    (e: Error) => e,
  );
  expect(err).toMatchObject({ code: 'ERR_MICROVM_CLONE_UNSUPPORTED' });
  expect((err as Error).message).toContain('overlay: the backend cannot mount it');
});

/**
 * reflink needs a filesystem with FICLONE; ext4 (our machines' disk) has none, so the test makes one:
 * an XFS image on a loop device (needs root, mkfs.xfs and loop devices).
 */
function reflinkUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'not root (needed to mount an XFS loop image)';
  try {
    execFileSync('mkfs.xfs', ['-V'], { stdio: 'ignore' });
  } catch {
    return 'no mkfs.xfs (xfsprogs)';
  }
  if (!fs.existsSync('/dev/loop-control')) return 'no loop devices';
  return undefined;
}
const noReflink = reflinkUnavailable();

(noReflink ? describe.skip : describe)(`reflink strategy on XFS${noReflink ? ` [skipped: ${noReflink}]` : ''}`, () => {
  let mnt = '';
  let img = '';
  beforeAll(() => {
    const base = fs.mkdtempSync(path.join(os.tmpdir(), 'microvm-xfs-'));
    img = path.join(base, 'fs.img');
    mnt = path.join(base, 'mnt');
    fs.mkdirSync(mnt);
    execFileSync('truncate', ['-s', '320M', img]);
    execFileSync('mkfs.xfs', ['-q', '-m', 'reflink=1', img]);
    execFileSync('mount', ['-o', 'loop', img, mnt]);
  });
  afterAll(() => {
    if (mnt) execFileSync('umount', [mnt]);
    fs.rmSync(path.dirname(img), { recursive: true, force: true });
  });

  test('clones with FICLONE: same contents, separate inodes, the source unchanged by writes to the clone', async () => {
    const src = path.join(mnt, 'src');
    fs.mkdirSync(path.join(src, 'etc'), { recursive: true });
    fs.writeFileSync(path.join(src, 'etc', 'big'), Buffer.alloc(8 * 1024 * 1024, 1));
    const vmDir = path.join(mnt, 'vm');
    fs.mkdirSync(vmDir);
    const r = await cloneRootfs({ sourceDir: src, vmDir, overlaySupported: false });
    expect(r.strategy).toBe('reflink');
    const clone = path.join(r.rootPath, 'etc', 'big');
    expect(fs.readFileSync(clone).equals(fs.readFileSync(path.join(src, 'etc', 'big')))).toBe(true);
    fs.writeFileSync(clone, 'changed');
    expect(fs.statSync(path.join(src, 'etc', 'big')).size).toBe(8 * 1024 * 1024);
    // Shared extents: the clone used (almost) no new space.
    const df = fs.statfsSync(mnt);
    expect((df.blocks - df.bfree) * df.bsize).toBeLessThan(80 * 1024 * 1024);
  });
});
