// What the bench scripts share: the package, a scratch directory with the test image (busybox-
// static + dropbear, scripts/make-test-image.sh) built in it, the statistics they print, and how
// they fail: a bench that measured nothing, or whose run failed, says so and exits 1 (never a table
// of NaN and exit 0). MICROVM_BENCH_SMALL=1 is the smoke configuration CI runs (test/bench.test.ts):
// each bench shrinks its fixed sizes so that it takes seconds.
'use strict';
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const root = path.resolve(__dirname, '..');

/** The smoke configuration: every bench's fixed sizes shrunk (CI runs each bench so). */
const small = process.env.MICROVM_BENCH_SMALL === '1';

/** The built package, a fresh `work` directory (removed by `done()`), and the test image in it. */
function setup(name) {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), `microvm-${name}-bench-`));
  const image = path.join(work, 'image');
  execFileSync('bash', [path.join(root, 'scripts', 'make-test-image.sh'), image], { stdio: 'ignore' });
  return { root, m: require(root), work, image, done: () => fs.rmSync(work, { recursive: true, force: true }) };
}

/** The samples, or a thrown error when there are none or one is not a finite number. */
function measured(xs, label = 'a measure') {
  if (!Array.isArray(xs) || xs.length === 0) throw new Error(`measured nothing for ${label}`);
  const bad = xs.find((x) => typeof x !== 'number' || !Number.isFinite(x));
  if (bad !== undefined) throw new Error(`a sample of ${label} is not a number: ${String(bad)}`);
  return xs;
}

/** The p-quantile (0..1, nearest rank below) of samples that must exist (see {@link measured}). */
function pct(xs, p, label) {
  const s = [...measured(xs, label)].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((s.length - 1) * p))];
}
const median = (xs, label) => pct(xs, 0.5, label);
const p90 = (xs, label) => pct(xs, 0.9, label);

/**
 * Runs the bench's body; a rejection (a run that failed, nothing measured) prints the reason and
 * exits 1. `cleanup` runs either way.
 */
function main(body, cleanup = () => undefined) {
  body().then(
    () => cleanup(),
    (err) => {
      try {
        cleanup();
      } finally {
        console.error(`bench ${path.basename(process.argv[1] ?? '-')} FAILED: ${err?.stack ?? err}`);
        process.exit(1);
      }
    },
  );
}

module.exports = { root, small, setup, measured, pct, median, p90, main };
