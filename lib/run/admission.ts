/**
 * Admission: how many VMs may boot at once on this host. A boot (run()'s VMSpawn through PostBoot)
 * holds a slot; a start beyond the limit waits for one (span microvm.AdmissionWait) instead of
 * overloading the host until boots miss their deadlines. Slots are lock files in the data root
 * (`<dataRoot>/admission/<k>.lock`, each holding its owner's pid), so every process sharing a data
 * root shares the limit; a slot whose owner died is taken over.
 *
 * Written here rather than taken from npm: the semaphore packages there are in-process only, and
 * the cross-process ones need a daemon or a native build; this is twenty lines over O_EXCL files.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as v from '../validate';

/** The environment variable that sets the limit when run() is not given one. */
export const ADMISSION_ENV = 'MICROVM_MAX_BOOTS';

/** The limit: the option, else $MICROVM_MAX_BOOTS, else the host's cores (at least 2). */
export function admissionLimit(option: number | undefined, env: NodeJS.ProcessEnv = process.env): number {
  if (option !== undefined) return v.integer('maxConcurrentBoots', option, 1, 4096);
  const raw = env[ADMISSION_ENV];
  if (raw !== undefined && raw !== '') {
    if (!/^\d+$/.test(raw))
      throw v.valueError(`${ADMISSION_ENV} must be a whole number 1-4096, not ${JSON.stringify(raw)}`);
    return v.integer(ADMISSION_ENV, Number(raw), 1, 4096);
  }
  return Math.max(2, os.availableParallelism());
}

/** A held slot; `release()` frees it (once). */
export interface AdmissionSlot {
  readonly index: number;
  /** How long the start waited for it, in ms. */
  readonly waitedMs: number;
  release(): void;
}

function ownerAlive(file: string): boolean {
  let pid = NaN;
  try {
    pid = Number(fs.readFileSync(file, 'utf8').trim());
  } catch {
    return true; // being written or removed: look again later
  }
  if (!Number.isInteger(pid) || pid <= 0) {
    try {
      return Date.now() - fs.statSync(file).mtimeMs < 5000; // its creator may not have written yet
    } catch {
      return true;
    }
  }
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Takes a free slot, or undefined when all `limit` are held by live owners. */
function tryTake(dir: string, limit: number): number | undefined {
  for (let k = 0; k < limit; k++) {
    const file = path.join(dir, `${k}.lock`);
    try {
      fs.writeFileSync(file, String(process.pid), { flag: 'wx', mode: 0o600 });
      return k;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      if (!ownerAlive(file)) {
        fs.rmSync(file, { force: true });
        k--; // try this one again
      }
    }
  }
  return undefined;
}

/**
 * Waits for a boot slot under `dataRoot`, polling every 25 ms; `signal` ends the wait with its
 * reason. Slots held by this process count too (each run() holds its own).
 */
export async function admit(dataRoot: string, limit: number, signal?: AbortSignal): Promise<AdmissionSlot> {
  const dir = path.join(dataRoot, 'admission');
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const started = performance.now();
  for (;;) {
    signal?.throwIfAborted();
    const k = tryTake(dir, limit);
    if (k !== undefined) {
      let held = true;
      return {
        index: k,
        waitedMs: performance.now() - started,
        release: () => {
          if (!held) return;
          held = false;
          fs.rmSync(path.join(dir, `${k}.lock`), { force: true });
        },
      };
    }
    await new Promise<void>((resolve) => {
      const t = setTimeout(done, 25);
      function done(): void {
        clearTimeout(t);
        signal?.removeEventListener('abort', done);
        resolve();
      }
      signal?.addEventListener('abort', done, { once: true });
    });
  }
}
