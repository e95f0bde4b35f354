#!/usr/bin/env bash
# The test command: from a fresh clone to a summary line "N passed, N failed, N skipped".
# Installs what the tests need (scripts/setup.sh), then typechecks and runs jest.
set -uo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh || { echo "0 passed, 1 failed"; exit 1; }

# The linters (prettier, typescript-eslint, clang-format) count as one check in the summary.
lint_failed=0
npm run --silent lint || { echo "lint: FAILED (npm run lint; npm run format fixes the formatting)"; lint_failed=1; }

mkdir -p .test-artifacts
report=.test-artifacts/jest-report.json
rm -f "$report"
MICROVM_TEST_LIBKRUNFW_DIR="$(bash scripts/fetch-libkrunfw.sh)" npm test -- --json --outputFile="$report"
status=$?

node - "$report" "$status" "$lint_failed" <<'JS'
const fs = require('node:fs');
const [file, status, lintFailed] = process.argv.slice(2);
let r;
try {
  r = JSON.parse(fs.readFileSync(file, 'utf8'));
} catch {
  // Typecheck or build failed before jest wrote a report.
  console.log(`0 passed, ${1 + Number(lintFailed)} failed`);
  process.exit(1);
}
// A suite that failed to run (syntax error, failing hook) has no test results: count it as a failure.
const brokenSuites = r.testResults.filter((s) => s.status === 'failed' && s.assertionResults.every((a) => a.status !== 'failed')).length;
const skipped = [];
for (const s of r.testResults) {
  for (const a of s.assertionResults) {
    if (a.status === 'pending' || a.status === 'skipped' || a.status === 'todo') skipped.push(a.fullName);
  }
}
if (skipped.length) {
  console.log('Skipped (each title names the missing capability):');
  for (const t of skipped) console.log(`  - ${t}`);
}
const failed = r.numFailedTests + brokenSuites + Number(lintFailed);
console.log(`${r.numPassedTests} passed, ${failed} failed, ${skipped.length} skipped`);
process.exit(failed > 0 || Number(status) !== 0 ? 1 : 0);
JS
