// Writing a file under a root directory without ever following a symlink: every path component
// is opened relative to its parent with O_NOFOLLOW (kernel-enforced; no string checks), so a
// symlink planted anywhere in the rootfs cannot redirect the write outside it.
#pragma once

#include <sys/types.h>
#include <cstdint>
#include <string>
#include <vector>

namespace microvm {

struct DirAttrs {
  mode_t mode = 0755;
  uid_t uid = static_cast<uid_t>(-1);  // -1: leave as created
  gid_t gid = static_cast<gid_t>(-1);
};

// Creates or replaces root/components... with `data`. Missing directories are created with
// dir_attrs[i] (one per intermediate component). The final file is written to a temporary name
// beside it and renamed into place. Returns 0 or a positive errno, with `failed_at` naming the
// component where it failed.
int WriteFileBeneath(const std::string& root, const std::vector<std::string>& components, const void* data, size_t size,
                     mode_t mode, uid_t uid, gid_t gid, const std::vector<DirAttrs>& dir_attrs, std::string* failed_at);

// What a tree holds: its entries (not counting the root) and the bytes of its regular files.
struct TreeTotals {
  uint64_t entries = 0;
  uint64_t bytes = 0;
};

// Walks `root` without following a symlink anywhere: each directory is opened relative to the
// root with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), one descriptor open at a time (no
// depth limit from the descriptor table). Returns 0 or a positive errno, with `failed_at` naming
// the directory (relative to the root) where it failed.
int SummarizeTree(const std::string& root, TreeTotals* out, std::string* failed_at);

// Sets the "top of a directory hierarchy" attribute (FS_TOPDIR_FL, `chattr +T`) on `dir`: ext4's
// Orlov allocator then places each new subdirectory, with the files that follow it, in a block
// group of its own instead of the parent's. Returns 0 or a positive errno (ENOTTY, EOPNOTSUPP:
// the filesystem has no such attribute).
int MarkTopDirectory(const std::string& dir);

}  // namespace microvm
