// Layer extraction that never leaves the root directory. Every parent directory is opened with
// openat2(RESOLVE_IN_ROOT) on a descriptor of the root (an O_NOFOLLOW component walk on kernels
// before 5.6), so a symlink met on the way resolves *inside* the root, as the guest will see it;
// the final operation uses the *at() call on that parent with the leaf never followed. Nothing here
// resolves a symlink target: symlinks are created with their target text as given, and hard links
// are made between two paths that are both resolved this way.
//
// LayerWriter applies a layer's entries, in the order they are pushed, on its own thread: the JS
// thread parses the archive and decides what each entry may do; this thread makes the system
// calls (creates, writes, attributes, removals), so decompression, parsing and disk work overlap.
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/fd.h"

namespace microvm {

enum class EntryKind { kFile, kDir, kSymlink, kHardlink };

struct EntryAttrs {
  mode_t mode = 0644;  // permission bits incl. setuid/setgid/sticky
  uid_t uid = 0;
  gid_t gid = 0;
  long long mtime_sec = 0;
  long mtime_nsec = 0;
  bool chown = false;  // privileged: set owner; else record it in the override xattr
  bool override_xattr = false;
};

// The first error a writer met: errno, what it was doing, the entry, and the component at fault.
struct WriterFailure {
  int err = 0;
  std::string what;
  std::string entry;
  std::string failed_at;
};

class LayerWriter {
 public:
  enum class OpKind {
    kDir,       // path: a directory (an existing directory stays, with its contents)
    kFile,      // path: a new regular file, open for the kData ops that follow
    kData,      // data/size: bytes appended to the open file
    kEndFile,   // attrs: applied through the open file, which is then closed
    kSymlink,   // path, text (target, stored as given), attrs
    kHardlink,  // path -> names (the target's components)
    kRemove,    // path: whiteout (recursive; missing is fine)
    kClear,     // path (empty: the root): opaque whiteout, every child but `names` removed
    kAttrs,     // path, attr_kind, attrs: mode/owner/mtime of an existing entry (directories, last)
  };
  struct Op {
    OpKind kind = OpKind::kDir;
    std::vector<std::string> path;
    std::vector<std::string> names;
    std::string text;
    std::shared_ptr<const char> data;  // kData: the bytes (shares the buffer they live in)
    size_t size = 0;
    EntryKind attr_kind = EntryKind::kFile;
    EntryAttrs attrs;
  };

  // Opens `root` and starts the thread. `chown`: set owners (privileged); `override_xattr`: record
  // uid:gid:mode in user.containers.override_stat instead. Returns 0 or an errno.
  static int Open(const std::string& root, bool chown, bool override_xattr, std::unique_ptr<LayerWriter>* out,
                  std::string* failed_at);
  ~LayerWriter();  // Cancel()

  // Queues an op; false (op dropped) once the writer failed or was cancelled.
  bool Push(Op&& op);
  // Returns once every queued op was applied, or the writer failed or was cancelled.
  void Drain();
  bool Failure(WriterFailure* f);
  // Drops what is queued and joins the thread: nothing is written after this returns. Idempotent.
  void Cancel();

 private:
  LayerWriter(int root_fd, bool chown, bool override_xattr);
  static const char* OpName(OpKind k);
  void Run();
  int Apply(Op& op, std::string* failed_at);
  int Parent(const std::vector<std::string>& path, bool create, int* dirfd, std::string* failed_at);
  int Replace(int dirfd, const std::string& name, bool keep_dir, bool* kept);

  const int root_fd_;
  const bool chown_;
  const bool override_xattr_;
  // Writer thread only:
  Fd current_;              // the file being written
  Fd parent_;               // cached parent directory...
  std::string parent_key_;  // ...and its path
  // Shared, under mutex_:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Op> queue_;
  bool busy_ = false;
  bool failed_ = false;
  bool cancelled_ = false;
  WriterFailure failure_;
  std::thread thread_;
};

}  // namespace microvm
