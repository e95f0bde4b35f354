/** Layer extraction: fidelity against GNU tar archives, OCI whiteouts, hostile layers, limits. */
import { execFileSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import { EventEmitter } from 'node:events';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { treeSummary } from '../../lib/image/cache';
import { applyLayer, type ExtractLimits, type ExtractState } from '../../lib/image/extract';
import { markVerifying } from '../../lib/image/oci';
import { verifying } from '../../lib/image/source';
import { addon } from '../../lib/native';
import { scratch } from '../helpers';
import { gzip, type Member, tar } from './tar-writer';

let s: ReturnType<typeof scratch>;
let root: string;
let outside: string;
beforeEach(() => {
  s = scratch('microvm-extract-');
  root = path.join(s.dir, 'rootfs');
  outside = path.join(s.dir, 'outside');
  fs.mkdirSync(root);
  fs.mkdirSync(outside);
  fs.writeFileSync(path.join(outside, 'victim'), 'untouched');
});
afterEach(() => s.cleanup());

const newState = (): ExtractState => ({ bytes: 0, entries: 0, warnings: [] });
const apply = (
  archive: Buffer | Uint8Array,
  state = newState(),
  limits?: ExtractLimits,
  mediaType?: string,
): Promise<void> => applyLayer(root, Readable.from([archive]), { state, limits, mediaType });
const layer = (members: Member[]): Buffer => gzip(tar(members));

/** Everything under `dir` as [relative path, type, mode, size, link target], sorted. */
function listing(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const name of fs.readdirSync(d).sort()) {
      const p = path.join(d, name);
      const st = fs.lstatSync(p);
      const rel = path.relative(dir, p);
      if (st.isSymbolicLink()) out.push(`${rel} l ${fs.readlinkSync(p)}`);
      else if (st.isDirectory()) {
        out.push(`${rel} d ${(st.mode & 0o7777).toString(8)}`);
        walk(p);
      } else out.push(`${rel} f ${(st.mode & 0o7777).toString(8)} ${st.size} ${st.nlink}`);
    }
  };
  walk(dir);
  return out;
}

describe('fidelity', () => {
  test.each(['gzip', 'zstd', 'zstd-binary', 'none'] as const)(
    'a GNU tar layer (%s) extracts to the same tree',
    async (compression) => {
      const src = path.join(s.dir, 'src');
      fs.mkdirSync(path.join(src, 'usr/bin'), { recursive: true });
      fs.mkdirSync(path.join(src, 'tmp'), { mode: 0o1777 });
      fs.chmodSync(path.join(src, 'tmp'), 0o1777);
      fs.writeFileSync(path.join(src, 'usr/bin/tool'), 'x'.repeat(100000));
      fs.chmodSync(path.join(src, 'usr/bin/tool'), 0o4755);
      fs.linkSync(path.join(src, 'usr/bin/tool'), path.join(src, 'usr/bin/tool-hard'));
      fs.symlinkSync('/usr/bin/tool', path.join(src, 'usr/bin/abs-link'));
      fs.symlinkSync('tool', path.join(src, 'usr/bin/rel-link'));
      fs.mkdirSync(path.join(src, 'deep/' + 'n'.repeat(120)), { recursive: true });
      fs.writeFileSync(path.join(src, 'deep/' + 'n'.repeat(120) + '/long-name-file-' + 'y'.repeat(90)), 'long');
      const archive = path.join(s.dir, 'layer.tar');
      execFileSync('tar', ['--format=pax', '-C', src, '-cf', archive, '.']);
      let data: Buffer = fs.readFileSync(archive);
      if (compression === 'gzip') data = gzip(data);
      if (compression.startsWith('zstd')) data = execFileSync('zstd', ['-c', '-q', archive]);
      // zstd: libzstd in the addon; zstd-binary: the fallback when libzstd cannot be loaded
      await applyLayer(root, Readable.from([data]), {
        state: newState(),
        zstd: compression === 'zstd-binary' ? 'binary' : 'auto',
      });
      expect(listing(root)).toEqual(listing(src));
      // PAX keeps sub-second mtimes.
      expect(
        Math.abs(
          fs.statSync(path.join(root, 'usr/bin/tool')).mtimeMs - fs.statSync(path.join(src, 'usr/bin/tool')).mtimeMs,
        ),
      ).toBeLessThan(1);
    },
  );
});

describe('OCI whiteouts', () => {
  test('.wh.NAME removes lower entries; .wh..wh..opq empties a directory of lower entries only', async () => {
    await apply(
      layer([
        { path: 'a', type: 'dir' },
        { path: 'a/b', data: '1' },
        { path: 'a/c', data: '2' },
        { path: 'd', data: '3' },
        { path: 'o', type: 'dir' },
        { path: 'o/old', data: 'x' },
      ]),
    );
    await apply(
      layer([
        { path: 'a/.wh.b' },
        { path: '.wh.d' },
        { path: 'o/new', data: 'same layer' },
        { path: 'o/.wh..wh..opq' },
        { path: 'e', data: 'made here' },
        { path: '.wh.e' }, // a whiteout never hides an entry of its own layer
      ]),
    );
    expect(listing(root)).toEqual(['a d 755', 'a/c f 644 1 1', 'e f 644 9 1', 'o d 755', 'o/new f 644 10 1']);
  });
});

describe('hostile layers: nothing outside the root is ever touched', () => {
  afterEach(() => {
    expect(fs.readdirSync(outside)).toEqual(['victim']);
    expect(fs.readFileSync(path.join(outside, 'victim'), 'utf8')).toBe('untouched');
  });

  test("'..' in a path is refused", async () => {
    await expect(apply(layer([{ path: '../outside/victim', data: 'pwned' }]))).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_UNSAFE_ENTRY',
    });
    await expect(apply(layer([{ path: 'a/../../outside/x', data: 'pwned' }]))).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_UNSAFE_ENTRY',
    });
  });

  test('absolute paths land inside the root', async () => {
    await apply(layer([{ path: `${outside}/victim`, data: 'contained' }]));
    expect(fs.readFileSync(path.join(root, outside, 'victim'), 'utf8')).toBe('contained');
  });

  test('a parent made a symlink (absolute or climbing) resolves inside the root', async () => {
    await apply(
      layer([
        { path: outside, type: 'dir' }, // the same path, inside the root
        { path: 'evil', type: 'symlink', linkpath: outside },
        { path: 'up', type: 'symlink', linkpath: '../../../../../../../..' + outside },
      ]),
    );
    await apply(
      layer([
        { path: 'evil/victim', data: 'pwned-1' },
        { path: 'up/victim2', data: 'pwned-2' },
      ]),
    );
    expect(fs.readFileSync(path.join(root, outside, 'victim'), 'utf8')).toBe('pwned-1');
    expect(fs.readFileSync(path.join(root, outside, 'victim2'), 'utf8')).toBe('pwned-2');
    // A dangling symlinked parent is an error, not a write anywhere else.
    await expect(
      apply(
        layer([
          { path: 'dangling', type: 'symlink', linkpath: '/nowhere' },
          { path: 'dangling/x', data: 'x' },
        ]),
      ),
    ).rejects.toMatchObject({ code: 'ERR_MICROVM_IMAGE_UNSAFE_ENTRY' });
  });

  test('a symlink leaf is replaced, never written through', async () => {
    await apply(
      layer([
        { path: 'leaf', type: 'symlink', linkpath: path.join(outside, 'victim') },
        { path: 'leaf', data: 'replaced' },
      ]),
    );
    expect(fs.lstatSync(path.join(root, 'leaf')).isFile()).toBe(true);
  });

  test('hard links to outside or through symlinks stay inside (or fail)', async () => {
    const before = fs.statSync(path.join(outside, 'victim')).nlink;
    await expect(
      apply(layer([{ path: 'hl', type: 'hardlink', linkpath: path.join(outside, 'victim') }])),
    ).rejects.toMatchObject({ code: 'ERR_MICROVM_IMAGE_UNSAFE_ENTRY' });
    await expect(
      apply(
        layer([
          { path: 'sl', type: 'symlink', linkpath: outside },
          { path: 'hl2', type: 'hardlink', linkpath: 'sl/victim' },
        ]),
      ),
    ).rejects.toMatchObject({ code: 'ERR_MICROVM_IMAGE_UNSAFE_ENTRY' });
    expect(fs.statSync(path.join(outside, 'victim')).nlink).toBe(before);
  });

  test('whiteouts aimed outside remove nothing there', async () => {
    await apply(layer([{ path: 'evil', type: 'symlink', linkpath: outside }]));
    await apply(layer([{ path: 'evil/.wh.victim' }, { path: `${outside}/.wh.victim` }]));
    await expect(apply(layer([{ path: '../outside/.wh.victim' }]))).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_UNSAFE_ENTRY',
    });
  });

  test('device nodes and FIFOs are skipped with a warning; duplicates: the last wins', async () => {
    const state = newState();
    await apply(
      layer([
        { path: 'dev/null', type: 'char' },
        { path: 'pipe', type: 'fifo' },
        { path: 'dup', data: 'first' },
        { path: 'dup', data: 'second' },
      ]),
      state,
    );
    expect(state.warnings).toEqual([
      expect.stringContaining('skipped char dev/null'),
      expect.stringContaining('skipped fifo pipe'),
    ]);
    expect(fs.existsSync(path.join(root, 'dev/null'))).toBe(false);
    expect(fs.readFileSync(path.join(root, 'dup'), 'utf8')).toBe('second');
  });
});

test('sparse files (old GNU type S, and PAX GNU.sparse.* records) are skipped with a warning that says so, and what follows them is applied', async () => {
  const state = newState();
  await apply(
    layer([
      { path: 'old-sparse', type: 'sparse', data: 'stored blocks' },
      {
        path: 'pax-sparse',
        data: '1\n0\n4\nmap+data',
        pax: {
          'GNU.sparse.major': '1',
          'GNU.sparse.minor': '0',
          'GNU.sparse.name': 'pax-sparse',
          'GNU.sparse.realsize': '4096',
        },
      },
      { path: 'after', data: 'ok' },
    ]),
    state,
  );
  expect(state.warnings).toEqual([
    'skipped sparse file old-sparse (sparse files in GNU or PAX sparse format are not supported; rebuild the layer without --sparse)',
    'skipped sparse file pax-sparse (sparse files in GNU or PAX sparse format are not supported; rebuild the layer without --sparse)',
  ]);
  expect(fs.existsSync(path.join(root, 'old-sparse'))).toBe(false);
  expect(fs.existsSync(path.join(root, 'pax-sparse'))).toBe(false);
  expect(fs.readFileSync(path.join(root, 'after'), 'utf8')).toBe('ok');
});

describe('ownership', () => {
  const privilegedApply = (archive: Buffer, privileged?: boolean): Promise<void> =>
    applyLayer(root, Readable.from([archive]), { state: newState(), privileged });
  const members: Member[] = [
    { path: 'srv', type: 'dir', uid: 33, gid: 33, mode: 0o750 },
    { path: 'srv/app', uid: 1000, gid: 2000, mode: 0o4755, data: 'bin' },
    { path: 'srv/link', type: 'symlink', linkpath: 'app', uid: 1000, gid: 2000 },
  ];
  const xattr = (file: string): string =>
    execFileSync(
      'python3',
      ['-c', 'import os,sys; print(os.getxattr(sys.argv[1], "user.containers.override_stat").decode())', file],
      { encoding: 'utf8' },
    ).trim();

  (process.getuid?.() === 0 ? test : test.skip)(
    `as root: the layer's owners and modes are applied (set-ID bits of the image kept)${process.getuid?.() === 0 ? '' : ' [skipped: needs root to chown]'}`,
    async () => {
      await privilegedApply(layer(members)); // the default: privileged when running as root
      const app = fs.statSync(path.join(root, 'srv/app'));
      expect([app.uid, app.gid, app.mode & 0o7777]).toEqual([1000, 2000, 0o4755]);
      const dir = fs.statSync(path.join(root, 'srv'));
      expect([dir.uid, dir.gid, dir.mode & 0o7777]).toEqual([33, 33, 0o750]);
      const link = fs.lstatSync(path.join(root, 'srv/link'));
      expect([link.uid, link.gid]).toEqual([1000, 2000]);
    },
  );

  test("unprivileged: files stay the caller's; the owners and modes go to user.containers.override_stat (uid:gid:0mode), which libkrun's virtio-fs serves", async () => {
    await privilegedApply(layer(members), false);
    const me = process.getuid?.() ?? 0;
    const app = path.join(root, 'srv/app');
    expect(fs.statSync(app).uid).toBe(me);
    expect(xattr(app)).toBe('1000:2000:04755');
    expect(xattr(path.join(root, 'srv'))).toBe('33:33:0750');
  });
});

describe('limits and damage', () => {
  test('entry count, total size and decompression ratio caps', async () => {
    const many = layer(Array.from({ length: 20 }, (_, i) => ({ path: `f${i}`, data: 'x' })));
    await expect(apply(many, newState(), { maxEntries: 10 })).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_LIMIT',
      message: expect.stringContaining('entry count'),
    });
    await expect(
      apply(layer([{ path: 'big', data: Buffer.alloc(100000) }]), newState(), { maxBytes: 50000 }),
    ).rejects.toMatchObject({ code: 'ERR_MICROVM_IMAGE_LIMIT' });
    const bomb = layer([{ path: 'zeros', data: Buffer.alloc(20 * 1024 * 1024) }]);
    await expect(apply(bomb, newState(), { maxRatio: 100 })).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_LIMIT',
      message: expect.stringContaining('ratio'),
    });
  });

  test('the ratio cap counts bytes actually decompressed, not sizes headers claim (slow input)', async () => {
    const big = layer([{ path: 'random', data: crypto.randomBytes(20 * 1024 * 1024) }]);
    async function* trickle(): AsyncGenerator<Buffer> {
      for (let i = 0; i < big.length; i += 64 * 1024) {
        yield big.subarray(i, i + 64 * 1024);
        await new Promise((r) => setImmediate(r));
      }
    }
    await applyLayer(root, Readable.from(trickle()), { state: newState() });
    expect(fs.statSync(path.join(root, 'random')).size).toBe(20 * 1024 * 1024);
  });

  test('a truncated or corrupt archive is an error', async () => {
    const full = tar([{ path: 'f', data: 'x'.repeat(5000) }]);
    await expect(apply(gzip(full.subarray(0, 2048)))).rejects.toMatchObject({ code: 'ERR_MICROVM_IMAGE_LAYER' });
    const corrupt = Buffer.from(full);
    corrupt[10] ^= 0xff;
    await expect(apply(gzip(corrupt))).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_LAYER',
      message: expect.stringContaining('checksum'),
    });
    await expect(
      apply(
        Buffer.from('not gzip at all, really'),
        newState(),
        undefined,
        'application/vnd.oci.image.layer.v1.tar+gzip',
      ),
    ).rejects.toMatchObject({ code: 'ERR_MICROVM_IMAGE_LAYER' });
  });
});

describe('the native extractor', () => {
  test('file contents survive the pooled 1 MiB blocks byte for byte, in any input chunking', async () => {
    const big = crypto.randomBytes(3 * 1024 * 1024 + 12345);
    const small = crypto.randomBytes(777);
    const archive = layer([
      { path: 'd', type: 'dir' },
      { path: 'd/big', data: big },
      { path: 'd/small', data: small },
      { path: 'empty', data: '' },
    ]);
    // 1-byte, odd-sized and whole chunks all give the same tree.
    for (const size of [1, 4099, archive.length]) {
      fs.rmSync(root, { recursive: true, force: true });
      fs.mkdirSync(root);
      const chunks: Buffer[] = [];
      for (let i = 0; i < archive.length; i += size) chunks.push(archive.subarray(i, i + size));
      await applyLayer(
        root,
        Readable.from(size === 1 ? chunks.slice(0, 300).concat([archive.subarray(300)]) : chunks),
        { state: newState() },
      );
      expect(fs.readFileSync(path.join(root, 'd/big')).equals(big)).toBe(true);
      expect(fs.readFileSync(path.join(root, 'd/small')).equals(small)).toBe(true);
      expect(fs.statSync(path.join(root, 'empty')).size).toBe(0);
    }
  });

  test('a gzip stream of several members is read through, as gzip -d does', async () => {
    const whole = tar([
      { path: 'a', data: 'first' },
      { path: 'b', data: 'second' },
    ]);
    const cut = 1024; // a header boundary: members are just bytes of one stream
    await apply(Buffer.concat([gzip(whole.subarray(0, cut)), gzip(whole.subarray(cut))]));
    expect(fs.readFileSync(path.join(root, 'a'), 'utf8')).toBe('first');
    expect(fs.readFileSync(path.join(root, 'b'), 'utf8')).toBe('second');
  });

  test('a gzip stream cut short is an error, and state totals are kept across layers', async () => {
    const g = layer([{ path: 'f', data: 'x'.repeat(100000) }]);
    await expect(apply(g.subarray(0, g.length - 8))).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_LAYER',
      message: expect.stringContaining('decompress'),
    });
    const state = newState();
    await apply(layer([{ path: 'one', data: '12345' }]), state);
    await apply(layer([{ path: 'two', data: '678' }]), state);
    expect(state).toMatchObject({ bytes: 8, entries: 2 });
    await expect(apply(layer([{ path: 'three', data: '9' }]), state, { maxEntries: 2 })).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_LIMIT',
    });
  });

  test('abort mid-layer: the promise rejects and nothing is written after it settles', async () => {
    const archive = layer(Array.from({ length: 400 }, (_, i) => ({ path: `f${i}`, data: Buffer.alloc(64 * 1024, i) })));
    const ac = new AbortController();
    async function* slow(): AsyncGenerator<Buffer> {
      for (let i = 0; i < archive.length; i += 16 * 1024) {
        if (i > archive.length / 3) ac.abort();
        yield archive.subarray(i, i + 16 * 1024);
        await new Promise((r) => setImmediate(r));
      }
    }
    await expect(
      applyLayer(root, Readable.from(slow()), { state: newState(), signal: ac.signal }),
    ).rejects.toMatchObject({ name: 'AbortError' });
    const after = fs.readdirSync(root).length;
    expect(after).toBeLessThan(400);
    await new Promise((r) => setTimeout(r, 100));
    expect(fs.readdirSync(root).length).toBe(after);
  });

  test('a source that ends (or delivers more) while it is held for backpressure, as a socket body can', async () => {
    const data = crypto.randomBytes(6 * 1024 * 1024);
    const archive = layer([{ path: 'big', data }]);
    // Ignores pause(): two chunks over the 4 MiB high-water mark, then 'end', all in one tick.
    class Burst extends EventEmitter {
      sent = false;
      pause(): this {
        return this;
      }
      resume(): this {
        if (!this.sent) {
          this.sent = true;
          setImmediate(() => {
            this.emit('data', archive.subarray(0, archive.length - 1000));
            this.emit('data', archive.subarray(archive.length - 1000));
            this.emit('end');
          });
        }
        return this;
      }
      destroy(): this {
        return this;
      }
    }
    await applyLayer(root, new Burst() as unknown as Readable, { state: newState() });
    expect(fs.readFileSync(path.join(root, 'big')).equals(data)).toBe(true);
  });

  test('zstd in the addon: frames read through, a cut stream or trailing junk refused, the ratio capped', async () => {
    expect(addon().zstdAvailable()).toBe(true); // libzstd1 is on every machine that runs this (setup.sh)
    const zstd = (b: Buffer): Buffer => execFileSync('zstd', ['-c', '-q'], { input: b });
    const whole = tar([
      { path: 'a', data: 'first' },
      { path: 'b', data: Buffer.alloc(300000, 7) },
    ]);
    await apply(Buffer.concat([zstd(whole.subarray(0, 1024)), zstd(whole.subarray(1024))]));
    expect(fs.readFileSync(path.join(root, 'a'), 'utf8')).toBe('first');
    expect(fs.readFileSync(path.join(root, 'b')).equals(Buffer.alloc(300000, 7))).toBe(true);
    const z = zstd(whole);
    await expect(apply(z.subarray(0, z.length - 5))).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_LAYER',
      message: expect.stringContaining('end of file'),
    });
    await expect(apply(Buffer.concat([z, Buffer.from('junk after the frame')]))).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_LAYER',
    });
    const bomb = zstd(tar([{ path: 'zeros', data: Buffer.alloc(20 * 1024 * 1024) }]));
    await expect(apply(bomb, newState(), { maxRatio: 100 })).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_LIMIT',
      message: expect.stringContaining('ratio'),
    });
  });

  test("gzip's trailer (CRC-32, length) is checked unless the input verifies its own digest", async () => {
    const g = layer([{ path: 'f', data: 'payload '.repeat(1000) }]);
    const badCrc = Buffer.from(g);
    badCrc[badCrc.length - 8] ^= 0x01; // trailer: CRC-32, then ISIZE
    await expect(apply(badCrc)).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_LAYER',
      message: expect.stringContaining('decompress'),
    });
    expect(fs.existsSync(path.join(root, 'f'))).toBe(false);
    // A digest-verifying stream errors at its end on any changed byte: the CRC adds nothing there.
    await applyLayer(root, markVerifying(Readable.from([badCrc])), { state: newState() });
    expect(fs.readFileSync(path.join(root, 'f'), 'utf8')).toBe('payload '.repeat(1000));
    const badLength = Buffer.from(g);
    badLength[badLength.length - 4] ^= 0x01;
    fs.rmSync(path.join(root, 'f'));
    await expect(apply(badLength)).rejects.toMatchObject({ code: 'ERR_MICROVM_IMAGE_LAYER' });
    // and in a later member of a multi-member stream too
    const two = Buffer.concat([
      gzip(tar([{ path: 'a', data: 'A' }]).subarray(0, 1024)),
      gzip(tar([{ path: 'a', data: 'A' }]).subarray(1024)),
    ]);
    const twoBad = Buffer.from(two);
    twoBad[twoBad.length - 8] ^= 0x01;
    await expect(apply(twoBad)).rejects.toMatchObject({ code: 'ERR_MICROVM_IMAGE_LAYER' });
  });
});

describe('a malformed layer from a digest-verified stream', () => {
  const sha = (b: Buffer): string => `sha256:${crypto.createHash('sha256').update(b).digest('hex')}`;
  const chunks = (b: Buffer): Buffer[] =>
    Array.from({ length: Math.ceil(b.length / 4096) }, (_, i) => b.subarray(i * 4096, (i + 1) * 4096));
  const good = layer(Array.from({ length: 50 }, (_, i) => ({ path: `f${i}`, data: crypto.randomBytes(8192) })));
  const damaged = Buffer.from(good);
  damaged[100] ^= 0xff; // inflate fails long before the end

  test('bytes damaged in transit: the digest error, not the decompression error', async () => {
    const input = verifying(Readable.from(chunks(damaged)), { digest: sha(good), size: good.length }, 'layer');
    await expect(applyLayer(root, input, { state: newState() })).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_DIGEST',
    });
  });

  test('a blob malformed as published (its digest matches): the decompression error', async () => {
    const input = verifying(Readable.from(chunks(damaged)), { digest: sha(damaged), size: damaged.length }, 'layer');
    await expect(applyLayer(root, input, { state: newState() })).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_LAYER',
    });
  });
});

describe('tree summary (the cache entry integrity check)', () => {
  test('counts entries and regular-file bytes, never following a symlink', () => {
    fs.mkdirSync(path.join(root, 'a/b/c'), { recursive: true });
    fs.writeFileSync(path.join(root, 'a/one'), '12345');
    fs.writeFileSync(path.join(root, 'a/b/c/two'), Buffer.alloc(70000));
    fs.linkSync(path.join(root, 'a/one'), path.join(root, 'hard'));
    fs.symlinkSync(outside, path.join(root, 'out')); // a directory outside, holding 'victim'
    fs.symlinkSync('a', path.join(root, 'a-link'));
    // a, a/b, a/b/c, a/one, a/b/c/two, hard, out, a-link
    expect(treeSummary(root)).toEqual({ entries: 8, bytes: 5 + 70000 + 5 });
    // the same as a JavaScript walk would say
    let entries = 0;
    let bytes = 0;
    const walk = (d: string): void => {
      for (const e of fs.readdirSync(d, { withFileTypes: true })) {
        entries++;
        if (e.isDirectory()) walk(path.join(d, e.name));
        else if (e.isFile()) bytes += fs.lstatSync(path.join(d, e.name)).size;
      }
    };
    walk(root);
    expect(treeSummary(root)).toEqual({ entries, bytes });
  });

  test('a root that is missing (or a symlink inside it that replaced a directory) is an error with code and path', () => {
    expect(() => treeSummary(path.join(s.dir, 'nope'))).toThrow(
      expect.objectContaining({ code: 'ENOENT', path: path.join(s.dir, 'nope') }),
    );
    fs.mkdirSync(path.join(root, 'd'));
    // A symlink inside is one entry; what it points at is not walked.
    const big = path.join(s.dir, 'big');
    fs.mkdirSync(big);
    for (let i = 0; i < 5; i++) fs.writeFileSync(path.join(big, `f${i}`), 'xxxx');
    fs.symlinkSync(big, path.join(root, 'link'));
    expect(treeSummary(root)).toEqual({ entries: 2, bytes: 0 });
    // The root replaced by a symlink: an error naming it, never the summary of its target.
    const replaced = path.join(s.dir, 'replaced');
    fs.symlinkSync(big, replaced);
    expect(() => treeSummary(replaced)).toThrow(expect.objectContaining({ code: 'ENOTDIR', path: replaced }));
  });
});

describe('block group placement', () => {
  test("markTopDirectory sets ext4's top-of-hierarchy attribute (chattr +T), or says why not", () => {
    const dir = path.join(s.dir, 'top');
    fs.mkdirSync(dir);
    const err = addon().markTopDirectory(dir);
    const attrs = (d = dir): string => execFileSync('lsattr', ['-d', d], { encoding: 'utf8' }).split(/\s+/)[0];
    let supported = true;
    try {
      attrs();
    } catch {
      supported = false; // lsattr: the filesystem has no attributes at all (tmpfs)
    }
    if (supported) {
      expect(err).toBeNull();
      expect(attrs()).toContain('T');
      expect(addon().markTopDirectory(dir)).toBeNull(); // idempotent
    } else {
      expect(typeof err).toBe('string');
    }
    expect(addon().markTopDirectory(path.join(s.dir, 'missing'))).toBe('ENOENT');
    // never through a symlink (Linux says ENOTDIR for O_DIRECTORY | O_NOFOLLOW on one)
    const other = path.join(s.dir, 'other');
    fs.mkdirSync(other);
    fs.symlinkSync(other, path.join(s.dir, 'link'));
    expect(['ELOOP', 'ENOTDIR']).toContain(addon().markTopDirectory(path.join(s.dir, 'link')));
    if (supported) expect(attrs(other)).not.toContain('T');
  });
});
