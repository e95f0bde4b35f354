// What the VM bench scripts share: the package, a scratch directory with the test image (busybox-
// static + dropbear, scripts/make-test-image.sh) built in it, and the statistics they print.
'use strict';
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const root = path.resolve(__dirname, '..');

/** The built package, a fresh `work` directory (removed by `done()`), and the test image in it. */
function setup(name) {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), `microvm-${name}-bench-`));
  const image = path.join(work, 'image');
  execFileSync('bash', [path.join(root, 'scripts', 'make-test-image.sh'), image], { stdio: 'ignore' });
  return { root, m: require(root), work, image, done: () => fs.rmSync(work, { recursive: true, force: true }) };
}

const sorted = (xs) => [...xs].sort((a, b) => a - b);
const median = (xs) => sorted(xs)[Math.floor((xs.length - 1) / 2)];
const p90 = (xs) => sorted(xs)[Math.min(xs.length - 1, Math.floor((xs.length - 1) * 0.9))];

module.exports = { setup, median, p90 };
