/**
 * Stage microvm.RootfsHooks: functions that write into the VM's own rootfs layer before it boots.
 * All writes go through {@link RootfsContext.writeFile}, which never follows a symlink inside the
 * rootfs (each path component is opened with O_NOFOLLOW by the addon), so a hostile image cannot
 * redirect a hook's write to the host. Ready-made hooks: {@link hooks}.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fromNativeError } from '../errors';
import { addon } from '../native';
import * as v from '../validate';
import type { ClonedRootfs } from './clone';

/** Ownership and mode of a written file. */
export interface WriteOptions {
  /** Default 0o644. */
  mode?: number;
  /** Default: as created (the current user; root inside an unprivileged overlay VM). */
  uid?: number;
  gid?: number;
  /** Mode and owner of parent directories that the image does not have. Default 0o755, as created. */
  parents?: { mode?: number; uid?: number; gid?: number };
}

/** What a rootfs hook receives. */
export interface RootfsContext {
  /** The VM's id. */
  readonly vmId: string;
  /** The tree the guest sees as `/` once booted (live only inside the runner for overlays). */
  readonly rootfs: ClonedRootfs;
  /** Writes a file at an absolute guest path, creating missing parent directories. */
  writeFile(guestPath: string, data: string | Buffer, options?: WriteOptions): void;
  /** Reads a file at an absolute guest path as the guest will see it (writable layer first). */
  readFile(guestPath: string): Buffer | undefined;
}

/** A rootfs hook. */
export type RootfsHook = (rootfs: RootfsContext) => void | Promise<void>;

function guestComponents(name: string, guestPath: string): string[] {
  v.string(name, guestPath);
  if (!guestPath.startsWith('/'))
    throw v.rangeError(`Expected an absolute guest path for ${name} but received ${v.describe(guestPath)}`);
  const parts = guestPath.split('/').filter((p) => p.length > 0);
  if (parts.length === 0 || parts.some((p) => p === '.' || p === '..')) {
    throw v.rangeError(
      `Expected a guest file path without '.' or '..' components for ${name} but received ${v.describe(guestPath)}`,
    );
  }
  return parts;
}

/** Creates the {@link RootfsContext} for a cloned rootfs. */
export function rootfsContext(vmId: string, rootfs: ClonedRootfs): RootfsContext {
  const lowerAttrs = (parts: string[], fallback: [number, number, number]): [number, number, number][] =>
    parts.slice(0, -1).map((_, i) => {
      // Directories created in an overlay's upper layer take the mode and owner the image gave
      // them, so that the merged view keeps e.g. /root at 0700.
      try {
        const st = fs.lstatSync(path.join(rootfs.sourceDir, ...parts.slice(0, i + 1)));
        if (st.isDirectory()) return [st.mode & 0o7777, st.uid, st.gid];
      } catch {
        /* not in the image */
      }
      return fallback;
    });
  return {
    vmId,
    rootfs,
    writeFile(guestPath, data, options = {}) {
      const parts = guestComponents('guestPath', guestPath);
      const o = v.object('options', options);
      v.knownKeys('options', o, ['mode', 'uid', 'gid', 'parents']);
      const mode = o.mode === undefined ? 0o644 : v.integer('options.mode', o.mode, 0, 0o7777);
      const uid = o.uid === undefined ? -1 : v.integer('options.uid', o.uid, 0, 0xfffffffe);
      const gid = o.gid === undefined ? -1 : v.integer('options.gid', o.gid, 0, 0xfffffffe);
      const p = o.parents === undefined ? {} : v.object('options.parents', o.parents);
      v.knownKeys('options.parents', p, ['mode', 'uid', 'gid']);
      const fallback: [number, number, number] = [
        p.mode === undefined ? 0o755 : v.integer('options.parents.mode', p.mode, 0, 0o7777),
        p.uid === undefined ? -1 : v.integer('options.parents.uid', p.uid, 0, 0xfffffffe),
        p.gid === undefined ? -1 : v.integer('options.parents.gid', p.gid, 0, 0xfffffffe),
      ];
      const buf = typeof data === 'string' ? Buffer.from(data) : data;
      if (!Buffer.isBuffer(buf))
        throw v.typeError(`Expected a string or Buffer for data but received ${v.describe(data)}`);
      try {
        addon().writeFileBeneath(rootfs.writableDir, parts, buf, mode, uid, gid, lowerAttrs(parts, fallback));
      } catch (err) {
        const e = fromNativeError(err) as Error & { code?: string };
        throw Object.assign(new Error(`Cannot write ${guestPath} into the VM rootfs: ${e.message}`, { cause: err }), {
          code: e.code === 'ELOOP' ? 'ERR_MICROVM_ROOTFS_SYMLINK' : 'ERR_MICROVM_ROOTFS_WRITE',
        });
      }
    },
    readFile(guestPath) {
      const parts = guestComponents('guestPath', guestPath);
      for (const base of rootfs.writableDir === rootfs.sourceDir
        ? [rootfs.writableDir]
        : [rootfs.writableDir, rootfs.sourceDir]) {
        let fd: number | undefined;
        try {
          // O_NOFOLLOW only guards the last component; reading is advisory (hooks' own checks).
          fd = fs.openSync(path.join(base, ...parts), fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
          return fs.readFileSync(fd);
        } catch {
          /* try the next layer */
        } finally {
          if (fd !== undefined) fs.closeSync(fd);
        }
      }
      return undefined;
    },
  };
}

const ENV_KEY = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** Shell-quotes a value for a `KEY='value'` line. */
function shellQuote(value: string): string {
  return `'${value.replace(/'/g, `'\\''`)}'`;
}

/** Ready-made rootfs hooks. */
export const hooks = {
  /** Writes `content` at `guestPath`. */
  injectFile(guestPath: string, content: string | Buffer, options: WriteOptions = {}): RootfsHook {
    guestComponents('guestPath', guestPath);
    return (r) => r.writeFile(guestPath, content, options);
  },

  /** Copies a host file into the guest as an executable (mode 0755 unless given). */
  injectBinary(hostPath: string, guestPath: string, options: WriteOptions = {}): RootfsHook {
    v.absolutePath('hostPath', hostPath);
    guestComponents('guestPath', guestPath);
    return (r) => r.writeFile(guestPath, fs.readFileSync(hostPath), { mode: 0o755, ...options });
  },

  /**
   * Appends public keys to `~user/.ssh/authorized_keys` (home from the image's /etc/passwd;
   * `/root` for root), with 0700/0600 modes and the user's uid/gid.
   */
  injectAuthorizedKeys(publicKeys: string | readonly string[], options: { user?: string } = {}): RootfsHook {
    const keys = (typeof publicKeys === 'string' ? [publicKeys] : [...publicKeys]).map((k, i) => {
      const s = v.string(`publicKeys[${i}]`, k).trim();
      if (s.includes('\n') || !/^(ssh-|ecdsa-|sk-)/.test(s))
        throw v.rangeError(`Expected one OpenSSH public key line for publicKeys[${i}]`);
      return s;
    });
    const user = options.user === undefined ? 'root' : v.string('options.user', options.user);
    return (r) => {
      let home = user === 'root' ? '/root' : `/home/${user}`;
      let uid = user === 'root' ? 0 : -1;
      let gid = user === 'root' ? 0 : -1;
      const passwd = r.readFile('/etc/passwd')?.toString('utf8') ?? '';
      for (const line of passwd.split('\n')) {
        const f = line.split(':');
        if (f[0] === user && f.length >= 7) {
          uid = Number(f[2]);
          gid = Number(f[3]);
          home = f[5] || home;
        }
      }
      if (uid < 0)
        throw Object.assign(new Error(`User ${user} does not exist in the image's /etc/passwd`), {
          code: 'ERR_MICROVM_ROOTFS_USER',
        });
      const file = `${home.replace(/\/+$/, '')}/.ssh/authorized_keys`;
      const existing = r.readFile(file)?.toString('utf8') ?? '';
      const content =
        existing + (existing && !existing.endsWith('\n') ? '\n' : '') + keys.map((k) => `${k}\n`).join('');
      r.writeFile(file, content, { mode: 0o600, uid, gid, parents: { mode: 0o700, uid, gid } });
    };
  },

  /** Writes `KEY='value'` lines (validated keys, shell-quoted values) to `guestPath`. */
  injectEnvFile(guestPath: string, env: Record<string, string>, options: WriteOptions = {}): RootfsHook {
    guestComponents('guestPath', guestPath);
    const o = v.object('env', env);
    const lines = Object.entries(o).map(([k, value]) => {
      if (!ENV_KEY.test(k)) throw v.rangeError(`Expected a valid variable name in env but received ${v.describe(k)}`);
      const s = v.string(`env.${k}`, value, { allowEmpty: true });
      if (s.includes('\n')) throw v.rangeError(`Expected env.${k} without a newline`);
      return `${k}=${shellQuote(s)}\n`;
    });
    return (r) => r.writeFile(guestPath, lines.join(''), { mode: 0o644, ...options });
  },
};
