/**
 * Host directories read and written without following a link anywhere below one opened directory:
 * what copies to and from a guest use where the guest may be changing the same tree (a virtio-fs
 * share it can write) while the host works in it.
 *
 * Node has no openat(2) family, so every operation names its target as `/proc/self/fd/<fd>/<name>`:
 * the kernel resolves `/proc/self/fd/<fd>` to the directory that descriptor holds — not to the path
 * it was opened by — so a directory renamed, moved or replaced by a symlink after it was opened
 * cannot redirect anything. `name` is always one plain component, and the operations never follow
 * it: opens carry O_NOFOLLOW, and lstat, lchown, mkdir, symlink, readlink, rename, unlink and rmdir
 * do not follow a final symlink. A directory is entered only by opening it with
 * O_DIRECTORY|O_NOFOLLOW relative to its parent. (openat2's RESOLVE_BENEATH would do the same in
 * C; this keeps the copy code in TypeScript, where its checks are.)
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';

// (libuv opens every descriptor with O_CLOEXEC.)
const { O_RDONLY, O_DIRECTORY, O_NOFOLLOW, O_NONBLOCK } = fs.constants;

/** One plain path component, or a thrown ERR_MICROVM_COPY-style TypeError. */
function component(name: string): string {
  if (name === '' || name === '.' || name === '..' || name.includes('/') || name.includes('\0'))
    throw new TypeError(`Not a single path component: ${JSON.stringify(name.slice(0, 100))}`);
  return name;
}

/** open(2) with a plain descriptor as the result (a FileHandle would close it when collected). */
function openFd(p: string, flags: number): Promise<number> {
  return new Promise<number>((resolve, reject) => fs.open(p, flags, (err, fd) => (err ? reject(err) : resolve(fd))));
}

export class DirHandle {
  #fd: number;
  /** For messages: the path this handle was reached by (never used to resolve anything). */
  readonly label: string;

  private constructor(fd: number, label: string) {
    this.#fd = fd;
    this.label = label;
  }

  /**
   * Opens the directory at `dirPath` (an absolute path the caller chose: its components are
   * resolved as given, its last one is not followed when `noFollow`).
   */
  static async open(dirPath: string, options: { noFollow?: boolean } = {}): Promise<DirHandle> {
    const flags = O_RDONLY | O_DIRECTORY | (options.noFollow ? O_NOFOLLOW : 0);
    return new DirHandle(await openFd(dirPath, flags), dirPath);
  }

  /** The path that names `name` in this directory, resolved through the descriptor. */
  at(name: string): string {
    if (this.#fd < 0) throw new Error(`${this.label} was closed`);
    return `/proc/self/fd/${this.#fd}/${component(name)}`;
  }

  /** The directory itself, through the descriptor. */
  get self(): string {
    if (this.#fd < 0) throw new Error(`${this.label} was closed`);
    return `/proc/self/fd/${this.#fd}`;
  }

  /** Opens the subdirectory `name`; fails (ELOOP/ENOTDIR) when it is a symlink or not a directory. */
  async dir(name: string): Promise<DirHandle> {
    const fd = await openFd(this.at(name), O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
    return new DirHandle(fd, `${this.label}/${name}`);
  }

  /**
   * Opens `name` with `flags` (O_NOFOLLOW always added: a symlink fails with ELOOP). For reading,
   * add O_NONBLOCK so that a FIFO swapped in cannot block the open; check the type with stat().
   */
  openFile(name: string, flags: number, mode = 0o600): Promise<fsp.FileHandle> {
    return fsp.open(this.at(name), flags | O_NOFOLLOW, mode);
  }

  /** Opens `name` for reading, only if it is a regular file (checked on the open descriptor). */
  async openRegular(name: string): Promise<{ fh: fsp.FileHandle; st: fs.Stats }> {
    const fh = await this.openFile(name, O_RDONLY | O_NONBLOCK);
    const st = await fh.stat();
    if (!st.isFile()) {
      await fh.close();
      throw Object.assign(new Error(`${this.label}/${name} is not a regular file`), { code: 'EINVAL' });
    }
    return { fh, st };
  }

  /** lstat of `name`, or undefined when it does not exist. */
  async lstat(name: string): Promise<fs.Stats | undefined> {
    return fsp.lstat(this.at(name)).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return undefined;
      throw err;
    });
  }

  /** fstat of the directory itself. */
  stat(): fs.Stats {
    return fs.fstatSync(this.#fd);
  }

  readdir(): Promise<string[]> {
    return fsp.readdir(this.self);
  }

  mkdir(name: string, mode: number): Promise<void> {
    return fsp.mkdir(this.at(name), { mode });
  }

  symlink(target: string, name: string): Promise<void> {
    return fsp.symlink(target, this.at(name));
  }

  readlink(name: string): Promise<string> {
    return fsp.readlink(this.at(name));
  }

  lchown(name: string, uid: number, gid: number): Promise<void> {
    return fsp.lchown(this.at(name), uid, gid);
  }

  /** Owner, then mode, of the directory itself (through its descriptor). */
  chownChmod(owner: { uid: number; gid: number } | undefined, mode: number): void {
    if (owner) fs.fchownSync(this.#fd, owner.uid, owner.gid);
    fs.fchmodSync(this.#fd, mode);
  }

  /** Renames `name` here to `to` in `dir` (both resolved through their descriptors). */
  rename(name: string, dir: DirHandle, to: string): Promise<void> {
    return fsp.rename(this.at(name), dir.at(to));
  }

  /**
   * Removes `name` and, when it is a directory, everything in it, never following a link: each
   * directory is entered through a no-follow open of its descriptor's child. Best effort: what
   * cannot be removed (a guest that keeps adding) is left.
   */
  async removeTree(name: string): Promise<void> {
    const st = await this.lstat(name).catch(() => undefined);
    if (!st) return;
    if (st.isDirectory()) {
      const sub = await this.dir(name).catch(() => undefined);
      if (sub) {
        try {
          for (const child of await sub.readdir().catch(() => [] as string[])) await sub.removeTree(child);
        } finally {
          sub.close();
        }
      }
      await fsp.rmdir(this.at(name)).catch(() => undefined);
    } else {
      await fsp.unlink(this.at(name)).catch(() => undefined);
    }
  }

  close(): void {
    if (this.#fd >= 0) fs.closeSync(this.#fd);
    this.#fd = -1;
  }
}
