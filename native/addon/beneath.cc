#include "addon/beneath.h"
#include "common/fd.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/openat2.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <random>

namespace microvm {

namespace {

bool ValidComponent(const std::string& c) {
  return !c.empty() && c != "." && c != ".." && c.find('/') == std::string::npos && c.find('\0') == std::string::npos &&
         c.size() < 256;
}

}  // namespace

int WriteFileBeneath(const std::string& root, const std::vector<std::string>& components, const void* data, size_t size,
                     mode_t mode, uid_t uid, gid_t gid, const std::vector<DirAttrs>& dir_attrs,
                     std::string* failed_at) {
  if (components.empty()) return EINVAL;
  for (const auto& c : components) {
    if (!ValidComponent(c)) {
      *failed_at = c;
      return EINVAL;
    }
  }
  Fd dir(open(root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir.get() < 0) {
    *failed_at = root;
    return errno;
  }
  for (size_t i = 0; i + 1 < components.size(); i++) {
    const std::string& c = components[i];
    DirAttrs attrs = i < dir_attrs.size() ? dir_attrs[i] : DirAttrs();
    bool created = false;
    if (mkdirat(dir.get(), c.c_str(), attrs.mode & 07777) == 0) {
      created = true;
    } else if (errno != EEXIST) {
      *failed_at = c;
      return errno;
    }
    // O_NOFOLLOW + O_DIRECTORY: a symlink (or anything but a directory) here is refused.
    int next = openat(dir.get(), c.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (next < 0) {
      int err = errno;
      *failed_at = c;
      // Linux reports ENOTDIR for O_DIRECTORY|O_NOFOLLOW on a symlink: name it for what it is.
      struct stat lst;
      if (fstatat(dir.get(), c.c_str(), &lst, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(lst.st_mode)) return ELOOP;
      return err;
    }
    if (created) {
      fchmod(next, attrs.mode & 07777);  // not subject to the umask
      if (attrs.uid != static_cast<uid_t>(-1) || attrs.gid != static_cast<gid_t>(-1)) {
        if (fchown(next, attrs.uid, attrs.gid) != 0 && geteuid() == 0) {
          int err = errno;
          close(next);
          *failed_at = c;
          return err;
        }
      }
    }
    dir.reset(next);
  }

  const std::string& name = components.back();
  // Refuse to replace a symlink or a directory at the target itself.
  struct stat st;
  if (fstatat(dir.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && !S_ISREG(st.st_mode)) {
    *failed_at = name;
    return S_ISLNK(st.st_mode) ? ELOOP : EISDIR;
  }
  std::random_device rd;
  std::string tmp = "." + name.substr(0, 200) + ".microvm-" + std::to_string(rd());
  Fd file(openat(dir.get(), tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (file.get() < 0) {
    *failed_at = name;
    return errno;
  }
  int err = WriteAll(file.get(), static_cast<const char*>(data), size);
  if (err == 0 && fchmod(file.get(), mode & 07777) != 0) err = errno;
  if (err == 0 && (uid != static_cast<uid_t>(-1) || gid != static_cast<gid_t>(-1)) &&
      fchown(file.get(), uid, gid) != 0 && geteuid() == 0) {
    err = errno;
  }
  if (err == 0 && renameat(dir.get(), tmp.c_str(), dir.get(), name.c_str()) != 0) err = errno;
  if (err != 0) {
    unlinkat(dir.get(), tmp.c_str(), 0);
    *failed_at = name;
  }
  return err;
}

int SummarizeTree(const std::string& root, TreeTotals* out, std::string* failed_at) {
  *out = TreeTotals();
  // The root itself is not followed either: a tree replaced by a symlink is an error (ENOTDIR),
  // never the summary of whatever it points at.
  Fd root_fd(open(root.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (root_fd.get() < 0) {
    *failed_at = root;
    return errno;
  }
  std::vector<std::string> pending{"."};
  while (!pending.empty()) {
    std::string rel = std::move(pending.back());
    pending.pop_back();
    struct open_how how = {};
    how.flags = O_RDONLY | O_DIRECTORY | O_CLOEXEC;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    long fd = syscall(SYS_openat2, root_fd.get(), rel.c_str(), &how, sizeof how);
    if (fd < 0) {
      *failed_at = rel;
      return errno;
    }
    DIR* d = fdopendir(static_cast<int>(fd));
    if (d == nullptr) {
      int err = errno;
      close(static_cast<int>(fd));
      *failed_at = rel;
      return err;
    }
    errno = 0;
    while (struct dirent* e = readdir(d)) {
      if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
      out->entries++;
      unsigned char type = e->d_type;
      struct stat st;
      bool have_stat = false;
      if (type == DT_UNKNOWN || type == DT_REG) {
        if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
          int err = errno;
          closedir(d);
          *failed_at = rel + "/" + e->d_name;
          return err;
        }
        have_stat = true;
        type = S_ISDIR(st.st_mode) ? DT_DIR : S_ISREG(st.st_mode) ? DT_REG : DT_UNKNOWN;
      }
      if (type == DT_DIR)
        pending.push_back(rel == "." ? std::string(e->d_name) : rel + "/" + e->d_name);
      else if (type == DT_REG && have_stat)
        out->bytes += static_cast<uint64_t>(st.st_size);
      errno = 0;
    }
    int err = errno;
    closedir(d);
    if (err != 0) {
      *failed_at = rel;
      return err;
    }
  }
  return 0;
}

int MarkTopDirectory(const std::string& dir) {
  Fd fd(open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (fd.get() < 0) return errno;
  int flags = 0;  // the kernel reads and writes an int, whatever the ioctl's declared type
  if (ioctl(fd.get(), FS_IOC_GETFLAGS, &flags) != 0) return errno;
  if (flags & FS_TOPDIR_FL) return 0;
  flags |= FS_TOPDIR_FL;
  return ioctl(fd.get(), FS_IOC_SETFLAGS, &flags) == 0 ? 0 : errno;
}

}  // namespace microvm
