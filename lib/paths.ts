/**
 * Where the package keeps its data by default: `<dataRoot>/vms/<name>` per VM, `<dataRoot>/cache`
 * for images (`cache/images/<digest>/rootfs`, `cache/blobs/`, `cache/refs.json`), `<dataRoot>/kernels`.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { isRecordedProcess, readState } from './state';

/** The data root when none is given: $MICROVM_DATA_DIR, else $XDG_DATA_HOME/node-microvm. */
export function defaultDataRoot(env: NodeJS.ProcessEnv = process.env): string {
  if (env.MICROVM_DATA_DIR) return env.MICROVM_DATA_DIR;
  const xdg = env.XDG_DATA_HOME || path.join(os.homedir(), '.local', 'share');
  return path.join(xdg, 'node-microvm');
}

/**
 * The image cache of `dataRoot`: `<dataRoot>/cache`. Versions before 0.2 kept it at
 * `<dataRoot>/images` (so trees were at `images/images/<digest>`); such a cache is moved here the
 * first time, when no VM of this data root is running (a running VM's root may be a tree in it).
 */
export function defaultCacheDir(dataRoot: string = defaultDataRoot()): string {
  const dir = path.join(dataRoot, 'cache');
  const legacy = path.join(dataRoot, 'images');
  if (fs.existsSync(dir) || !fs.existsSync(path.join(legacy, 'refs.json'))) return dir;
  const vms = path.join(dataRoot, 'vms');
  let names: string[] = [];
  try {
    names = fs.readdirSync(vms);
  } catch {
    /* no VMs */
  }
  const busy = names.some((n) => {
    const st = readState(path.join(vms, n));
    return st !== undefined && isRecordedProcess(st);
  });
  if (busy) return legacy; // moved by a later call, once nothing runs from it
  try {
    fs.renameSync(legacy, dir);
  } catch {
    return fs.existsSync(dir) ? dir : legacy; // another process moved it first, or it cannot be moved
  }
  return dir;
}
