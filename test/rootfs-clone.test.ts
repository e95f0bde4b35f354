/** cloneRootfs on real trees: every copy engine keeps contents, modes, symlinks and hardlinks. */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { cloneRootfs } from '../lib';
import { addon } from '../lib/native';
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

describe.each(['native', 'cp', 'node'] as const)('copy strategy, %s engine', (copyEngine) => {
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

const isRoot = process.getuid?.() === 0;

describe.each(['native', 'cp'] as const)('copy strategy, %s engine, as cp -a', (copyEngine) => {
  (isRoot ? test : test.skip)(
    `owners, times, xattrs, FIFOs, empty and large files, many files${isRoot ? '' : ' [skipped: needs root to give files other owners]'}`,
    async () => {
      const src = tree();
      const many = path.join(src, 'many');
      fs.mkdirSync(path.join(many, 'sub'), { recursive: true });
      for (let i = 0; i < 300; i++) fs.writeFileSync(path.join(many, i % 2 ? 'sub' : '', `f${i}`), `file ${i}\n`);
      const big = Buffer.alloc(5 * 1024 * 1024 + 3);
      for (let i = 0; i < big.length; i += 4096) big[i] = i & 0xff;
      fs.writeFileSync(path.join(src, 'big'), big);
      fs.writeFileSync(path.join(src, 'empty'), '');
      execFileSync('mkfifo', [path.join(src, 'fifo')]);
      fs.chownSync(path.join(src, 'usr'), 1234, 5678);
      fs.chownSync(path.join(src, 'many', 'f10'), 42, 43);
      fs.lchownSync(path.join(src, 'usr', 'bin', 'abs-link'), 7, 8);
      expect(addon().setOverrideStat(path.join(src, 'many', 'f10'), '1000:1000:0640')).toBeNull();
      expect(addon().setOverrideStat(path.join(src, 'usr'), '0:0:0755')).toBeNull();
      const old = new Date('2001-02-03T04:05:06Z');
      fs.utimesSync(path.join(src, 'many', 'sub', 'f1'), old, old);
      fs.utimesSync(path.join(src, 'many', 'sub'), old, old); // after its children: set again below
      fs.utimesSync(path.join(src, 'empty'), old, old);
      const vmDir = path.join(s.dir, 'vm');
      fs.mkdirSync(vmDir);
      const r = await cloneRootfs({ sourceDir: src, vmDir, overlaySupported: false, strategies: ['copy'], copyEngine });
      const dst = r.rootPath;
      const st = (p: string): fs.Stats => fs.lstatSync(path.join(dst, p));
      expect([st('usr').uid, st('usr').gid]).toEqual([1234, 5678]);
      expect([st('many/f10').uid, st('many/f10').gid]).toEqual([42, 43]);
      expect([st('usr/bin/abs-link').uid, st('usr/bin/abs-link').gid]).toEqual([7, 8]);
      expect(addon().getOverrideStat(path.join(dst, 'many', 'f10'))).toBe('1000:1000:0640');
      expect(addon().getOverrideStat(path.join(dst, 'usr'))).toBe('0:0:0755');
      expect(st('many/sub/f1').mtimeMs).toBe(old.getTime());
      expect(st('many/sub').mtimeMs).toBe(old.getTime()); // set after the children were made
      expect(st('empty').size).toBe(0);
      expect(st('empty').mtimeMs).toBe(old.getTime());
      expect(fs.readFileSync(path.join(dst, 'big')).equals(big)).toBe(true);
      expect(st('fifo').isFIFO()).toBe(true);
      for (let i = 0; i < 300; i++)
        expect(fs.readFileSync(path.join(dst, 'many', i % 2 ? 'sub' : '', `f${i}`), 'utf8')).toBe(`file ${i}\n`);
      expect(fs.readdirSync(path.join(dst, 'many', 'sub'))).toHaveLength(150);
    },
  );
});

describe('the native copy', () => {
  test('a destination that exists is refused (EEXIST, with the path); cancel() stops it with ECANCELED', async () => {
    const src = tree();
    const dst = path.join(s.dir, 'exists');
    fs.mkdirSync(dst);
    await expect(addon().copyTree(src, dst, { reflink: 'auto', threads: 2 }).promise).rejects.toMatchObject({
      code: 'EEXIST',
      path: dst,
    });
    for (let i = 0; i < 2000; i++) {
      if (i % 100 === 0) fs.mkdirSync(path.join(src, `d${i}`));
      fs.writeFileSync(path.join(src, `d${i - (i % 100)}`, `f${i}`), 'x');
    }
    const job = addon().copyTree(src, path.join(s.dir, 'cancelled'), { reflink: 'auto', threads: 2 });
    job.cancel();
    await expect(job.promise).rejects.toMatchObject({ code: 'ECANCELED' });
    const done = await addon().copyTree(src, path.join(s.dir, 'whole'), { reflink: 'auto', threads: 3 }).promise;
    expect(done).toMatchObject({ files: 2001, links: 1, symlinks: 1, dirs: 24, reflinked: 0 }); // /, usr, usr/bin, root, d0..d1900; ext4 here: no FICLONE
    expect(() => addon().copyTree(src, path.join(s.dir, 'x'), { reflink: 'auto', threads: 0 })).toThrow(
      'threads: 1-64',
    );
  });

  test('copyThreads out of 1-64 is a RangeError with ERR_OUT_OF_RANGE', async () => {
    const src = tree();
    const vmDir = path.join(s.dir, 'vm');
    fs.mkdirSync(vmDir);
    for (const copyThreads of [0, 65, 1.5])
      await expect(
        cloneRootfs({ sourceDir: src, vmDir, overlaySupported: false, strategies: ['copy'], copyThreads }),
      ).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    expect(fs.existsSync(path.join(vmDir, 'rootfs'))).toBe(false);
  });

  test('reflink always on a filesystem without FICLONE fails instead of copying', async () => {
    const src = tree();
    const r = await addon()
      .copyTree(src, path.join(s.dir, 'r'), { reflink: 'always', threads: 1 })
      .promise.catch((e: Error & { code?: string }) => e);
    const fsType = execFileSync('stat', ['-f', '-c', '%T', s.dir], { encoding: 'utf8' }).trim();
    if (fsType === 'xfs' || fsType === 'btrfs') expect(r).toMatchObject({ files: 1 });
    else expect(r).toMatchObject({ code: expect.stringMatching(/^(EOPNOTSUPP|ENOTSUP|EXDEV|EINVAL|ENOTTY)$/) });
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
