#include "extract.h"
#include "fd.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <set>

namespace microvm {

namespace {


bool ValidComponent(const std::string& c) {
  return !c.empty() && c != "." && c != ".." && c.find('/') == std::string::npos &&
         c.find('\0') == std::string::npos && c.size() < 256;
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
int OpenParent(const std::string& root, const std::vector<std::string>& components, bool create, Fd* out,
               std::string* failed_at) {
  Fd root_fd(open(root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (root_fd.get() < 0) {
    *failed_at = root;
    return errno;
  }
  if (components.size() == 1) {
    out->reset(root_fd.release());
    return 0;
  }
  std::string path;
  for (size_t i = 0; i + 1 < components.size(); i++) path += (i ? "/" : "") + components[i];
  int fd = OpenDirInRoot(root_fd.get(), path);
  if (fd < 0 && errno == ENOENT && create) {
    // Create the missing ones, one level at a time, each resolved in the root again.
    std::string prefix;
    for (size_t i = 0; i + 1 < components.size(); i++) {
      std::string parent = prefix;
      prefix += (i ? "/" : "") + components[i];
      int pfd = parent.empty() ? dup(root_fd.get()) : OpenDirInRoot(root_fd.get(), parent);
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
    fd = OpenDirInRoot(root_fd.get(), path);
  }
  if (fd < 0) {
    *failed_at = path;
    return errno;
  }
  out->reset(fd);
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

}  // namespace

int ExtractEntry(const std::string& root, const std::vector<std::string>& components, EntryKind kind,
                 const std::string& link_target, const std::vector<std::string>& hardlink_components,
                 bool create_parents, int* fd, std::string* failed_at) {
  int err = Validate(components, failed_at);
  if (err != 0) return err;
  Fd dir;
  if ((err = OpenParent(root, components, create_parents, &dir, failed_at)) != 0) return err;
  const std::string& name = components.back();
  *failed_at = name;
  struct stat st;
  bool exists = fstatat(dir.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0;

  if (kind == EntryKind::kDir) {
    if (exists && S_ISDIR(st.st_mode)) return 0;
    if (exists && (err = RemoveAt(dir.get(), name.c_str(), 0)) != 0) return err;
    return mkdirat(dir.get(), name.c_str(), 0700) == 0 ? 0 : errno;
  }
  // Everything else replaces what is there (a directory included, with its contents).
  if (exists && (err = RemoveAt(dir.get(), name.c_str(), 0)) != 0) return err;
  switch (kind) {
    case EntryKind::kFile: {
      int f = openat(dir.get(), name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
      if (f < 0) return errno;
      *fd = f;
      return 0;
    }
    case EntryKind::kSymlink:
      // The target is stored as text and never resolved here (absolute targets resolve in the guest).
      return symlinkat(link_target.c_str(), dir.get(), name.c_str()) == 0 ? 0 : errno;
    case EntryKind::kHardlink: {
      if ((err = Validate(hardlink_components, failed_at)) != 0) return err;
      Fd src_dir;
      if ((err = OpenParent(root, hardlink_components, false, &src_dir, failed_at)) != 0) return err;
      const std::string& src = hardlink_components.back();
      struct stat sst;
      if (fstatat(src_dir.get(), src.c_str(), &sst, AT_SYMLINK_NOFOLLOW) != 0) {
        *failed_at = src;
        return errno;
      }
      if (S_ISDIR(sst.st_mode)) {
        *failed_at = src;
        return EPERM;  // no hard links to directories
      }
      // flags 0: a symlink source is linked as the symlink itself, never followed.
      if (linkat(src_dir.get(), src.c_str(), dir.get(), name.c_str(), 0) != 0) return errno;
      return 0;
    }
    default:
      return EINVAL;
  }
}

int SetEntryAttrs(const std::string& root, const std::vector<std::string>& components, EntryKind kind,
                  const EntryAttrs& a, std::string* failed_at) {
  int err = Validate(components, failed_at);
  if (err != 0) return err;
  Fd dir;
  if ((err = OpenParent(root, components, false, &dir, failed_at)) != 0) return err;
  const std::string& name = components.back();
  *failed_at = name;
  if (a.chown && fchownat(dir.get(), name.c_str(), a.uid, a.gid, AT_SYMLINK_NOFOLLOW) != 0) return errno;
  if (kind != EntryKind::kSymlink) {
    // After chown (which clears setuid/setgid). An O_PATH|O_NOFOLLOW handle pins exactly this
    // entry (a mode 0000 file cannot be opened for reading when unprivileged); chmod and setxattr
    // go through its /proc/self/fd link.
    Fd self(openat(dir.get(), name.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
    if (self.get() < 0) return errno;
    struct stat st;
    if (fstat(self.get(), &st) != 0) return errno;
    if (S_ISLNK(st.st_mode)) return ELOOP;
    char proc[64];
    std::snprintf(proc, sizeof proc, "/proc/self/fd/%d", self.get());
    if (chmod(proc, a.mode & 07777) != 0) return errno;
    if (a.override_xattr) {
      char value[64];
      std::snprintf(value, sizeof value, "%u:%u:0%o", static_cast<unsigned>(a.uid), static_cast<unsigned>(a.gid),
                    static_cast<unsigned>(a.mode & 07777));
      // Best effort: filesystems without user xattrs refuse it.
      setxattr(proc, "user.containers.override_stat", value, std::char_traits<char>::length(value), 0);
    }
  }
  struct timespec ts[2];
  ts[0].tv_sec = a.mtime_sec;
  ts[0].tv_nsec = a.mtime_nsec;
  ts[1] = ts[0];
  if (utimensat(dir.get(), name.c_str(), ts, AT_SYMLINK_NOFOLLOW) != 0) return errno;
  return 0;
}

int RemoveEntry(const std::string& root, const std::vector<std::string>& components, std::string* failed_at) {
  int err = Validate(components, failed_at);
  if (err != 0) return err;
  Fd dir;
  err = OpenParent(root, components, false, &dir, failed_at);
  if (err == ENOENT) return 0;  // the parent is gone: so is the entry
  if (err != 0) return err;
  *failed_at = components.back();
  return RemoveAt(dir.get(), components.back().c_str(), 0);
}

int ClearDirectory(const std::string& root, const std::vector<std::string>& components,
                   const std::vector<std::string>& keep, std::string* failed_at) {
  Fd dir;
  int err;
  if (components.empty()) {
    dir.reset(open(root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (dir.get() < 0) return errno;
  } else {
    if ((err = Validate(components, failed_at)) != 0) return err;
    Fd parent;
    if ((err = OpenParent(root, components, false, &parent, failed_at)) != 0) return err == ENOENT ? 0 : err;
    dir.reset(openat(parent.get(), components.back().c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (dir.get() < 0) {
      *failed_at = components.back();
      return errno == ENOENT ? 0 : errno;
    }
  }
  std::set<std::string> k(keep.begin(), keep.end());
  return RemoveChildren(dir.get(), &k, 0);
}

}  // namespace microvm
