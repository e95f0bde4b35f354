/**
 * microvm.VirtioFSOverrideStat (lib/rootfs/override-stat.ts): what an unprivileged run made gets
 * root's owner in libkrun's guest through user.containers.override_stat; image entries keep theirs.
 * The pipeline case runs run() as an unprivileged user (setpriv) over the libkrun RECORDING ABI
 * TEST DOUBLE, since nothing here can boot real libkrun.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { addon, packageRoot } from '../lib/native';
import { applyOverrideStat, overrideStatApplies } from '../lib/rootfs/override-stat';
import { libkrunBackend, qemuBackend } from '../lib';
import { doubleDir, firmwareDir, scratch } from './helpers';

const isRoot = process.getuid?.() === 0;

test('applies to libkrun on a copied tree when the host user is not root, nowhere else', () => {
  const libkrun = libkrunBackend().needsOverrideStat === true;
  const qemu = qemuBackend().needsOverrideStat === true;
  expect(overrideStatApplies(libkrun, 'copy', 1000)).toBe(true);
  expect(overrideStatApplies(libkrun, 'reflink', 1000)).toBe(true);
  expect(overrideStatApplies(libkrun, 'overlay', 1000)).toBe(false); // the runner's userns maps the user to root
  expect(overrideStatApplies(libkrun, 'copy', 0)).toBe(false); // extraction chowned for real
  expect(overrideStatApplies(qemu, 'copy', 1000)).toBe(false);
});

(isRoot ? test : test.skip)(
  `entries the host user owns without an override get "0:0:<mode>"; others, links and existing overrides stay${isRoot ? '' : ' [skipped: needs root to make a tree with several owners]'}`,
  async () => {
    const s = scratch('microvm-ovr-');
    try {
      const root = path.join(s.dir, 'root');
      const uid = 4242;
      fs.mkdirSync(path.join(root, 'etc', 'deep'), { recursive: true });
      fs.writeFileSync(path.join(root, 'etc', 'deep', 'made-by-hook'), 'x', { mode: 0o750 });
      fs.writeFileSync(path.join(root, 'from-image'), 'y');
      fs.writeFileSync(path.join(root, 'someone-else'), 'z');
      fs.symlinkSync('/etc/passwd', path.join(root, 'link'));
      fs.chmodSync(root, 0o711);
      for (const p of ['', 'etc', 'etc/deep', 'etc/deep/made-by-hook', 'from-image'])
        fs.chownSync(path.join(root, p), uid, uid);
      fs.lchownSync(path.join(root, 'link'), uid, uid);
      fs.chownSync(path.join(root, 'someone-else'), 7, 7);
      fs.chmodSync(path.join(root, 'etc', 'deep', 'made-by-hook'), 0o4750); // after chown, which clears it
      expect(addon().setOverrideStat(path.join(root, 'from-image'), '1000:1000:0640')).toBeNull(); // as extraction wrote it
      const n = await applyOverrideStat(root, uid);
      expect(n).toBe(4);
      const get = (p: string): string | null => addon().getOverrideStat(path.join(root, p));
      expect(get('')).toBe('0:0:0711');
      expect(get('etc')).toBe('0:0:0755');
      expect(get('etc/deep/made-by-hook')).toBe('0:0:04750');
      expect(get('from-image')).toBe('1000:1000:0640');
      expect(get('someone-else')).toBeNull();
      expect(get('link')).toBeNull();
      expect(addon().setOverrideStat(path.join(root, 'link'), '0:0:0777')).toBe('ELOOP'); // never through a link
      expect(addon().getOverrideStat('/etc/passwd')).toBeNull();
      expect(await applyOverrideStat(root, uid)).toBe(0); // a second pass finds nothing to do
      const ac = new AbortController();
      ac.abort();
      await expect(applyOverrideStat(root, uid, ac.signal)).rejects.toThrow();
    } finally {
      s.cleanup();
    }
  },
);

(isRoot ? test : test.skip)(
  `run() as an unprivileged user on libkrun with a copied rootfs: the stage sits between NetworkStart and VMSpawn, / is root's to the guest${isRoot ? '' : ' [skipped: needs root to switch to an unprivileged user]'}`,
  () => {
    const s = scratch('microvm-ovr-run-');
    try {
      fs.chmodSync(s.dir, 0o755);
      const image = path.join(s.dir, 'image');
      fs.mkdirSync(path.join(image, 'etc'), { recursive: true });
      fs.writeFileSync(path.join(image, 'etc', 'passwd'), 'root:x:0:0:root:/root:/bin/sh\n');
      for (const p of [s.dir, image, path.join(image, 'etc'), path.join(image, 'etc', 'passwd')])
        fs.chownSync(p, 65534, 65534);
      const script = path.join(s.dir, 'run.js');
      fs.writeFileSync(
        script,
        `const m = require(${JSON.stringify(packageRoot)});
const { addon } = require(${JSON.stringify(path.join(packageRoot, 'dist', 'native.js'))});
const { BasicTracerProvider, SimpleSpanProcessor, InMemorySpanExporter } = require(${JSON.stringify(require.resolve('@opentelemetry/sdk-trace-base'))});
(async () => {
  const e = new InMemorySpanExporter();
  const vm = await m.run('ovr', {
    rootfsPath: ${JSON.stringify(image)}, dataDir: ${JSON.stringify(path.join(s.dir, 'data'))},
    initOverride: ['/bin/true'], preflight: [], cloneStrategies: ['copy'], agent: false,
    backend: m.libkrunBackend({
      runtime: { libDir: ${JSON.stringify(doubleDir())}, pkgConfig: false, systemDirs: [], loaderSearch: false },
      firmware: { dir: ${JSON.stringify(firmwareDir())}, systemDirs: [], loaderSearch: false },
      env: { PATH: process.env.PATH },
    }),
    tracerProvider: new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(e)] }),
  });
  const root = vm.rootfsPath;
  const out = { uid: process.getuid(), root: addon().getOverrideStat(root), passwd: addon().getOverrideStat(root + '/etc/passwd'),
    spans: e.getFinishedSpans().map((x) => [x.name, x.attributes['microvm.virtiofs.override_stat.entries'] ?? null]) };
  await vm.remove();
  console.log(JSON.stringify(out));
})().catch((err) => { console.error(err); process.exit(1); });
`,
      );
      const r = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, script], {
        encoding: 'utf8',
        timeout: 60_000,
        env: { PATH: process.env.PATH, HOME: s.dir },
      });
      expect(r.stderr).toBe('');
      const out = JSON.parse(r.stdout) as { uid: number; root: string; passwd: string; spans: [string, unknown][] };
      expect(out.uid).toBe(65534);
      expect(out.root).toBe('0:0:0755');
      expect(out.passwd).toBe('0:0:0644');
      const names = out.spans.map(([n]) => n);
      const at = names.indexOf('microvm.VirtioFSOverrideStat');
      expect(at).toBeGreaterThan(names.indexOf('microvm.NetworkStart'));
      expect(at).toBeLessThan(names.indexOf('microvm.backend.ResolveRuntime')); // VMSpawn's first child
      expect(out.spans[at][1]).toBeGreaterThanOrEqual(3); // /, /etc, /etc/passwd at least
    } finally {
      s.cleanup();
    }
  },
);
