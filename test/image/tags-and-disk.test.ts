/**
 * Tags that move and disk that is given back: pull policies against an OCI layout re-tagged by
 * umoci (a real tool; nobody here wrote its output), the tag history, the size cap (least recently
 * used first, never an image a live VM runs on), and the sweep of VM directories left by killed
 * processes.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { evictImages, gcImages, listImages, pruneVms, pull, SPAN } from '../../lib';
import { processStartTime } from '../../lib/state';
import { layoutSkipReason, scratch } from '../helpers';

const layout = process.env.MICROVM_TEST_LAYOUT;
const skip = layoutSkipReason();

let s: ReturnType<typeof scratch>;
let cacheDir: string;
let copy: string;
beforeEach(() => {
  s = scratch('microvm-tags-');
  cacheDir = path.join(s.dir, 'data', 'images');
  copy = path.join(s.dir, 'layout');
  if (layout) execFileSync('cp', ['-a', layout, copy]);
});
afterEach(() => s.cleanup());

/** Re-tags `test` in the copied layout to a new image (a config change: a new manifest digest). */
function retag(env: string): void {
  execFileSync('umoci', ['config', '--image', `${copy}:test`, '--config.env', env], { stdio: 'ignore' });
}

/** A VM record as run() writes it, for a VM that is this very process (so: "alive"). */
function liveVm(dataRoot: string, name: string, imageDigest: string): void {
  const dir = path.join(dataRoot, 'vms', name);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(
    path.join(dir, 'state.json'),
    JSON.stringify({
      id: name,
      name,
      backend: 'qemu',
      pid: process.pid,
      pidStartTime: processStartTime(process.pid),
      executable: fs.readlinkSync('/proc/self/exe'),
      image: 'x',
      cpus: 1,
      memoryMiB: 64,
      ports: [],
      rootfsPath: '/x',
      cloneStrategy: 'overlay',
      createdAt: new Date().toISOString(),
      imageDigest,
    }),
  );
}

(skip ? describe.skip : describe)(`tags that move${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  test("pull() re-resolves a tag: after a re-tag it gets the new image and says which digest the tag named before; 'missing' keeps the cached one; 'never' only serves the cache", async () => {
    const ref = `oci:${copy}:test`;
    const first = await pull(ref, { cacheDir });
    expect(first.previousDigest).toBeUndefined();
    const index = fs.readFileSync(path.join(copy, 'index.json'));
    retag('RETAGGED=1');
    const kept = await pull(ref, { cacheDir, policy: 'missing' });
    expect(kept).toMatchObject({ digest: first.digest, fromCache: true });
    const moved = await pull(ref, { cacheDir });
    expect(moved.digest).not.toBe(first.digest);
    expect(moved).toMatchObject({ fromCache: false, previousDigest: first.digest });
    expect(moved.config.config?.Env).toContain('RETAGGED=1');
    // Now 'missing' and 'never' serve the new digest.
    expect((await pull(ref, { cacheDir, policy: 'never' })).digest).toBe(moved.digest);
    // History: the old image says which tag named it until when, and what it names now.
    const old = listImages(cacheDir).find((i) => i.digest === first.digest);
    expect(old?.references).toEqual([]);
    expect(old?.formerReferences).toEqual([{ reference: ref, until: expect.any(String), now: moved.digest }]);
    // The tag moved back: the old image is still cached, nothing is extracted.
    fs.writeFileSync(path.join(copy, 'index.json'), index);
    expect(await pull(ref, { cacheDir })).toMatchObject({
      digest: first.digest,
      fromCache: true,
      previousDigest: moved.digest,
    });
    await expect(pull(`oci:${copy}:other`, { cacheDir, policy: 'never' })).rejects.toMatchObject({
      code: 'ERR_MICROVM_IMAGE_NOT_CACHED',
    });
  });

  test('an unchanged tag re-resolved: no extraction (no Extract span), served from the cache', async () => {
    const ref = `oci:${copy}:test`;
    const first = await pull(ref, { cacheDir });
    const exporter = new InMemorySpanExporter();
    const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
    const tracer = provider.getTracer('t');
    await tracer.startActiveSpan('root', async (root) => {
      const again = await pull(ref, {
        cacheDir,
        scope: { tracer, ctx: (await import('@opentelemetry/api')).context.active() },
      });
      root.end();
      expect(again).toMatchObject({ digest: first.digest, fromCache: true });
      expect(again.previousDigest).toBeUndefined();
    });
    const names = exporter.getFinishedSpans().map((x) => x.name);
    expect(names).toContain(SPAN.IMAGE_FETCH);
    expect(names).not.toContain(SPAN.IMAGE_EXTRACT);
    expect(names).toContain('microvm.image.CacheLookup');
    await provider.shutdown();
  });

  test('run() takes pull: missing | always | never and refuses anything else', async () => {
    const { run } = await import('../../lib');
    await expect(run('busybox', { pull: 'sometimes' as never, dataDir: path.join(s.dir, 'd') })).rejects.toThrow(
      /Expected pull to be 'always', 'missing' or 'never'/,
    );
  });
});

(skip ? describe.skip : describe)(`disk given back${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  test('maxCacheBytes: the least recently used image goes, never the one just pulled', async () => {
    const ref = `oci:${copy}:test`;
    const a = await pull(ref, { cacheDir });
    retag('B=1');
    const b = await pull(ref, { cacheDir });
    // a used again (policy missing on a digest-named cache hit is a use): b is now the older use.
    await new Promise((r) => setTimeout(r, 20));
    fs.utimesSync(path.join(cacheDir, 'images', a.digest.split(':')[1], 'image.json'), new Date(), new Date());
    retag('C=1');
    const one = listImages(cacheDir)[0].bytes;
    const c = await pull(ref, { cacheDir, maxCacheBytes: Math.floor(2.5 * one) });
    const left = listImages(cacheDir).map((i) => i.digest);
    expect(left.sort()).toEqual([a.digest, c.digest].sort());
    expect(left).not.toContain(b.digest);
    // A cap below one image keeps the one just pulled.
    const d = await pull(ref, { cacheDir, maxCacheBytes: 1, policy: 'always' });
    expect(listImages(cacheDir).map((i) => i.digest)).toEqual([d.digest]);
  });

  test('gc and the cap never remove an image a live VM runs on; gc then removes it once that VM is gone', async () => {
    const ref = `oci:${copy}:test`;
    const dataRoot = path.join(s.dir, 'data');
    const a = await pull(ref, { cacheDir });
    liveVm(dataRoot, 'busy', a.digest);
    retag('MOVED=1');
    await pull(ref, { cacheDir, maxCacheBytes: 1 });
    expect(listImages(cacheDir).map((i) => i.digest)).toContain(a.digest); // unreferenced now, but in use
    expect(await gcImages(cacheDir)).not.toContain(a.digest.split(':')[1]);
    expect(fs.existsSync(path.join(cacheDir, 'images', a.digest.split(':')[1], 'rootfs'))).toBe(true);
    fs.rmSync(path.join(dataRoot, 'vms', 'busy'), { recursive: true });
    expect(await gcImages(cacheDir)).toContain(a.digest.split(':')[1]);
  });
});

(skip ? describe.skip : describe)(`evict by age${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  test('image.evict(maxAgeMs) removes entries created before the cutoff and their references, keeps newer ones and one a live VM runs on', async () => {
    const ref = `oci:${copy}:test`;
    const a = await pull(ref, { cacheDir });
    retag('B=1');
    const b = await pull(ref, { cacheDir });
    retag('C=1');
    const c = await pull(ref, { cacheDir });
    const age = (digest: string, ms: number): void => {
      const meta = path.join(cacheDir, 'images', digest.split(':')[1], 'image.json');
      const e = JSON.parse(fs.readFileSync(meta, 'utf8'));
      e.createdAt = new Date(Date.now() - ms).toISOString();
      fs.writeFileSync(meta, JSON.stringify(e));
    };
    age(a.digest, 3 * 3600_000);
    age(b.digest, 3 * 3600_000);
    liveVm(path.join(s.dir, 'data'), 'on-b', b.digest);
    const removed = await evictImages(cacheDir, 3600_000);
    expect(removed).toEqual([a.digest]);
    expect(
      listImages(cacheDir)
        .map((i) => i.digest)
        .sort(),
    ).toEqual([b.digest, c.digest].sort());
    // A's reference had moved on already; C's reference stays.
    expect(listImages(cacheDir).find((i) => i.digest === c.digest)?.references).toEqual([ref]);
  });
});

describe('VM directories left behind', () => {
  const deadPid = (): { pid: number; startTime: string } => {
    const r = spawnSync('sh', ['-c', 'echo $$']);
    return { pid: Number(String(r.stdout).trim()), startTime: '1' };
  };
  const make = (root: string, name: string, files: Record<string, unknown>): string => {
    const dir = path.join(root, 'vms', name);
    fs.mkdirSync(dir, { recursive: true });
    for (const [f, v] of Object.entries(files)) fs.writeFileSync(path.join(dir, f), JSON.stringify(v));
    return dir;
  };
  const state = (extra: object): object => ({
    id: 'x',
    name: 'x',
    backend: 'qemu',
    pid: deadPid().pid,
    pidStartTime: '1',
    executable: '/usr/bin/qemu-system-x86_64',
    ...extra,
  });

  test('the sweep removes what a killed run left (run --rm, or a start that never finished) and keeps the rest; prune removes every stopped VM', async () => {
    const root = path.join(s.dir, 'data');
    const me = { pid: process.pid, startTime: processStartTime(process.pid), autoRemove: true };
    make(root, 'rm-killed', { 'owner.json': { ...deadPid(), autoRemove: true }, 'state.json': state({}) });
    make(root, 'start-killed', { 'owner.json': { ...deadPid(), autoRemove: false } });
    make(root, 'stopped-kept', { 'owner.json': { ...deadPid(), autoRemove: false }, 'state.json': state({}) });
    make(root, 'owner-alive', { 'owner.json': me, 'state.json': state({}) });
    make(root, 'old-version', { 'state.json': state({}) });
    make(root, 'no-records', {});
    liveVm(root, 'running', 'sha256:' + '0'.repeat(64));
    expect((await pruneVms(root, false)).sort()).toEqual(['rm-killed', 'start-killed']);
    expect(fs.readdirSync(path.join(root, 'vms')).sort()).toEqual([
      'no-records',
      'old-version',
      'owner-alive',
      'running',
      'stopped-kept',
    ]);
    expect((await pruneVms(root, true)).sort()).toEqual(['old-version', 'stopped-kept']);
    expect(fs.readdirSync(path.join(root, 'vms')).sort()).toEqual(['no-records', 'owner-alive', 'running']);
  });
});
