// Layer extraction primitives that never leave the root directory: every path is given as
// components, each parent is opened relative to the previous one with O_NOFOLLOW|O_DIRECTORY
// (a symlink anywhere in the path is refused by the kernel, ELOOP/ENOTDIR), and the final
// operation uses the *at() call on that parent directory fd. Nothing here resolves a symlink
// target: symlinks are created with their target text as given, and hard links are made between
// two paths that are both resolved this way.
#pragma once

#include <string>
#include <sys/types.h>
#include <vector>

namespace microvm {

enum class EntryKind { kFile, kDir, kSymlink, kHardlink };

struct EntryAttrs {
  mode_t mode = 0644;        // permission bits incl. setuid/setgid/sticky
  uid_t uid = 0;
  gid_t gid = 0;
  long long mtime_sec = 0;
  long mtime_nsec = 0;
  bool chown = false;        // privileged: set owner; else record it in the override xattr
  bool override_xattr = false;
};

// Creates (replacing what is there, except that a directory stays a directory) the entry at
// components under root. Parent directories must exist (tar lists them) unless create_parents.
// For kFile returns an open O_WRONLY fd in *fd (the caller writes and closes it).
// Returns 0 or a positive errno; *failed_at names the component.
int ExtractEntry(const std::string& root, const std::vector<std::string>& components, EntryKind kind,
                 const std::string& link_target, const std::vector<std::string>& hardlink_components,
                 bool create_parents, int* fd, std::string* failed_at);

// Applies mode, owner (or the user.containers.override_stat xattr) and mtime to an entry.
int SetEntryAttrs(const std::string& root, const std::vector<std::string>& components, EntryKind kind,
                  const EntryAttrs& attrs, std::string* failed_at);

// Removes the entry (recursively for a directory). A missing entry is not an error.
int RemoveEntry(const std::string& root, const std::vector<std::string>& components, std::string* failed_at);

// Removes every child of the directory except the names in `keep` (opaque whiteout).
int ClearDirectory(const std::string& root, const std::vector<std::string>& components,
                   const std::vector<std::string>& keep, std::string* failed_at);

}  // namespace microvm
