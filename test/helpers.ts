/** Shared test helpers: fixture locations, scratch directories, the double's call log. */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

function envDir(name: string): string {
  const dir = process.env[name];
  if (!dir) throw new Error(`${name} is not set: run the tests through jest (test/global-setup.ts)`);
  return dir;
}

/** Directory of the libkrun RECORDING ABI TEST DOUBLE (libkrun.so.1). */
export const doubleDir = (): string => envDir('MICROVM_TEST_LIBKRUN_DOUBLE_DIR');
/** Path of the libkrun RECORDING ABI TEST DOUBLE. */
export const doublePath = (): string => path.join(doubleDir(), 'libkrun.so.1');
/** Directory of the real libkrunfw (Debian's libkrunfw5). */
export const firmwareDir = (): string => envDir('MICROVM_TEST_LIBKRUNFW_DIR');
/** Path of the real libkrunfw.so.5. */
export const firmwarePath = (): string => path.join(firmwareDir(), 'libkrunfw.so.5');
/** Directory of the WRONG-ABI libkrunfw TEST DOUBLE. */
export const wrongAbiFirmwareDir = (): string => envDir('MICROVM_TEST_WRONG_ABI_FW_DIR');

/** A fresh scratch directory, removed by the returned cleanup. */
export function scratch(prefix = 'microvm-test-'): { dir: string; cleanup: () => void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  return { dir, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

/** One call recorded by the double. */
export interface RecordedCall {
  fn: string;
  args: Record<string, unknown>;
  ret: number;
  pid: number;
}

/** Reads the double's call log (one JSON object per line). */
export function readCalls(logFile: string): RecordedCall[] {
  if (!fs.existsSync(logFile)) return [];
  return fs
    .readFileSync(logFile, 'utf8')
    .split('\n')
    .filter((l) => l.length > 0)
    .map((l) => JSON.parse(l) as RecordedCall);
}

/** Settings of the double for this process: KRUN_DOUBLE_LOG, KRUN_DOUBLE_FAIL, KRUN_DOUBLE_EXIT_CODE. */
export function controlDouble(settings: Record<string, string | undefined>): void {
  const dir = process.env.KRUN_DOUBLE_CONTROL_DIR;
  if (!dir) throw new Error('KRUN_DOUBLE_CONTROL_DIR is not set: run the tests through jest (test/global-setup.ts)');
  const file = path.join(dir, String(process.pid));
  const lines = Object.entries(settings)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${k}=${v as string}\n`);
  if (lines.length === 0) fs.rmSync(file, { force: true });
  else fs.writeFileSync(file, lines.join(''));
}

/**
 * Points the in-process double's call log at a fresh file for the duration of a test; `fail`
 * injects "krun_fn:errno" failures. (Child processes get the same settings as real env vars.)
 */
export function recordCalls(): {
  file: string;
  calls: () => RecordedCall[];
  fail: (spec: string | undefined) => void;
  done: () => void;
} {
  const s = scratch('microvm-calls-');
  const file = path.join(s.dir, 'calls.jsonl');
  controlDouble({ KRUN_DOUBLE_LOG: file });
  return {
    file,
    calls: () => readCalls(file),
    fail: (spec) => controlDouble({ KRUN_DOUBLE_LOG: file, KRUN_DOUBLE_FAIL: spec }),
    done: () => {
      controlDouble({});
      s.cleanup();
    },
  };
}

/** Whether a process is alive. */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  // A zombie (exited, not yet reaped by whoever inherited it) answers kill(0) but is gone.
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

/**
 * Why real-VM tests cannot run here (undefined when they can): QEMU missing, or the test image
 * (built by test/global-setup.ts) missing, with the reason its build gave.
 */
export function qemuSkipReason(): string | undefined {
  // `npm run mutate` only (jest.mutate.config.js sets it): VM boots per mutant would take hours;
  // the normal test run (CI) boots them.
  if (process.env.MICROVM_MUTATION_RUN === '1') return 'mutation run: real VM boots are left to npm test';
  try {
    execFileSync('qemu-system-x86_64', ['--version'], { stdio: 'ignore' });
  } catch {
    return 'qemu-system-x86_64 is not installed';
  }
  if (!process.env.MICROVM_TEST_IMAGE) return `no test image: ${process.env.MICROVM_TEST_IMAGE_MISSING ?? 'not built'}`;
  return undefined;
}

/**
 * Why the OCI test layout is missing (a tool is not installed; global-setup fails the run on any
 * other error), or undefined when it is there.
 */
export function layoutSkipReason(): string | undefined {
  if (process.env.MICROVM_TEST_LAYOUT) return undefined;
  return `no test layout: ${process.env.MICROVM_TEST_LAYOUT_MISSING ?? 'not built'}`;
}

/**
 * The `microvm` CLI as a child process (deadline `timeout`, default 120 s), with the test
 * libkrunfw; what it printed and its exit status.
 */
/** `microvm run` of the test layout's image on the QEMU backend in `dataDir`: the start of a CLI argument list. */
export function qemuRunArgs(layout: string | undefined, dataDir: string): string[] {
  return ['run', `oci:${layout}:test`, '--data-dir', dataDir, '--backend', 'qemu'];
}

export function runCli(
  args: string[],
  opts: { input?: string; timeout?: number; env?: Record<string, string> } = {},
): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [path.join(__dirname, '..', 'bin', 'microvm.js'), ...args], {
    encoding: 'utf8',
    timeout: opts.timeout ?? 120_000,
    input: opts.input,
    env: { ...process.env, MICROVM_LIBKRUNFW_DIR: process.env.MICROVM_TEST_LIBKRUNFW_DIR, ...opts.env },
  });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}
