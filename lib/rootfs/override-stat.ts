/**
 * Stage microvm.VirtioFSOverrideStat (go-microvm's name): ownership for libkrun's virtio-fs when
 * the host user is not root.
 *
 * libkrun serves the rootfs with the host's owners, unless an entry carries the xattr
 * `user.containers.override_stat` ("uid:gid:0mode"), which its virtio-fs reports instead. An
 * unprivileged extraction writes that xattr on every image entry (the owner the layer says; see
 * native/addon/extract.cc). What it misses is what this process made itself: the clone's root directory
 * and anything the rootfs hooks or the backend wrote. Owned by the host user, those would appear to
 * the guest as owned by uid 1000 (say), and `/` would not be root's. This stage gives each of them
 * "0:0:<its mode>".
 *
 * Where it applies: the libkrun backend, a host user other than root, and a clone the runner does
 * not mount itself (with `overlay`, the runner's user namespace maps the host user to root). As
 * root, extraction chowned every entry to the owner the image names: nothing to override, and an
 * entry owned by uid 1000 is meant to be.
 */
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { MicrovmError } from '../errors';
import { addon } from '../native';
import type { CloneStrategy } from './clone';

/** Whether the stage runs: a backend whose file server needs it, a copied root, a host user other than root. */
export function overrideStatApplies(backendNeedsIt: boolean, strategy: CloneStrategy, hostUid: number): boolean {
  return backendNeedsIt && strategy !== 'overlay' && hostUid !== 0;
}

/** Entries at most: a rootfs tree beyond this is refused (the extraction's own cap is lower). */
const MAX_ENTRIES = 5_000_000;

/**
 * Walks `root` (never following a symlink) and gives every entry owned by `hostUid` that has no
 * override yet the override "0:0:0<mode>"; symlinks are left alone (libkrun reports a link's own
 * owner; the guest resolves it). Returns how many entries it set. A filesystem without user xattrs
 * is ERR_MICROVM_ROOTFS_OVERRIDE_STAT: the guest would see the wrong owners.
 */
export async function applyOverrideStat(root: string, hostUid: number, signal?: AbortSignal): Promise<number> {
  let set = 0;
  let seen = 0;
  const visit = async (p: string, isDir: boolean): Promise<void> => {
    if (++seen > MAX_ENTRIES)
      throw new MicrovmError('ERR_MICROVM_ROOTFS_OVERRIDE_STAT', `more than ${MAX_ENTRIES} entries under ${root}`);
    const st = await fsp.lstat(p);
    if (st.isSymbolicLink()) return;
    if (st.uid === hostUid && addon().getOverrideStat(p) === null) {
      const err = addon().setOverrideStat(p, `0:0:0${(st.mode & 0o7777).toString(8)}`);
      if (err !== null)
        throw new MicrovmError(
          'ERR_MICROVM_ROOTFS_OVERRIDE_STAT',
          `cannot set user.containers.override_stat on ${p}: ${err}${err === 'ENOTSUP' || err === 'EOPNOTSUPP' ? ' (the filesystem has no user xattrs; put the data dir on one that has, e.g. ext4, xfs, btrfs or tmpfs)' : ''}`,
        );
      set++;
    }
    if (!isDir) return;
    signal?.throwIfAborted();
    for (const e of await fsp.readdir(p, { withFileTypes: true })) await visit(path.join(p, e.name), e.isDirectory());
  };
  await visit(root, true);
  return set;
}
