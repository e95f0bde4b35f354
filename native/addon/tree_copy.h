// A parallel copy of a directory tree (the copy and reflink rootfs clone strategies):
// `cp -a` semantics (modes, owners where permitted, times, extended attributes, symlinks as links,
// hard links kept), with the files copied by several threads at once.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

namespace microvm {

enum class ReflinkMode { kAuto, kAlways };

struct TreeCopyOptions {
  ReflinkMode reflink = ReflinkMode::kAuto;
  int threads = 4;  // file copiers; 1..64
};

struct TreeCopyResult {
  uint64_t dirs = 0;
  uint64_t files = 0;
  uint64_t links = 0;  // hard links made (not copied)
  uint64_t symlinks = 0;
  uint64_t bytes = 0;
  uint64_t reflinked = 0;  // files cloned with FICLONE
};

struct TreeCopyFailure {
  int err = 0;       // errno, or ECANCELED when cancelled
  std::string path;  // the source path the failure is about
  std::string what;  // the call that failed
};

// Copies the tree at `src` to `dst`, which must not exist. `cancel` is read between files. On
// failure returns false with `failure` set; what was made under `dst` is left for the caller to
// remove. Sockets and device nodes are skipped (an image rootfs we copy has none: extraction refuses
// them); FIFOs are recreated.
bool CopyTree(const std::string& src, const std::string& dst, const TreeCopyOptions& options,
              const std::atomic<bool>& cancel, TreeCopyResult* result, TreeCopyFailure* failure);

}  // namespace microvm
