/**
 * pull() from OCI image layouts built by umoci from Debian packages, checked against
 * `umoci raw unpack` (an oracle nobody here wrote); the cache; faults; spans.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { context, trace } from '@opentelemetry/api';
import { gcImages, image, listImages, parseReference, pull, SPAN } from '../../lib';
import { layoutSkipReason, scratch } from '../helpers';

const layout = process.env.MICROVM_TEST_LAYOUT;
const skip = layoutSkipReason();

describe('references', () => {
  test.each([
    [
      'busybox',
      {
        kind: 'registry',
        registry: 'docker.io',
        repository: 'library/busybox',
        tag: 'latest',
        canonical: 'docker.io/library/busybox:latest',
      },
    ],
    ['127.0.0.1:5000/x/y:v1', { registry: '127.0.0.1:5000', repository: 'x/y', tag: 'v1' }],
    [
      'localhost/app@sha256:' + 'a'.repeat(64),
      { registry: 'localhost', repository: 'app', digest: 'sha256:' + 'a'.repeat(64), tag: undefined },
    ],
    ['ghcr.io/org/app:1.2.3', { registry: 'ghcr.io', repository: 'org/app', tag: '1.2.3' }],
    ['user/repo', { registry: 'docker.io', repository: 'user/repo', tag: 'latest' }],
    ['oci:/srv/layout:v2', { kind: 'oci-layout', path: '/srv/layout', tag: 'v2' }],
    ['oci:/srv/layout', { kind: 'oci-layout', path: '/srv/layout', tag: undefined }],
    ['oci-archive:/srv/a.tar:v1', { kind: 'oci-archive', path: '/srv/a.tar', tag: 'v1' }],
    ['docker-archive:/srv/d.tar:team/app:v2', { kind: 'docker-archive', path: '/srv/d.tar', tag: 'team/app:v2' }],
  ])('%s', (ref, expected) => {
    expect(parseReference(ref)).toMatchObject(expected);
  });

  test.each([
    '',
    'UPPER/case',
    'a//b',
    'x:bad tag',
    'x@sha256:short',
    'oci:',
    'docker-archive:',
    'a/b:' + 't'.repeat(200),
  ])('rejects %j', (ref) => {
    expect(() => parseReference(ref)).toThrow(TypeError);
  });
});

(skip ? describe.skip : describe)(`pull from an OCI layout${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  let s: ReturnType<typeof scratch>;
  let cacheDir: string;
  beforeEach(() => {
    s = scratch('microvm-pull-');
    cacheDir = path.join(s.dir, 'cache');
  });
  afterEach(() => s.cleanup());

  const tree = (dir: string): string =>
    execFileSync('sh', ['-c', "find . -printf '%p %y %m %s %l\\n' | sort"], { cwd: dir, encoding: 'utf8' });

  test('the unpacked tree matches umoci raw unpack (two layers with a whiteout)', async () => {
    const r = await pull(`oci:${layout}:test`, { cacheDir });
    expect(r.fromCache).toBe(false);
    const oracle = path.join(s.dir, 'oracle');
    execFileSync(
      'umoci',
      ['raw', 'unpack', ...(process.getuid?.() === 0 ? [] : ['--rootless']), '--image', `${layout}:test`, oracle],
      { stdio: 'ignore' },
    );
    expect(tree(r.path)).toBe(tree(oracle));
    expect(fs.existsSync(path.join(r.path, 'etc/motd'))).toBe(false);
    expect(fs.readFileSync(path.join(r.path, 'etc/layer2'), 'utf8')).toBe('from layer 2\n');
    expect(r.config.config).toMatchObject({ Entrypoint: ['/bin/sh'], WorkingDir: '/root' });
    // extractions start in a block group of their own (ext4: the cache's tmp dir is a "top" dir)
    const fsType = execFileSync('stat', ['-f', '-c', '%T', cacheDir], { encoding: 'utf8' }).trim();
    if (fsType === 'ext2/ext3')
      expect(
        execFileSync('lsattr', ['-d', path.join(cacheDir, 'tmp')], { encoding: 'utf8' }).split(/\s+/)[0],
      ).toContain('T');
  });

  test('the cache: warm pulls need no work; a tampered entry is re-extracted with verify full', async () => {
    const cold = await pull(`oci:${layout}:test`, { cacheDir });
    const warm = await pull(`oci:${layout}:test`, { cacheDir });
    expect(warm).toMatchObject({ fromCache: true, path: cold.path, digest: cold.digest });
    fs.rmSync(path.join(cold.path, 'etc/passwd'));
    expect((await pull(`oci:${layout}:test`, { cacheDir })).fromCache).toBe(true); // fast check trusts the entry
    const fixed = await pull(`oci:${layout}:test`, { cacheDir, verify: 'full' });
    expect(fixed.fromCache).toBe(false);
    expect(fs.existsSync(path.join(fixed.path, 'etc/passwd'))).toBe(true);
    expect(listImages(cacheDir)).toEqual([
      expect.objectContaining({ digest: cold.digest, references: [`oci:${layout}:test`] }),
    ]);
  });

  test("the image trees are the caller's alone (0700), also in a cache made wider before", async () => {
    fs.mkdirSync(path.join(cacheDir, 'images'), { recursive: true, mode: 0o755 });
    fs.chmodSync(path.join(cacheDir, 'images'), 0o755);
    await pull(`oci:${layout}:test`, { cacheDir });
    expect(fs.statSync(path.join(cacheDir, 'images')).mode & 0o777).toBe(0o700);
  });

  const root = process.getuid?.() === 0;
  (root ? test : test.skip)(
    `a full disk during extraction: ERR_MICROVM_NO_SPACE (not an "unsafe entry"), nothing left in the cache${root ? '' : ' [skipped: needs root to mount a 256 KiB tmpfs]'}`,
    async () => {
      const small = path.join(s.dir, 'small');
      fs.mkdirSync(small);
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', small]);
      try {
        const err = await pull(`oci:${layout}:test`, { cacheDir: path.join(small, 'cache') }).catch((e: unknown) => e);
        expect(err).toMatchObject({ code: 'ERR_MICROVM_NO_SPACE', message: expect.stringContaining('cache gc') });
        expect(fs.readdirSync(path.join(small, 'cache', 'tmp'))).toEqual([]);
        expect(listImages(path.join(small, 'cache'))).toEqual([]);
      } finally {
        execFileSync('umount', [small]);
      }
    },
  );

  test('8 concurrent pulls of one cold image extract it once', async () => {
    const results = await Promise.all(Array.from({ length: 8 }, () => pull(`oci:${layout}:test`, { cacheDir })));
    expect(new Set(results.map((r) => r.path)).size).toBe(1);
    expect(results.filter((r) => !r.fromCache)).toHaveLength(1);
    expect(fs.readdirSync(path.join(cacheDir, 'tmp'))).toEqual([]);
  });

  test('a corrupted layer blob: ERR_MICROVM_IMAGE_DIGEST and nothing cached', async () => {
    const copy = path.join(s.dir, 'layout');
    execFileSync('cp', ['-a', layout as string, copy]);
    const manifest = JSON.parse(fs.readFileSync(path.join(copy, 'index.json'), 'utf8')).manifests[0].digest.split(
      ':',
    )[1];
    const layers = JSON.parse(fs.readFileSync(path.join(copy, 'blobs/sha256', manifest), 'utf8')).layers;
    const blob = path.join(copy, 'blobs/sha256', layers[1].digest.split(':')[1]);
    const data = fs.readFileSync(blob);
    data[data.length - 20] ^= 0xff;
    fs.writeFileSync(blob, data);
    await expect(pull(`oci:${copy}:test`, { cacheDir })).rejects.toMatchObject({
      code: expect.stringMatching(/ERR_MICROVM_IMAGE_(DIGEST|LAYER)/),
    });
    expect(listImages(cacheDir)).toEqual([]);
    expect(fs.readdirSync(path.join(cacheDir, 'tmp'))).toEqual([]);
    expect(fs.readdirSync(path.join(cacheDir, 'images')).filter((n) => !n.endsWith('.lock'))).toEqual([]);
  });

  test('abort mid-layer leaves nothing behind; progress is reported per layer', async () => {
    const ac = new AbortController();
    const seen: number[] = [];
    const err = await pull(`oci:${layout}:test`, {
      cacheDir,
      signal: ac.signal,
      onProgress: (p) => {
        seen.push(p.layer);
        if (p.bytes > 0) ac.abort();
      },
    }).catch((e: Error) => e);
    expect(err).toMatchObject({ name: 'AbortError' });
    expect(seen[0]).toBe(1);
    expect(listImages(cacheDir)).toEqual([]);
    expect(fs.readdirSync(path.join(cacheDir, 'tmp'))).toEqual([]);
  });

  test('zstd layers (skopeo --dest-compress-format zstd)', async () => {
    const z = path.join(s.dir, 'zlayout');
    execFileSync(
      'skopeo',
      ['copy', '--quiet', '--dest-compress-format', 'zstd', '--dest-compress', `oci:${layout}:test`, `oci:${z}:test`],
      { stdio: 'ignore' },
    );
    const r = await pull(`oci:${z}:test`, { cacheDir });
    expect(fs.readFileSync(path.join(r.path, 'etc/layer2'), 'utf8')).toBe('from layer 2\n');
  });

  test('a multi-platform index: the host platform is selected; a missing one lists what exists', async () => {
    const multi = path.join(s.dir, 'multi');
    execFileSync('cp', ['-a', layout as string, multi]);
    const idx = JSON.parse(fs.readFileSync(path.join(multi, 'index.json'), 'utf8'));
    const inner = {
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.index.v1+json',
      manifests: [
        { ...idx.manifests[0], annotations: undefined, platform: { os: 'linux', architecture: 'riscv64' } },
        { ...idx.manifests[0], annotations: undefined, platform: { os: 'linux', architecture: 'amd64' } },
      ],
    };
    const body = Buffer.from(JSON.stringify(inner));
    const digest = createHash('sha256').update(body).digest('hex');
    fs.writeFileSync(path.join(multi, 'blobs/sha256', digest), body);
    idx.manifests = [
      {
        mediaType: inner.mediaType,
        digest: `sha256:${digest}`,
        size: body.length,
        annotations: { 'org.opencontainers.image.ref.name': 'multi' },
      },
    ];
    fs.writeFileSync(path.join(multi, 'index.json'), JSON.stringify(idx));
    const r = await pull(`oci:${multi}:multi`, { cacheDir, platform: { os: 'linux', architecture: 'amd64' } });
    expect(fs.existsSync(path.join(r.path, 'etc/layer2'))).toBe(true);
    await expect(
      pull(`oci:${multi}:multi`, { cacheDir, platform: { os: 'linux', architecture: 'arm64' } }),
    ).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_PLATFORM',
      message: expect.stringContaining('available: linux/riscv64, linux/amd64'),
    });
  });

  test("spans: CacheLookup (cache_hit), Fetch, Extract (layered), CacheStore; then a hit: with policy 'missing' the lookup alone, by default the lookup and the re-resolving Fetch", async () => {
    const exporter = new InMemorySpanExporter();
    const tracer = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] }).getTracer('t');
    const scope = {
      tracer,
      ctx: trace.setSpan(context.active(), tracer.startSpan('parent')),
    };
    await image.pull(`oci:${layout}:test`, { cacheDir, scope });
    const names = exporter.getFinishedSpans().map((x) => x.name);
    expect(names).toEqual([SPAN.IMAGE_CACHE_LOOKUP, SPAN.IMAGE_FETCH, SPAN.IMAGE_EXTRACT, SPAN.IMAGE_CACHE_STORE]);
    const spans = exporter.getFinishedSpans();
    expect(spans[0].attributes['microvm.image.cache_hit']).toBe(false);
    expect(spans[2].attributes['microvm.image.layered']).toBe(true);
    exporter.reset();
    await image.pull(`oci:${layout}:test`, { cacheDir, scope, policy: 'missing' });
    expect(exporter.getFinishedSpans().map((x) => [x.name, x.attributes['microvm.image.cache_hit']])).toEqual([
      [SPAN.IMAGE_CACHE_LOOKUP, true],
    ]);
    exporter.reset();
    expect(await image.pull(`oci:${layout}:test`, { cacheDir, scope })).toMatchObject({ fromCache: true });
    expect(exporter.getFinishedSpans().map((x) => [x.name, x.attributes['microvm.image.cache_hit']])).toEqual([
      [SPAN.IMAGE_CACHE_LOOKUP, false],
      [SPAN.IMAGE_FETCH, undefined],
    ]);
  });

  test('image.pull() with no parent scope: one microvm.ImagePull root (in the global provider) with the four stages under it, one trace', async () => {
    const exporter = new InMemorySpanExporter();
    trace.setGlobalTracerProvider(new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] }));
    let r;
    try {
      r = await image.pull(`oci:${layout}:test`, { cacheDir });
    } finally {
      trace.disable();
    }
    const spans = exporter.getFinishedSpans();
    const root = spans.find((x) => x.name === 'microvm.ImagePull');
    expect(root?.parentSpanContext).toBeUndefined();
    expect(root?.attributes).toMatchObject({
      'microvm.image_ref': `oci:${layout}:test`,
      'microvm.image.source': 'pull',
      'microvm.image.digest': r.digest,
      'microvm.image.from_cache': false,
    });
    expect(spans.filter((x) => x !== root).map((x) => [x.name, x.parentSpanContext?.spanId])).toEqual(
      ['microvm.image.CacheLookup', 'microvm.image.Fetch', 'microvm.image.Extract', 'microvm.image.CacheStore'].map(
        (n) => [n, root?.spanContext().spanId],
      ),
    );
    expect(new Set(spans.map((x) => x.spanContext().traceId)).size).toBe(1);
  });

  test('archives: oci-archive and docker-archive (skopeo) unpack to the same tree; a tampered layer is refused', async () => {
    const oa = path.join(s.dir, 'o.tar');
    const da = path.join(s.dir, 'd.tar');
    execFileSync('skopeo', ['copy', '--quiet', `oci:${layout}:test`, `oci-archive:${oa}:test`], { stdio: 'ignore' });
    execFileSync('skopeo', ['copy', '--quiet', `oci:${layout}:test`, `docker-archive:${da}:test/img:v1`], {
      stdio: 'ignore',
    });
    const fromLayout = await pull(`oci:${layout}:test`, { cacheDir });
    const fromOci = await pull(`oci-archive:${oa}:test`, { cacheDir });
    const fromDocker = await pull(`docker-archive:${da}:test/img:v1`, { cacheDir });
    expect(fromOci.digest).toBe(fromLayout.digest);
    expect(tree(fromDocker.path)).toBe(tree(fromLayout.path));
    expect(fs.readdirSync(path.join(cacheDir, 'tmp'))).toEqual([]);
    // Rewrite one layer inside the docker archive: its diff_id no longer matches.
    const x = path.join(s.dir, 'x');
    fs.mkdirSync(x);
    execFileSync('tar', ['xf', da, '-C', x]);
    const manifest = JSON.parse(fs.readFileSync(path.join(x, 'manifest.json'), 'utf8'))[0];
    fs.appendFileSync(path.join(x, manifest.Layers[1]), Buffer.alloc(1024));
    const bad = path.join(s.dir, 'bad.tar');
    execFileSync('tar', ['cf', bad, '-C', x, '.']);
    await expect(pull(`docker-archive:${bad}`, { cacheDir: path.join(s.dir, 'c-bad') })).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_DIGEST',
    });
    expect(listImages(path.join(s.dir, 'c-bad'))).toEqual([]);
  });

  test('archive members that are symlinks leading out of the archive are refused, and the target bytes land nowhere', async () => {
    const secret = path.join(s.dir, 'docker-config.json');
    fs.writeFileSync(secret, '{"auths":{"registry.example":{"auth":"c2VjcmV0LXRva2Vu"}}}\n', { mode: 0o600 });
    const da = path.join(s.dir, 'd.tar');
    execFileSync('skopeo', ['copy', '--quiet', `oci:${layout}:test`, `docker-archive:${da}:test/img:v1`], {
      stdio: 'ignore',
    });
    const x = path.join(s.dir, 'x');
    fs.mkdirSync(x);
    execFileSync('tar', ['xf', da, '-C', x]);
    const manifest = JSON.parse(fs.readFileSync(path.join(x, 'manifest.json'), 'utf8'))[0] as { Config: string };
    fs.rmSync(path.join(x, manifest.Config));
    fs.symlinkSync(secret, path.join(x, manifest.Config));
    const bad = path.join(s.dir, 'bad.tar');
    execFileSync('tar', ['cf', bad, '-C', x, '.']);
    const badCache = path.join(s.dir, 'c-link');
    await expect(pull(`docker-archive:${bad}`, { cacheDir: badCache })).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_UNSAFE_ENTRY',
      message: expect.stringContaining('leads out of the archive'),
    });
    // An OCI archive whose index.json points at the same file.
    const oa = path.join(s.dir, 'o.tar');
    execFileSync('skopeo', ['copy', '--quiet', `oci:${layout}:test`, `oci-archive:${oa}:test`], { stdio: 'ignore' });
    const y = path.join(s.dir, 'y');
    fs.mkdirSync(y);
    execFileSync('tar', ['xf', oa, '-C', y]);
    fs.rmSync(path.join(y, 'index.json'));
    fs.symlinkSync(secret, path.join(y, 'index.json'));
    const badOci = path.join(s.dir, 'bad-oci.tar');
    execFileSync('tar', ['cf', badOci, '-C', y, '.']);
    await expect(pull(`oci-archive:${badOci}:test`, { cacheDir: badCache })).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_UNSAFE_ENTRY',
    });
    const everything = execFileSync('sh', ['-c', `cat $(find ${badCache} -type f) 2>/dev/null; true`]);
    expect(everything.includes('c2VjcmV0LXRva2Vu')).toBe(false);
  });

  test("what a killed pull left (temp tree, .part blob) is swept by the next cold pull; a live pull's files are kept", async () => {
    // A pid that surely belongs to no process any more: a child that ran and was reaped.
    const dead = spawnSync('true').pid;
    const hex = 'ab'.repeat(32);
    const tmp = path.join(cacheDir, 'tmp');
    const blobs = path.join(cacheDir, 'blobs', 'sha256');
    fs.mkdirSync(path.join(tmp, `x-${dead}-dead`, 'rootfs', 'usr'), { recursive: true });
    fs.writeFileSync(path.join(tmp, `x-${dead}-dead`, 'rootfs', 'usr', 'big'), Buffer.alloc(4096));
    fs.mkdirSync(path.join(tmp, `x-${process.pid}-live`), { recursive: true });
    fs.mkdirSync(blobs, { recursive: true });
    fs.writeFileSync(path.join(blobs, `${hex}.${dead}.k3j.part`), 'partial');
    fs.writeFileSync(path.join(blobs, `${hex}.${process.pid}.k3j.part`), 'in progress');
    const r = await pull(`oci:${layout}:test`, { cacheDir });
    expect(r.fromCache).toBe(false);
    expect(fs.readdirSync(tmp)).toEqual([`x-${process.pid}-live`]);
    expect(fs.readdirSync(blobs).filter((n) => n.endsWith('.part'))).toEqual([`${hex}.${process.pid}.k3j.part`]);
  });

  test('gc removes unreferenced entries and abandoned temp dirs; purge removes everything', async () => {
    await pull(`oci:${layout}:test`, { cacheDir });
    fs.mkdirSync(path.join(cacheDir, 'tmp', 'x-999999-dead'), { recursive: true });
    fs.writeFileSync(path.join(cacheDir, 'refs.json'), '{}');
    const removed = await gcImages(cacheDir);
    expect(removed).toContain('tmp/x-999999-dead');
    expect(listImages(cacheDir)).toEqual([]);
    image.purge(cacheDir);
    expect(fs.existsSync(cacheDir)).toBe(false);
  });
});
