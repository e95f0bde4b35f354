// See tree_copy.h. Three passes:
//   1. one thread walks the source: directories made (mode 0700 until pass 3), symlinks and FIFOs
//      made with their owners and times, regular files listed (the second and later names of a
//      hard-linked inode listed as links);
//   2. `threads` threads copy the listed files: FICLONE, else copy_file_range, else read/write;
//      then owner, extended attributes, mode (after chown, which clears set-id bits) and times;
//   3. hard links made; directories get their owner, xattrs, mode and times, deepest first (a
//      child made later would change the parent's mtime).
// Why not `cp -a`: it copies one file at a time; on the rootfs trees we clone (tens of thousands of
// small files) the time is per-file system calls, which several threads spread over the cores, and
// where the new inodes go (see Walk: the top directory's FS_TOPDIR_FL).
#include "addon/tree_copy.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "addon/beneath.h"
#include "common/fd.h"

namespace microvm {
namespace {

struct FileJob {
  std::string src;
  std::string dst;
  struct stat st;
};

struct DirJob {
  std::string src;
  std::string dst;
  struct stat st;
};

class Copier {
 public:
  Copier(const TreeCopyOptions& o, const std::atomic<bool>& cancel) : o_(o), cancel_(cancel) {}

  bool Run(const std::string& src, const std::string& dst, TreeCopyResult* result, TreeCopyFailure* failure) {
    struct stat st;
    if (lstat(src.c_str(), &st) != 0) return Fail(errno, src, "lstat");
    if (!S_ISDIR(st.st_mode)) return Fail(ENOTDIR, src, "lstat");
    is_root_ = geteuid() == 0;
    if (!Walk(src, dst, st, 0)) return Finish(result, failure);
    CopyFiles();
    if (failed_.load()) return Finish(result, failure);
    for (const auto& l : links_) {
      if (linkat(AT_FDCWD, l.first.c_str(), AT_FDCWD, l.second.c_str(), 0) != 0) {
        Fail(errno, l.second, "link");
        return Finish(result, failure);
      }
      res_.links++;
    }
    for (auto it = dirs_.rbegin(); it != dirs_.rend(); ++it) {
      Fd d(open(it->dst.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
      if (d.get() < 0 || !ApplyAttrs(d.get(), it->src, it->st)) {
        if (d.get() < 0) Fail(errno, it->src, "open directory");
        return Finish(result, failure);
      }
    }
    return Finish(result, failure);
  }

 private:
  bool Fail(int err, const std::string& path, const char* what) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!failed_.exchange(true)) {
      failure_.err = err;
      failure_.path = path;
      failure_.what = what;
    }
    return false;
  }

  bool Finish(TreeCopyResult* result, TreeCopyFailure* failure) {
    *result = res_;
    if (!failed_.load()) return true;
    *failure = failure_;
    return false;
  }

  bool Walk(const std::string& src, const std::string& dst, const struct stat& st, int depth) {
    if (cancel_.load(std::memory_order_relaxed)) return Fail(ECANCELED, src, "cancelled");
    if (depth > 4096) return Fail(ELOOP, src, "walk");
    if (mkdir(dst.c_str(), 0700) != 0) return Fail(errno, dst, "mkdir");
    // The copy's top directory gets FS_TOPDIR_FL (ext4's Orlov allocator then puts each of its
    // subdirectories in a block group of its own). Without it, new inodes go to the groups where
    // the last clones were just deleted, and a journal-less ext4 scans past every inode freed in
    // the last seconds for each file it makes: 20,000 files took 14-16 s where they take ~1.2 s
    // with it (cp -a either way). Best effort: other filesystems have no such flag.
    if (depth == 0) MarkTopDirectory(dst);
    dirs_.push_back(DirJob{src, dst, st});
    res_.dirs++;
    Fd fd(open(src.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (fd.get() < 0) return Fail(errno, src, "open directory");
    DIR* dir = fdopendir(fd.release());
    if (dir == nullptr) return Fail(errno, src, "fdopendir");
    std::vector<std::string> names;
    errno = 0;
    while (struct dirent* e = readdir(dir)) {
      if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
      names.emplace_back(e->d_name);
    }
    int derr = errno;
    int dfd = dirfd(dir);
    // Entries are stat'ed relative to the open directory: a name never resolves through a link.
    std::vector<std::pair<std::string, struct stat>> entries;
    entries.reserve(names.size());
    for (auto& n : names) {
      struct stat est;
      if (fstatat(dfd, n.c_str(), &est, AT_SYMLINK_NOFOLLOW) != 0) {
        int err = errno;
        closedir(dir);
        return Fail(err, src + "/" + n, "lstat");
      }
      entries.emplace_back(std::move(n), est);
    }
    closedir(dir);
    if (derr != 0) return Fail(derr, src, "readdir");
    for (auto& [name, est] : entries) {
      std::string s = src + "/" + name;
      std::string d = dst + "/" + name;
      if (S_ISDIR(est.st_mode)) {
        if (!Walk(s, d, est, depth + 1)) return false;
      } else if (S_ISREG(est.st_mode)) {
        if (est.st_nlink > 1) {
          auto key = std::make_pair(static_cast<uint64_t>(est.st_dev), static_cast<uint64_t>(est.st_ino));
          auto it = inodes_.find(key);
          if (it != inodes_.end()) {
            links_.emplace_back(it->second, d);
            continue;
          }
          inodes_.emplace(key, d);
        }
        files_.push_back(FileJob{std::move(s), std::move(d), est});
      } else if (S_ISLNK(est.st_mode)) {
        if (!CopySymlink(s, d, est)) return false;
      } else if (S_ISFIFO(est.st_mode)) {
        if (mkfifo(d.c_str(), 0600) != 0) return Fail(errno, d, "mkfifo");
        Fd f(open(d.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
        if (f.get() < 0) return Fail(errno, d, "open");
        if (!ApplyAttrs(f.get(), s, est, /*path_fd=*/true)) return false;
      }
      // Sockets and device nodes: skipped (see tree_copy.h).
    }
    return true;
  }

  bool CopySymlink(const std::string& s, const std::string& d, const struct stat& st) {
    std::vector<char> target(static_cast<size_t>(std::max<off_t>(st.st_size, 0)) + 2);
    ssize_t n = readlink(s.c_str(), target.data(), target.size());
    if (n < 0) return Fail(errno, s, "readlink");
    if (static_cast<size_t>(n) >= target.size()) return Fail(ENAMETOOLONG, s, "readlink");
    target[static_cast<size_t>(n)] = '\0';
    if (symlink(target.data(), d.c_str()) != 0) return Fail(errno, d, "symlink");
    if (lchown(d.c_str(), st.st_uid, st.st_gid) != 0 && (is_root_ || errno != EPERM)) return Fail(errno, d, "lchown");
    struct timespec ts[2] = {st.st_atim, st.st_mtim};
    if (utimensat(AT_FDCWD, d.c_str(), ts, AT_SYMLINK_NOFOLLOW) != 0) return Fail(errno, d, "utimensat");
    res_.symlinks++;
    return true;
  }

  // Owner (where permitted: as cp -a, a user other than root keeps its own), extended attributes,
  // mode, times. `fd` is open on the copy; an O_PATH one goes through /proc/self/fd.
  bool ApplyAttrs(int fd, const std::string& src, const struct stat& st, bool path_fd = false) {
    char proc[64];
    std::snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    int r = path_fd ? chown(proc, st.st_uid, st.st_gid) : fchown(fd, st.st_uid, st.st_gid);
    if (r != 0 && (is_root_ || errno != EPERM)) return Fail(errno, src, "chown");
    if (!CopyXattrs(src, fd, path_fd ? proc : nullptr)) return false;
    r = path_fd ? chmod(proc, st.st_mode & 07777) : fchmod(fd, st.st_mode & 07777);
    if (r != 0) return Fail(errno, src, "chmod");
    struct timespec ts[2] = {st.st_atim, st.st_mtim};
    r = path_fd ? utimensat(AT_FDCWD, proc, ts, 0) : futimens(fd, ts);
    if (r != 0) return Fail(errno, src, "utimens");
    return true;
  }

  // Every extended attribute the source has (user.containers.override_stat among them). Names the
  // destination refuses as unprivileged (security.*, trusted.*) or does not support are skipped,
  // as cp -a does.
  bool CopyXattrs(const std::string& src, int fd, const char* proc) {
    char names[8192];
    ssize_t len = llistxattr(src.c_str(), names, sizeof names);
    if (len < 0) {
      if (errno == ENOTSUP || errno == ENODATA) return true;
      if (errno != ERANGE) return Fail(errno, src, "listxattr");
      return Fail(E2BIG, src, "listxattr");  // more than 8 KiB of names: not an image we made
    }
    if (len == 0) return true;
    // One buffer per copying thread (xattr values are at most 64 KiB), not one per file.
    thread_local std::vector<char> value(65536);
    for (ssize_t i = 0; i < len;) {
      const char* name = names + i;
      i += static_cast<ssize_t>(std::strlen(name)) + 1;
      ssize_t vlen = lgetxattr(src.c_str(), name, value.data(), value.size());
      if (vlen < 0) {
        if (errno == ENODATA) continue;
        return Fail(errno, src, "getxattr");
      }
      int r = proc ? setxattr(proc, name, value.data(), static_cast<size_t>(vlen), 0)
                   : fsetxattr(fd, name, value.data(), static_cast<size_t>(vlen), 0);
      if (r != 0 && errno != ENOTSUP && errno != EPERM && errno != EACCES) return Fail(errno, src, "setxattr");
    }
    return true;
  }

  void CopyFiles() {
    int n = std::clamp(o_.threads, 1, 64);
    if (files_.size() < 64) n = 1;
    std::vector<std::thread> threads;
    for (int i = 0; i < n; i++) threads.emplace_back([this] { CopyWorker(); });
    for (auto& t : threads) t.join();
  }

  void CopyWorker() {
    uint64_t bytes = 0, files = 0, cloned = 0;
    for (;;) {
      if (failed_.load(std::memory_order_relaxed)) break;
      if (cancel_.load(std::memory_order_relaxed)) {
        Fail(ECANCELED, "", "cancelled");
        break;
      }
      size_t i = next_.fetch_add(1);
      if (i >= files_.size()) break;
      const FileJob& job = files_[i];
      bool was_cloned = false;
      if (!CopyFile(job, &was_cloned)) break;
      bytes += static_cast<uint64_t>(job.st.st_size);
      files++;
      if (was_cloned) cloned++;
    }
    std::lock_guard<std::mutex> lock(mu_);
    res_.bytes += bytes;
    res_.files += files;
    res_.reflinked += cloned;
  }

  bool CopyFile(const FileJob& job, bool* cloned) {
    Fd in(open(job.src.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
    if (in.get() < 0) return Fail(errno, job.src, "open");
    Fd out(open(job.dst.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
    if (out.get() < 0) return Fail(errno, job.dst, "create");
    if (job.st.st_size > 0) {
      if (ioctl(out.get(), FICLONE, in.get()) == 0) {
        *cloned = true;
      } else if (o_.reflink == ReflinkMode::kAlways) {
        return Fail(errno, job.src, "FICLONE");
      } else if (!CopyData(in.get(), out.get(), job)) {
        return false;
      }
    }
    return ApplyAttrs(out.get(), job.src, job.st);
  }

  bool CopyData(int in, int out, const FileJob& job) {
    off_t left = job.st.st_size;
    bool range = true;
    while (left > 0) {
      if (range) {
        ssize_t n = copy_file_range(in, nullptr, out, nullptr, static_cast<size_t>(left), 0);
        if (n > 0) {
          left -= n;
          continue;
        }
        if (n == 0) break;  // the source shrank: copy what it has
        if (errno == EINTR) continue;
        if (errno != EXDEV && errno != ENOSYS && errno != EINVAL && errno != EOPNOTSUPP)
          return Fail(errno, job.src, "copy_file_range");
        range = false;
      }
      char buf[1 << 16];
      ssize_t n = read(in, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Fail(errno, job.src, "read");
      if (n == 0) break;
      int err = WriteAll(out, buf, static_cast<size_t>(n));
      if (err != 0) return Fail(err, job.dst, "write");
      left -= n;
    }
    return true;
  }

  const TreeCopyOptions o_;
  const std::atomic<bool>& cancel_;
  bool is_root_ = false;
  std::vector<DirJob> dirs_;
  std::vector<FileJob> files_;
  std::vector<std::pair<std::string, std::string>> links_;
  std::map<std::pair<uint64_t, uint64_t>, std::string> inodes_;
  std::atomic<size_t> next_{0};
  std::atomic<bool> failed_{false};
  std::mutex mu_;
  TreeCopyFailure failure_;
  TreeCopyResult res_;
};

}  // namespace

bool CopyTree(const std::string& src, const std::string& dst, const TreeCopyOptions& options,
              const std::atomic<bool>& cancel, TreeCopyResult* result, TreeCopyFailure* failure) {
  Copier c(options, cancel);
  return c.Run(src, dst, result, failure);
}

}  // namespace microvm
