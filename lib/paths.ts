/**
 * Where the package keeps its data by default: `<dataRoot>/vms/<name>` per VM, `<dataRoot>/cache`
 * for images (`cache/images/<digest>/rootfs`, `cache/blobs/`, `cache/refs.json`), `<dataRoot>/kernels`.
 */
import * as os from 'node:os';
import * as path from 'node:path';

/** The data root when none is given: $MICROVM_DATA_DIR, else $XDG_DATA_HOME/node-microvm. */
export function defaultDataRoot(env: NodeJS.ProcessEnv = process.env): string {
  if (env.MICROVM_DATA_DIR) return env.MICROVM_DATA_DIR;
  const xdg = env.XDG_DATA_HOME || path.join(os.homedir(), '.local', 'share');
  return path.join(xdg, 'node-microvm');
}

/** The image cache of `dataRoot`: `<dataRoot>/cache`. */
export function defaultCacheDir(dataRoot: string = defaultDataRoot()): string {
  return path.join(dataRoot, 'cache');
}
