#include "addon/extract.h"
#include "common/fd.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <set>
#include <thread>

namespace microvm {

namespace {

bool ValidComponent(const std::string& c) {
  return !c.empty() && c != "." && c != ".." && c.find('/') == std::string::npos && c.find('\0') == std::string::npos &&
         c.size() < 256;
}

int Validate(const std::vector<std::string>& components, std::string* failed_at) {
  if (components.empty()) return EINVAL;
  for (const auto& c : components) {
    if (!ValidComponent(c)) {
      *failed_at = c;
      return EINVAL;
    }
  }
  return 0;
}

// Opens `path` (relative, no leading '/') as a directory with root_fd as "/": symlinks are
// resolved by the kernel *inside* the root (an absolute target means root-relative, ".." stops at
// the root), exactly as the guest will see them, and can never lead outside it.
int OpenDirInRoot(int root_fd, const std::string& path) {
  struct open_how how = {};
  how.flags = O_RDONLY | O_DIRECTORY | O_CLOEXEC;
  how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV;
  long fd = syscall(SYS_openat2, root_fd, path.c_str(), &how, sizeof how);
  if (fd >= 0 || errno != ENOSYS) return static_cast<int>(fd);
  // Kernels before 5.6: walk component by component and refuse symlinks (stricter, still safe).
  int dir = dup(root_fd);
  size_t start = 0;
  while (dir >= 0 && start < path.size()) {
    size_t end = path.find('/', start);
    std::string c = path.substr(start, end == std::string::npos ? std::string::npos : end - start);
    int next = openat(dir, c.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    int err = errno;
    close(dir);
    dir = next;
    errno = err;
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return dir;
}

// Opens the directory that holds components.back() (see OpenDirInRoot), creating missing parents
// when asked. The final component is never resolved: callers act on it with *at() calls.
int OpenParentAt(int root_fd, const std::vector<std::string>& components, bool create, Fd* out,
                 std::string* failed_at) {
  if (components.size() == 1) {
    out->reset(dup(root_fd));
    return out->get() < 0 ? errno : 0;
  }
  std::string path;
  for (size_t i = 0; i + 1 < components.size(); i++) path += (i ? "/" : "") + components[i];
  int fd = OpenDirInRoot(root_fd, path);
  if (fd < 0 && errno == ENOENT && create) {
    // Create the missing ones, one level at a time, each resolved in the root again.
    std::string prefix;
    for (size_t i = 0; i + 1 < components.size(); i++) {
      std::string parent = prefix;
      prefix += (i ? "/" : "") + components[i];
      int pfd = parent.empty() ? dup(root_fd) : OpenDirInRoot(root_fd, parent);
      if (pfd < 0) {
        *failed_at = parent;
        return errno;
      }
      if (mkdirat(pfd, components[i].c_str(), 0755) != 0 && errno != EEXIST) {
        int err = errno;
        close(pfd);
        *failed_at = components[i];
        return err;
      }
      close(pfd);
    }
    fd = OpenDirInRoot(root_fd, path);
  }
  if (fd < 0) {
    *failed_at = path;
    return errno;
  }
  out->reset(fd);
  return 0;
}

int OpenRoot(const std::string& root, Fd* out, std::string* failed_at) {
  out->reset(open(root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (out->get() < 0) {
    *failed_at = root;
    return errno;
  }
  return 0;
}

int RemoveAt(int dirfd, const char* name, int depth);

int RemoveChildren(int fd, const std::set<std::string>* keep, int depth) {
  int dup_fd = dup(fd);
  if (dup_fd < 0) return errno;
  DIR* d = fdopendir(dup_fd);
  if (d == nullptr) {
    close(dup_fd);
    return errno;
  }
  std::vector<std::string> names;
  while (struct dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n == "." || n == "..") continue;
    if (keep != nullptr && keep->count(n)) continue;
    names.push_back(n);
  }
  closedir(d);
  for (const auto& n : names) {
    int err = RemoveAt(fd, n.c_str(), depth + 1);
    if (err != 0) return err;
  }
  return 0;
}

int RemoveAt(int dirfd, const char* name, int depth) {
  if (depth > 4096) return ELOOP;
  if (unlinkat(dirfd, name, 0) == 0 || errno == ENOENT) return 0;
  if (errno != EISDIR && errno != EPERM) return errno;
  Fd sub(openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (sub.get() < 0) return errno;
  int err = RemoveChildren(sub.get(), nullptr, depth);
  if (err != 0) return err;
  if (unlinkat(dirfd, name, AT_REMOVEDIR) != 0 && errno != ENOENT) return errno;
  return 0;
}

// The user.containers.override_stat value libkrun's virtio-fs reads: "uid:gid:0mode".
void OverrideValue(const EntryAttrs& a, char (&value)[64]) {
  std::snprintf(value, sizeof value, "%u:%u:0%o", static_cast<unsigned>(a.uid), static_cast<unsigned>(a.gid),
                static_cast<unsigned>(a.mode & 07777));
}
const char kOverrideXattr[] = "user.containers.override_stat";

// Applies mode, owner (or the override xattr) and mtime to the entry `name` in `dirfd`.
int SetAttrsAt(int dirfd, const std::string& name, EntryKind kind, const EntryAttrs& a) {
  if (a.chown && fchownat(dirfd, name.c_str(), a.uid, a.gid, AT_SYMLINK_NOFOLLOW) != 0) return errno;
  if (kind != EntryKind::kSymlink) {
    // After chown (which clears setuid/setgid). An O_PATH|O_NOFOLLOW handle pins exactly this
    // entry (a mode 0000 file cannot be opened for reading when unprivileged); setxattr and chmod
    // go through its /proc/self/fd link, the xattr first (a user xattr needs write permission).
    Fd self(openat(dirfd, name.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
    if (self.get() < 0) return errno;
    struct stat st;
    if (fstat(self.get(), &st) != 0) return errno;
    if (S_ISLNK(st.st_mode)) return ELOOP;
    char proc[64];
    std::snprintf(proc, sizeof proc, "/proc/self/fd/%d", self.get());
    if (a.override_xattr) {
      char value[64];
      OverrideValue(a, value);
      setxattr(proc, kOverrideXattr, value, std::strlen(value), 0);  // best effort: not every fs has user xattrs
    }
    if (chmod(proc, a.mode & 07777) != 0) return errno;
  }
  struct timespec ts[2];
  ts[0].tv_sec = a.mtime_sec;
  ts[0].tv_nsec = a.mtime_nsec;
  ts[1] = ts[0];
  if (utimensat(dirfd, name.c_str(), ts, AT_SYMLINK_NOFOLLOW) != 0) return errno;
  return 0;
}

// The same for a regular file being written, through its open descriptor.
int SetFileAttrs(int fd, const EntryAttrs& a) {
  if (a.chown && fchown(fd, a.uid, a.gid) != 0) return errno;
  if (a.override_xattr) {
    char value[64];
    OverrideValue(a, value);
    fsetxattr(fd, kOverrideXattr, value, std::strlen(value), 0);  // best effort, as above
  }
  if (fchmod(fd, a.mode & 07777) != 0) return errno;
  struct timespec ts[2];
  ts[0].tv_sec = a.mtime_sec;
  ts[0].tv_nsec = a.mtime_nsec;
  ts[1] = ts[0];
  return futimens(fd, ts) == 0 ? 0 : errno;
}

}  // namespace

// ---- LayerWriter -------------------------------------------------------------------------------

int LayerWriter::Open(const std::string& root, bool chown, bool override_xattr, std::unique_ptr<LayerWriter>* out,
                      std::string* failed_at) {
  Fd root_fd;
  int err = OpenRoot(root, &root_fd, failed_at);
  if (err != 0) return err;
  out->reset(new LayerWriter(root_fd.release(), chown, override_xattr));
  return 0;
}

LayerWriter::LayerWriter(int root_fd, bool chown, bool override_xattr)
    : root_fd_(root_fd), chown_(chown), override_xattr_(override_xattr) {
  thread_ = std::thread([this] { Run(); });
}

LayerWriter::~LayerWriter() {
  Cancel();
  if (root_fd_ >= 0) close(root_fd_);
}

bool LayerWriter::Push(Op&& op) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (failed_ || cancelled_) return false;
  queue_.push_back(std::move(op));
  cv_.notify_all();
  return true;
}

bool LayerWriter::Failure(WriterFailure* f) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (failed_) *f = failure_;
  return failed_;
}

void LayerWriter::Drain() {
  std::unique_lock<std::mutex> lock(mutex_);
  cv_.wait(lock, [this] { return failed_ || cancelled_ || (queue_.empty() && !busy_); });
}

void LayerWriter::Cancel() {
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!cancelled_) {
      cancelled_ = true;
      queue_.clear();
      cv_.notify_all();
    }
  }
  if (thread_.joinable()) thread_.join();
}

void LayerWriter::Run() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    cv_.wait(lock, [this] { return cancelled_ || !queue_.empty(); });
    if (cancelled_) break;
    Op op = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    lock.unlock();
    std::string failed_at;
    int err = failed_ ? 0 : Apply(op, &failed_at);
    lock.lock();
    busy_ = false;
    if (err != 0 && !failed_) {
      failed_ = true;
      failure_.err = err;
      failure_.what = OpName(op.kind);
      std::string entry;
      for (const auto& c : op.path) entry += (entry.empty() ? "" : "/") + c;
      failure_.entry = entry;
      failure_.failed_at = failed_at;
      queue_.clear();
    }
    cv_.notify_all();  // Drain()
  }
  current_.reset(-1);
  parent_.reset(-1);
}

const char* LayerWriter::OpName(OpKind k) {
  switch (k) {
    case OpKind::kDir:
      return "creating a directory";
    case OpKind::kFile:
      return "creating a file";
    case OpKind::kData:
      return "writing a file";
    case OpKind::kEndFile:
      return "setting file attributes";
    case OpKind::kSymlink:
      return "creating a symlink";
    case OpKind::kHardlink:
      return "creating a hard link";
    case OpKind::kRemove:
      return "whiteout";
    case OpKind::kClear:
      return "opaque whiteout";
    case OpKind::kAttrs:
      return "setting attributes";
  }
  return "extract";
}

// The parent directory of `path` (cached: files of one directory usually come in a row). The
// cache only ever holds a directory resolved in the root; anything that removes an entry drops
// it, since only a removal can change what a path resolves to.
int LayerWriter::Parent(const std::vector<std::string>& path, bool create, int* dirfd, std::string* failed_at) {
  if (path.size() == 1) {
    *dirfd = root_fd_;
    return 0;
  }
  std::string key;
  for (size_t i = 0; i + 1 < path.size(); i++) key += (i ? "/" : "") + path[i];
  if (parent_.get() < 0 || key != parent_key_) {
    parent_.reset(-1);
    int err = OpenParentAt(root_fd_, path, create, &parent_, failed_at);
    if (err != 0) return err;
    parent_key_ = key;
  }
  *dirfd = parent_.get();
  return 0;
}

int LayerWriter::Replace(int dirfd, const std::string& name, bool keep_dir, bool* kept) {
  struct stat st;
  *kept = false;
  if (fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) return errno == ENOENT ? 0 : errno;
  if (keep_dir && S_ISDIR(st.st_mode)) {
    *kept = true;
    return 0;
  }
  // A removal in another directory may cut through the cached parent's path; one inside the
  // cached parent itself cannot.
  if (dirfd != parent_.get()) parent_.reset(-1);
  return RemoveAt(dirfd, name.c_str(), 0);
}

int LayerWriter::Apply(Op& op, std::string* failed_at) {
  int err;
  if (op.kind == OpKind::kData) {
    if (current_.get() < 0) return EBADF;
    return WriteAll(current_.get(), op.data.get(), op.size);
  }
  if (op.kind == OpKind::kEndFile) {
    if (current_.get() < 0) return EBADF;
    op.attrs.chown = chown_;
    op.attrs.override_xattr = override_xattr_;
    err = SetFileAttrs(current_.get(), op.attrs);
    current_.reset(-1);
    return err;
  }
  if (op.kind == OpKind::kClear) {
    parent_.reset(-1);
    Fd dir;
    if (op.path.empty()) {
      dir.reset(dup(root_fd_));
      if (dir.get() < 0) return errno;
    } else {
      if ((err = Validate(op.path, failed_at)) != 0) return err;
      Fd parent;
      if ((err = OpenParentAt(root_fd_, op.path, false, &parent, failed_at)) != 0) return err == ENOENT ? 0 : err;
      dir.reset(openat(parent.get(), op.path.back().c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
      if (dir.get() < 0) {
        *failed_at = op.path.back();
        return errno == ENOENT ? 0 : errno;
      }
    }
    std::set<std::string> keep(op.names.begin(), op.names.end());
    return RemoveChildren(dir.get(), &keep, 0);
  }
  if ((err = Validate(op.path, failed_at)) != 0) return err;
  if (op.kind == OpKind::kRemove) {
    parent_.reset(-1);
    Fd parent;
    err = OpenParentAt(root_fd_, op.path, false, &parent, failed_at);
    if (err == ENOENT) return 0;  // the parent is gone: so is the entry
    if (err != 0) return err;
    *failed_at = op.path.back();
    return RemoveAt(parent.get(), op.path.back().c_str(), 0);
  }
  int dirfd;
  if ((err = Parent(op.path, op.kind != OpKind::kAttrs, &dirfd, failed_at)) != 0) return err;
  const std::string& name = op.path.back();
  *failed_at = name;
  if (op.kind == OpKind::kAttrs) {
    op.attrs.chown = chown_;
    op.attrs.override_xattr = override_xattr_;
    return SetAttrsAt(dirfd, name, op.attr_kind, op.attrs);
  }
  // Create first; only an EEXIST costs a look at what is there (and its removal: everything but
  // a directory replaced by a directory is replaced, a directory with its contents).
  auto create = [&](const std::function<int()>& make) -> int {
    if (make() == 0) return 0;
    if (errno != EEXIST) return errno;
    bool kept;
    int e = Replace(dirfd, name, op.kind == OpKind::kDir, &kept);
    if (e != 0 || kept) return e;
    return make() == 0 ? 0 : errno;
  };
  switch (op.kind) {
    case OpKind::kDir:
      return create([&] { return mkdirat(dirfd, name.c_str(), 0700); });
    case OpKind::kFile:
      return create([&] {
        int f = openat(dirfd, name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        int e = errno;
        current_.reset(f);
        errno = e;
        return f < 0 ? -1 : 0;
      });
    case OpKind::kSymlink:
      // The target is stored as text and never resolved here (absolute targets resolve in the guest).
      if ((err = create([&] { return symlinkat(op.text.c_str(), dirfd, name.c_str()); })) != 0) return err;
      op.attrs.chown = chown_;
      op.attrs.override_xattr = false;
      return SetAttrsAt(dirfd, name, EntryKind::kSymlink, op.attrs);
    case OpKind::kHardlink: {
      if ((err = Validate(op.names, failed_at)) != 0) return err;
      Fd src_dir;
      if ((err = OpenParentAt(root_fd_, op.names, false, &src_dir, failed_at)) != 0) return err;
      const std::string& src = op.names.back();
      struct stat sst;
      if (fstatat(src_dir.get(), src.c_str(), &sst, AT_SYMLINK_NOFOLLOW) != 0) {
        *failed_at = src;
        return errno;
      }
      if (S_ISDIR(sst.st_mode)) {
        *failed_at = src;
        return EPERM;  // no hard links to directories
      }
      *failed_at = name;
      // flags 0: a symlink source is linked as the symlink itself, never followed.
      return create([&] { return linkat(src_dir.get(), src.c_str(), dirfd, name.c_str(), 0); });
    }
    default:
      return EINVAL;
  }
}

}  // namespace microvm
