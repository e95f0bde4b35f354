#!/usr/bin/env node
// npm install hook: use a prebuild (or an existing local build) when one loads here, else build.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.resolve(__dirname, '..');

function usable() {
  try {
    const load = require('node-gyp-build');
    const file = load.resolve(root);
    const runner = path.join(path.dirname(file), 'microvm-runner');
    require(file);
    return fs.existsSync(runner) ? file : undefined;
  } catch {
    return undefined;
  }
}

const found = usable();
if (found) {
  console.log(`node-microvm: using ${path.relative(root, found)}`);
  process.exit(0);
}
const r = spawnSync(process.execPath, [path.join(__dirname, 'native-build.js'), 'gyp'], {
  cwd: root,
  stdio: 'inherit',
});
process.exit(r.status ?? 1);
