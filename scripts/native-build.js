#!/usr/bin/env node
// Builds the native addon and the runner, offline.
//
//   node scripts/native-build.js gyp       node-gyp rebuild          -> build/Release/
//   node scripts/native-build.js cmake [dir]  cmake-js (same sources) -> build-cmake/ (or dir)
//   node scripts/native-build.js prebuild  prebuildify --napi --strip, plus the stripped runner
//                                          -> prebuilds/<platform>-<arch>/
//
// Node's headers: node-gyp and prebuildify would download them unless told where they are. We pass
// the directory of the running Node (its include/node holds node_api.h), so no build needs network.
// npm 11 warns about the `nodedir` npmrc key and will stop honouring it, hence doing it here.
'use strict';
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');

function nodeDir() {
  const candidates = [process.env.npm_config_nodedir, path.resolve(path.dirname(process.execPath), '..')];
  for (const dir of candidates) {
    if (dir && fs.existsSync(path.join(dir, 'include', 'node', 'node_api.h'))) return dir;
  }
  return undefined;
}

function nodeGypScript() {
  const candidates = [];
  try {
    candidates.push(require.resolve('node-gyp/bin/node-gyp.js', { paths: [root] }));
  } catch {
    /* not a dev checkout */
  }
  if (process.env.npm_config_node_gyp) candidates.push(process.env.npm_config_node_gyp);
  // The node-gyp that npm bundles.
  candidates.push(
    path.resolve(
      path.dirname(process.execPath),
      '..',
      'lib',
      'node_modules',
      'npm',
      'node_modules',
      'node-gyp',
      'bin',
      'node-gyp.js',
    ),
  );
  return candidates.find((c) => fs.existsSync(c));
}

function run(cmd, args, env) {
  const started = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit', env });
  if (r.error) throw r.error;
  if (r.status !== 0) {
    console.error(`native-build: ${path.basename(cmd)} ${args[0] ?? ''} failed with exit code ${r.status}`);
    process.exit(r.status || 1);
  }
  return Number(process.hrtime.bigint() - started) / 1e9;
}

function buildEnv() {
  const env = { ...process.env };
  const dir = nodeDir();
  if (dir) env.npm_config_nodedir = dir;
  else
    console.warn(
      'native-build: Node headers (include/node/node_api.h) not found next to this Node; node-gyp may try to download them',
    );
  // Keep npm 11 from warning about the npmrc key on every child invocation.
  return env;
}

const mode = process.argv[2] || 'gyp';
const env = buildEnv();
const jobs = String(Math.max(1, require('node:os').availableParallelism?.() ?? 2));

if (mode === 'gyp') {
  const gyp = nodeGypScript();
  if (!gyp) {
    console.error('native-build: node-gyp not found (install dev dependencies, or use npm which bundles it)');
    process.exit(1);
  }
  const args = [gyp, 'rebuild', '--release', '-j', jobs];
  if (env.npm_config_nodedir) args.push(`--nodedir=${env.npm_config_nodedir}`);
  const secs = run(process.execPath, args, env);
  console.log(`native-build: node-gyp build done in ${secs.toFixed(1)} s -> build/Release`);
} else if (mode === 'cmake') {
  const cmakeJs = require.resolve('cmake-js/bin/cmake-js', { paths: [root] });
  const out = process.argv[3] || 'build-cmake';
  const secs = run(process.execPath, [cmakeJs, 'rebuild', '--out', out, '--parallel', jobs], env);
  console.log(`native-build: cmake-js build done in ${secs.toFixed(1)} s -> ${out}/`);
} else if (mode === 'prebuild') {
  const prebuildify = require.resolve('prebuildify/bin.js', { paths: [root] });
  const gyp = nodeGypScript();
  if (gyp) env.PREBUILD_NODE_GYP = gyp;
  const secs = run(process.execPath, [prebuildify, '--napi', '--strip'], env);
  // prebuildify copies only .node files; the runner, the guest init and the two guards ship beside the addon.
  const dest = path.join(root, 'prebuilds', `${process.platform}-${process.arch}`);
  fs.mkdirSync(dest, { recursive: true });
  for (const exe of ['microvm-runner', 'microvm-guest-init', 'microvm-fsguard.so', 'microvm-netguard.so']) {
    const out = path.join(dest, exe);
    fs.copyFileSync(path.join(root, 'build', 'Release', exe), out);
    fs.chmodSync(out, 0o755);
    run('strip', ['--strip-all', out], env);
  }
  console.log(`native-build: prebuild done in ${secs.toFixed(1)} s -> ${path.relative(root, dest)}`);
} else {
  console.error(`native-build: unknown mode ${mode} (gyp, cmake, prebuild)`);
  process.exit(64);
}
