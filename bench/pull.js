#!/usr/bin/env node
// Image pull benchmark against a local docker-registry (Debian's distribution 2.8) on 127.0.0.1:
// a generated image with one ~50 MB gzip layer, pushed with skopeo. Measured in the same run:
//   - GNU `tar xzf` of the same layer blob (baseline)
//   - `skopeo copy` + `umoci raw unpack` (what a user might pick instead)
//   - node-microvm cold pull + extract (in a child process, for its peak RSS), and warm ref hits
// Prints a table; asserts nothing.   Usage: node bench/pull.js [runs=6]   (after scripts/setup.sh)
// BENCH_VERBOSE=1 also prints every run's numbers.
'use strict';
const { execFileSync, spawn, spawnSync } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const { root, main, median, small } = require('./common');

const runs = Number(process.argv[2] || 6);
const FILES = small ? 150 : 1500; // ~50 MB of gzip layer (~5 MB in the smoke configuration)
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'microvm-pull-bench-'));
const ms = (t) => Number(t) / 1e6;
const now = () => process.hrtime.bigint();

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
  });
}

let reg;
main(
  async () => {
    // 1. A tree whose gzip layer is ~50 MB: half random bytes, half text.
    const tree = path.join(work, 'tree');
    for (let i = 0; i < FILES; i++) {
      const d = path.join(tree, `d${i % 50}`);
      fs.mkdirSync(d, { recursive: true });
      const random = crypto.randomBytes(32 * 1024);
      const text = Buffer.from(`line ${i} of some log-like text with numbers ${i * 7}\n`.repeat(900));
      fs.writeFileSync(path.join(d, `f${i}`), Buffer.concat([random, text]));
    }
    const layout = path.join(work, 'layout');
    execFileSync('bash', [path.join(root, 'scripts', 'make-test-layout.sh'), tree, layout, 'bench'], {
      stdio: 'ignore',
    });
    const index = JSON.parse(fs.readFileSync(path.join(layout, 'index.json'), 'utf8'));
    const manifest = JSON.parse(
      fs.readFileSync(path.join(layout, 'blobs/sha256', index.manifests[0].digest.split(':')[1]), 'utf8'),
    );
    const layerBlobs = manifest.layers.map((l) => path.join(layout, 'blobs/sha256', l.digest.split(':')[1]));
    const layerBytes = manifest.layers.reduce((n, l) => n + l.size, 0);

    // 2. A registry with the image.
    const port = await freePort();
    fs.mkdirSync(path.join(work, 'storage'));
    fs.writeFileSync(
      path.join(work, 'reg.yml'),
      `version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: ${path.join(work, 'storage')}\nhttp:\n  addr: 127.0.0.1:${port}\n`,
    );
    reg = spawn('docker-registry', ['serve', path.join(work, 'reg.yml')], { stdio: 'ignore' });
    let up = false;
    for (let i = 0; i < 400 && !up; i++) {
      up = await fetch(`http://127.0.0.1:${port}/v2/`).then(
        (r) => r.ok,
        () => false,
      );
      if (!up) await new Promise((r) => setTimeout(r, 25));
    }
    if (!up) throw new Error(`docker-registry did not answer on 127.0.0.1:${port} within 10 s`);
    const ref = `127.0.0.1:${port}/bench/img:v1`;
    execFileSync('skopeo', ['copy', '--quiet', '--dest-tls-verify=false', `oci:${layout}:bench`, `docker://${ref}`], {
      stdio: 'ignore',
    });

    const rows = { tar: [], skopeoUmoci: [], cold: [], rss: [] };
    // The three methods take turns going first (a run's first writer meets the least leftover
    // writeback from the one before); each starts after a sync.
    const methods = {
      tar(r) {
        const out = path.join(work, `tar-${r}`);
        fs.mkdirSync(out);
        const t = now();
        for (const b of layerBlobs) execFileSync('tar', ['xzf', b, '-C', out]);
        rows.tar.push(ms(now() - t));
        return [out];
      },
      skopeoUmoci(r) {
        const t = now();
        execFileSync(
          'skopeo',
          ['copy', '--quiet', '--src-tls-verify=false', `docker://${ref}`, `oci:${path.join(work, `sk-${r}`)}:x`],
          { stdio: 'ignore' },
        );
        execFileSync(
          'umoci',
          [
            'raw',
            'unpack',
            ...(process.getuid() === 0 ? [] : ['--rootless']),
            '--image',
            `${path.join(work, `sk-${r}`)}:x`,
            path.join(work, `um-${r}`),
          ],
          { stdio: 'ignore' },
        );
        rows.skopeoUmoci.push(ms(now() - t));
        return [path.join(work, `sk-${r}`), path.join(work, `um-${r}`)];
      },
      cold(r) {
        // node-microvm, cold, in a child for its peak RSS (timed from after the package loaded)
        const script = `const m=require(${JSON.stringify(root)});const t=process.hrtime.bigint();m.pull(${JSON.stringify(ref)},{cacheDir:${JSON.stringify(path.join(work, `cache-${r}`))}}).then(()=>{console.log(JSON.stringify({ms:Number(process.hrtime.bigint()-t)/1e6,rss:process.resourceUsage().maxRSS}))})`;
        const child = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8' });
        if (child.status !== 0) throw new Error(`the cold pull failed (exit ${child.status}): ${child.stderr}`);
        const res = JSON.parse(child.stdout);
        rows.cold.push(res.ms);
        rows.rss.push(res.rss / 1024);
        return [];
      },
    };
    const order = Object.keys(methods);
    for (let r = 0; r < runs; r++) {
      const trash = [];
      for (let k = 0; k < order.length; k++) {
        execFileSync('sync');
        trash.push(...methods[order[(r + k) % order.length]](r));
      }
      for (const d of trash) fs.rmSync(d, { recursive: true, force: true });
    }
    // Warm: the ref index answers with no network.
    const m = require(root);
    const warm = [];
    for (let i = 0; i < 20; i++) {
      const t = now();
      await m.pull(ref, { cacheDir: path.join(work, 'cache-0') });
      warm.push(ms(now() - t));
    }
    if (process.env.BENCH_VERBOSE) console.log(JSON.stringify(rows));
    const tarMs = median(rows.tar);
    const suMs = median(rows.skopeoUmoci);
    const coldMs = median(rows.cold);
    console.log(
      `Image pull, one ${(layerBytes / 1e6).toFixed(1)} MB gzip layer, local docker-registry, ${runs} runs (median), ${os.cpus().length} CPUs`,
    );
    console.log('| method | ms | vs GNU tar | vs skopeo+umoci |');
    console.log('|---|---:|---:|---:|');
    console.log(`| GNU tar xzf of the blob (baseline) | ${tarMs.toFixed(0)} | 1.00x | ${(tarMs / suMs).toFixed(2)}x |`);
    console.log(`| skopeo copy + umoci raw unpack | ${suMs.toFixed(0)} | ${(suMs / tarMs).toFixed(2)}x | 1.00x |`);
    console.log(
      `| node-microvm pull, cold (fetch + verify + extract + store) | ${coldMs.toFixed(0)} | ${(coldMs / tarMs).toFixed(2)}x | ${(coldMs / suMs).toFixed(2)}x |`,
    );
    console.log(`| node-microvm pull, warm (ref index hit, 20 runs) | ${median(warm).toFixed(2)} | | |`);
    console.log(`\nnode-microvm cold pull peak RSS: ${median(rows.rss).toFixed(0)} MiB`);
  },
  () => {
    reg?.kill('SIGTERM');
    fs.rmSync(work, { recursive: true, force: true });
  },
);
