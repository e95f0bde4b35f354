/**
 * Jest global setup: builds the C test doubles and makes the real libkrunfw available, then
 * publishes their locations to the test workers through environment variables:
 *
 * - MICROVM_TEST_LIBKRUN_DOUBLE_DIR: holds libkrun.so.1, the libkrun RECORDING ABI TEST DOUBLE
 * - MICROVM_TEST_WRONG_ABI_FW_DIR:   holds libkrunfw.so.5, the WRONG-ABI libkrunfw TEST DOUBLE
 * - MICROVM_TEST_LIBKRUNFW_DIR:      holds the real libkrunfw.so.5 (Debian sid's libkrunfw5),
 *                                    fetched by scripts/fetch-libkrunfw.sh when not present
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

const root = path.resolve(__dirname, '..');
const artifacts = path.join(root, '.test-artifacts');

function buildSharedObject(source: string, outDir: string, soname: string, extraLibs: string[]): string {
  fs.mkdirSync(outDir, { recursive: true });
  const out = path.join(outDir, soname);
  const src = path.join(root, source);
  if (!fs.existsSync(out) || fs.statSync(out).mtimeMs < fs.statSync(src).mtimeMs) {
    const tmp = `${out}.${process.pid}.tmp`;
    execFileSync(
      'cc',
      [
        '-shared',
        '-fPIC',
        '-O2',
        '-Wall',
        '-Wextra',
        '-Werror',
        '-Wno-unused-parameter',
        '-fvisibility=hidden',
        `-Wl,-soname,${soname}`,
        '-o',
        tmp,
        src,
        ...extraLibs,
      ],
      {
        stdio: 'inherit',
      },
    );
    fs.renameSync(tmp, out);
  }
  return outDir;
}

export default function globalSetup(): void {
  process.env.MICROVM_TEST_LIBKRUN_DOUBLE_DIR = buildSharedObject(
    'test/fixtures/libkrun-recording-double/libkrun_recording_double.c',
    path.join(artifacts, 'libkrun-recording-double'),
    'libkrun.so.1',
    ['-ldl', '-lpthread'],
  );
  process.env.MICROVM_TEST_WRONG_ABI_FW_DIR = buildSharedObject(
    'test/fixtures/libkrunfw-wrong-abi-double/libkrunfw_wrong_abi_double.c',
    path.join(artifacts, 'libkrunfw-wrong-abi-double'),
    'libkrunfw.so.5',
    [],
  );
  // In-process tests steer the double through per-pid control files here (see helpers.ts).
  const control = path.join(artifacts, 'double-control');
  fs.mkdirSync(control, { recursive: true });
  process.env.KRUN_DOUBLE_CONTROL_DIR = control;
  // A small guest image (busybox-static + dropbear) for the QEMU end-to-end tests, and the same
  // tree as a two-layer OCI image layout (umoci). A missing tool (the script exits 69) is a missing
  // capability: the tests that need it skip and say which tool. Any other failure to build them
  // fails the whole run here, with the script's own error.
  const image = path.join(artifacts, 'test-image');
  const layout = path.join(artifacts, 'test-layout');
  const build = (script: string, args: string[], missingVar: string): void => {
    try {
      execFileSync('bash', [path.join(root, 'scripts', script), ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    } catch (err) {
      const e = err as { status?: number; stderr?: Buffer };
      const said = String(e.stderr ?? err).trim();
      if (e.status === 69) process.env[missingVar] = said;
      else throw new Error(`test fixture: scripts/${script} failed (exit ${e.status ?? '?'}):\n${said}`);
    }
  };
  if (!fs.existsSync(image)) build('make-test-image.sh', [image], 'MICROVM_TEST_IMAGE_MISSING');
  if (fs.existsSync(image)) process.env.MICROVM_TEST_IMAGE = image;
  if (fs.existsSync(image) && !fs.existsSync(layout))
    build('make-test-layout.sh', [image, layout, 'test'], 'MICROVM_TEST_LAYOUT_MISSING');
  if (fs.existsSync(layout)) process.env.MICROVM_TEST_LAYOUT = layout;
  else process.env.MICROVM_TEST_LAYOUT_MISSING ??= process.env.MICROVM_TEST_IMAGE_MISSING;
  if (!process.env.MICROVM_TEST_LIBKRUNFW_DIR) {
    const dir = execFileSync('bash', [path.join(root, 'scripts', 'fetch-libkrunfw.sh')], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'inherit'],
    }).trim();
    process.env.MICROVM_TEST_LIBKRUNFW_DIR = dir;
  }
}
