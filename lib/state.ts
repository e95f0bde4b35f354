/**
 * Per-VM state in `<dataDir>/state.json`, written atomically (temp file, fsync, rename) under a
 * lock file, and the PID-reuse guard used before signalling a recorded VM process.
 */
import { vmFile, vmsDir } from './vm-dir';
import * as fs from 'node:fs';
import * as path from 'node:path';

/** What state.json holds. */
export interface VmState {
  id: string;
  name: string;
  backend: string;
  pid: number;
  /** Field 22 of /proc/PID/stat (clock ticks since boot), to detect PID reuse. */
  pidStartTime: string;
  /** The executable behind pid (/proc/PID/exe). */
  executable: string;
  image: string;
  cpus: number;
  memoryMiB: number;
  ports: { host: number; guest: number }[];
  rootfsPath: string;
  cloneStrategy: string;
  createdAt: string;
  /** The cached image the VM's root was cloned from (gc and the size cap never remove it under a live VM). */
  imageDigest?: string;
  /** The agent's socket accepts before the agent listens (libkrun's vsock bridge): keep trying. */
  agentAcceptsLate?: boolean;
  /** The backend's control socket (QEMU's second QMP monitor): `microvm pause`/`unpause` use it. */
  controlSocket?: string;
}

/** Start time of a process (field 22 of /proc/PID/stat), or undefined when it is gone. */
export function processStartTime(pid: number): string | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

/** Whether `pid` is still the process recorded in `state` (same executable, same start time). */
export function isRecordedProcess(state: Pick<VmState, 'pid' | 'pidStartTime' | 'executable'>): boolean {
  if (processStartTime(state.pid) !== state.pidStartTime) return false;
  try {
    return fs.readlinkSync(`/proc/${state.pid}/exe`) === fs.realpathSync(state.executable);
  } catch {
    return false;
  }
}

/**
 * Runs `fn` holding the lock file `lockPath` (created O_EXCL with our pid; a lock left by a dead
 * process is taken over). Waits while another live process holds it, up to `timeoutMs`.
 */
export async function withFileLock<T>(lockPath: string, fn: () => Promise<T> | T, timeoutMs = 600_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      fs.writeFileSync(lockPath, String(process.pid), { flag: 'wx', mode: 0o600 });
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      let holder = NaN;
      try {
        holder = Number(fs.readFileSync(lockPath, 'utf8').trim());
      } catch {
        continue; // released meanwhile
      }
      let alive = false;
      try {
        if (Number.isInteger(holder) && holder > 0) {
          process.kill(holder, 0);
          alive = true;
        } else {
          // Empty or garbled: its creator may be between creating and writing it. Only a lock that
          // has stayed so for seconds is abandoned.
          alive = Date.now() - fs.statSync(lockPath).mtimeMs < 5000;
        }
      } catch {
        /* gone */
      }
      if (!alive) fs.rmSync(lockPath, { force: true });
      else if (Date.now() > deadline)
        throw Object.assign(new Error(`Timed out waiting for the lock ${lockPath} held by pid ${holder}`), {
          code: 'ERR_MICROVM_LOCK_TIMEOUT',
        });
      else await new Promise((r) => setTimeout(r, 10));
    }
  }
  try {
    return await fn();
  } finally {
    fs.rmSync(lockPath, { force: true });
  }
}

/** Runs `fn` holding `<dir>/state.lock`. */
export function withStateLock<T>(dir: string, fn: () => Promise<T> | T): Promise<T> {
  return withFileLock(path.join(dir, 'state.lock'), fn);
}

/** Writes state.json atomically. */
export async function writeState(dir: string, state: VmState): Promise<void> {
  await withStateLock(dir, () => {
    const tmp = path.join(dir, `.state.json.${process.pid}.tmp`);
    const fd = fs.openSync(tmp, 'w', 0o600);
    try {
      fs.writeSync(fd, `${JSON.stringify(state, null, 2)}\n`);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, vmFile(dir, 'state'));
  });
}

/** Reads state.json, or undefined when absent or unreadable. */
export function readState(dir: string): VmState | undefined {
  try {
    return JSON.parse(fs.readFileSync(vmFile(dir, 'state'), 'utf8')) as VmState;
  } catch {
    return undefined;
  }
}

/**
 * Terminates the VM recorded in `dir` if (and only if) its PID still names the same process:
 * SIGTERM to its process group, then SIGKILL after `timeoutMs`. Returns whether it signalled.
 */
export async function terminateRecorded(dir: string, timeoutMs = 5000): Promise<boolean> {
  const state = readState(dir);
  if (!state || !isRecordedProcess(state)) return false;
  const signal = (sig: NodeJS.Signals): void => {
    try {
      process.kill(-state.pid, sig);
    } catch {
      try {
        process.kill(state.pid, sig);
      } catch {
        /* gone */
      }
    }
  };
  signal('SIGTERM');
  const deadline = Date.now() + timeoutMs;
  while (isRecordedProcess(state) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  if (isRecordedProcess(state)) signal('SIGKILL');
  return true;
}

/** Who is creating a VM directory: written first, so a creator killed before state.json is known. */
export interface VmOwner {
  pid: number;
  startTime: string;
  autoRemove: boolean;
}

/** Records this process as the creator of the VM directory `dir` (`owner.json`). */
export function writeOwner(dir: string, autoRemove: boolean): VmOwner {
  const owner = { pid: process.pid, startTime: processStartTime(process.pid) ?? '', autoRemove };
  fs.writeFileSync(vmFile(dir, 'owner'), `${JSON.stringify(owner)}\n`, { mode: 0o600 });
  return owner;
}

function readOwner(dir: string): VmOwner | undefined {
  try {
    const o = JSON.parse(fs.readFileSync(vmFile(dir, 'owner'), 'utf8')) as VmOwner;
    return Number.isInteger(o.pid) && typeof o.startTime === 'string' ? o : undefined;
  } catch {
    return undefined;
  }
}

/** Whether the process that created a VM directory is still the same live process. */
function ownerAlive(o: VmOwner): boolean {
  return o.pid > 0 && processStartTime(o.pid) === o.startTime;
}

/**
 * VM directories under `<dataRoot>/vms` that nothing will use again, removed:
 * - `autoRemove` VMs (`run --rm`) whose VM has ended and whose creating process is gone (killed
 *   before it could remove the directory itself);
 * - directories whose creator died before the VM started (no state.json, dead owner);
 * - with `all` (`microvm prune`): also every other VM that is not running and whose creator is gone.
 * A running VM, or one whose creator is still alive (it may be starting it or reading its output),
 * is never touched. Directories without an owner record (made by older versions) are left alone
 * unless `all`. Returns the names removed.
 */
export async function sweepVms(dataRoot: string, all = false): Promise<string[]> {
  const vms = vmsDir(dataRoot);
  let names: string[];
  try {
    names = fs.readdirSync(vms);
  } catch {
    return [];
  }
  const removed: string[] = [];
  for (const name of names) {
    const dir = path.join(vms, name);
    const state = readState(dir);
    const owner = readOwner(dir);
    if (owner && ownerAlive(owner)) continue;
    if (state && isRecordedProcess(state)) continue;
    const removable = all ? state !== undefined || owner !== undefined : owner ? !state || owner.autoRemove : false;
    if (!removable) continue;
    await fs.promises.rm(dir, { recursive: true, force: true });
    removed.push(name);
  }
  return removed;
}
