// The file-server guard: what a guest does to files through virtio-fs never gives a host user a
// privilege. Loaded into the processes that serve a guest's files — virtiofsd (QEMU backend) through
// LD_PRELOAD as microvm-fsguard.so, and the libkrun runner, which links this file and exports these
// symbols, so libkrun's in-process virtio-fs server calls them instead of libc's.
//
// Why interposition and not a mapping: the file servers run as the caller (root, often) and apply
// the guest's modes and mknod as they come; this virtiofsd (Debian 12's C one) has no uid
// translation and no read-only option, and libkrun has none as root. Interposing on the handful of
// libc calls that set modes or make nodes is the smallest change that holds for both servers:
//   - chmod/fchmod/fchmodat, open/openat/creat with O_CREAT, mknod/mknodat: the set-user-ID bit is
//     removed, and set-group-ID too except on directories (where it only makes new entries inherit
//     the group, which grants nothing);
//   - mknod/mknodat of a block or character device fails with EPERM (FIFOs and sockets are fine);
//   - setxattr/lsetxattr/fsetxattr of security.capability (file capabilities) fails with EPERM;
//   - mkfifo/mkfifoat (glibc does not route them through the exported mknodat): set-ID bits removed.
// And one thing for a caller who is not root: in the user namespace the QEMU backend runs virtiofsd
// in (`unshare -r`), the kernel denies setgroups() (an unprivileged gid map requires it), and
// virtiofsd refuses to start when it cannot drop its supplementary groups. There, getgroups()
// reports none and setgroups(0, NULL) succeeds without changing anything: the groups stay the
// caller's own (host gids the namespace does not map), which grant the guest nothing the calling
// user's files do not already give it through the share.
// A guest therefore sees EPERM for device nodes and loses set-ID bits it sets (documented in
// docs/security.md). Files the image already carries keep their bits: they are the image's, and the
// image cache and VM directories are 0700 so no other host user reaches them.
//
// MICROVM_FSGUARD_LOG=<path> (tests): each refusal or stripped mode is appended there as a line.
// Fortified headers define open() and friends inline; this file defines them.
#undef _FORTIFY_SOURCE
// node-gyp sets _FILE_OFFSET_BITS=64, which renames open() to open64 in the headers; both are
// defined here by name (the same on x86_64).
#undef _FILE_OFFSET_BITS
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <unistd.h>

#define GUARD_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

template <typename F>
F next(const char* name) {
  return reinterpret_cast<F>(dlsym(RTLD_NEXT, name));
}

using chmod_t = int (*)(const char*, mode_t);
using fchmod_t = int (*)(int, mode_t);
using fchmodat_t = int (*)(int, const char*, mode_t, int);
using open_t = int (*)(const char*, int, ...);
using openat_t = int (*)(int, const char*, int, ...);
using creat_t = int (*)(const char*, mode_t);
using mknodat_t = int (*)(int, const char*, mode_t, dev_t);
using mknod_t = int (*)(const char*, mode_t, dev_t);
using setxattr_t = int (*)(const char*, const char*, const void*, size_t, int);
using fsetxattr_t = int (*)(int, const char*, const void*, size_t, int);
using mkfifo_t = int (*)(const char*, mode_t);
using mkfifoat_t = int (*)(int, const char*, mode_t);
using getgroups_t = int (*)(int, gid_t*);
using setgroups_t = int (*)(size_t, const gid_t*);

struct Real {
  chmod_t chmod_;
  fchmod_t fchmod_;
  fchmodat_t fchmodat_;
  open_t open_, open64_;
  openat_t openat_, openat64_;
  creat_t creat_, creat64_;
  mknodat_t mknodat_;
  mknod_t mknod_;
  setxattr_t setxattr_, lsetxattr_;
  fsetxattr_t fsetxattr_;
  mkfifo_t mkfifo_;
  mkfifoat_t mkfifoat_;
  getgroups_t getgroups_;
  setgroups_t setgroups_;
};

// Whether this process is in a user namespace whose setgroups() the kernel denies.
bool groups_locked = false;

Real real;
void open_log();

// Resolved before main (and before virtiofsd installs its seccomp filter: dlsym may allocate), or
// at the first call when another library's constructor calls in first.
bool resolved = false;
__attribute__((constructor)) void resolve() {
  if (resolved) return;
  resolved = true;
  real.chmod_ = next<chmod_t>("chmod");
  real.fchmod_ = next<fchmod_t>("fchmod");
  real.fchmodat_ = next<fchmodat_t>("fchmodat");
  real.open_ = next<open_t>("open");
  real.open64_ = next<open_t>("open64");
  real.openat_ = next<openat_t>("openat");
  real.openat64_ = next<openat_t>("openat64");
  real.creat_ = next<creat_t>("creat");
  real.creat64_ = next<creat_t>("creat64");
  real.mknodat_ = next<mknodat_t>("mknodat");
  real.mknod_ = next<mknod_t>("mknod");
  real.setxattr_ = next<setxattr_t>("setxattr");
  real.lsetxattr_ = next<setxattr_t>("lsetxattr");
  real.fsetxattr_ = next<fsetxattr_t>("fsetxattr");
  real.mkfifo_ = next<mkfifo_t>("mkfifo");
  real.mkfifoat_ = next<mkfifoat_t>("mkfifoat");
  real.getgroups_ = next<getgroups_t>("getgroups");
  real.setgroups_ = next<setgroups_t>("setgroups");
  open_log();
  // Read once, before virtiofsd sandboxes itself (later /proc may be another namespace's).
  if (real.open_) {
    int fd = real.open_("/proc/self/setgroups", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      char buf[16] = {0};
      ssize_t n = read(fd, buf, sizeof buf - 1);
      groups_locked = n >= 4 && strncmp(buf, "deny", 4) == 0;
      close(fd);
    }
  }
}

// Log for tests, opened once here: virtiofsd later pivots into the shared directory, where the
// path would no longer resolve; the descriptor stays valid.
int log_fd = -1;

void open_log() {
  const char* log = getenv("MICROVM_FSGUARD_LOG");
  if (log && real.open_) log_fd = real.open_(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
}

void note(const char* what, const char* name, mode_t mode) {
  if (log_fd < 0) return;
  char line[512];
  int n = snprintf(line, sizeof line, "%s %s %o\n", what, name ? name : "-", static_cast<unsigned>(mode));
  if (n <= 0) return;
  size_t len = static_cast<size_t>(n) < sizeof line ? static_cast<size_t>(n) : sizeof line - 1;
  ssize_t ignored = write(log_fd, line, len);
  (void)ignored;
}

// The mode with set-ID bits removed; `is_dir` keeps set-group-ID.
mode_t safe_mode(mode_t mode, bool is_dir, const char* name) {
  mode_t drop = is_dir ? S_ISUID : (S_ISUID | S_ISGID);
  if (mode & drop) {
    note("strip", name, mode);
    return mode & ~drop;
  }
  return mode;
}

bool creates(int flags) {
  return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE;
}

bool is_device(mode_t mode) {
  return S_ISBLK(mode) || S_ISCHR(mode);
}

bool is_capability(const char* name) {
  return name && strcmp(name, "security.capability") == 0;
}

int refuse(const char* what, const char* name, mode_t mode) {
  note(what, name, mode);
  errno = EPERM;
  return -1;
}

}  // namespace

GUARD_EXPORT int chmod(const char* path, mode_t mode) {
  resolve();
  struct stat st;
  bool dir = stat(path, &st) == 0 && S_ISDIR(st.st_mode);
  return real.chmod_(path, safe_mode(mode, dir, path));
}

GUARD_EXPORT int fchmod(int fd, mode_t mode) {
  resolve();
  struct stat st;
  bool dir = fstat(fd, &st) == 0 && S_ISDIR(st.st_mode);
  return real.fchmod_(fd, safe_mode(mode, dir, "(fd)"));
}

GUARD_EXPORT int fchmodat(int dirfd, const char* path, mode_t mode, int flags) {
  resolve();
  struct stat st;
  bool dir = fstatat(dirfd, path, &st, flags & AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode);
  return real.fchmodat_(dirfd, path, safe_mode(mode, dir, path), flags);
}

GUARD_EXPORT int open(const char* path, int flags, ...) {
  resolve();
  mode_t mode = 0;
  if (creates(flags)) {
    va_list ap;
    va_start(ap, flags);
    mode = safe_mode(static_cast<mode_t>(va_arg(ap, int)), false, path);
    va_end(ap);
  }
  return real.open_(path, flags, mode);
}

GUARD_EXPORT int open64(const char* path, int flags, ...) {
  resolve();
  mode_t mode = 0;
  if (creates(flags)) {
    va_list ap;
    va_start(ap, flags);
    mode = safe_mode(static_cast<mode_t>(va_arg(ap, int)), false, path);
    va_end(ap);
  }
  return real.open64_(path, flags, mode);
}

GUARD_EXPORT int openat(int dirfd, const char* path, int flags, ...) {
  resolve();
  mode_t mode = 0;
  if (creates(flags)) {
    va_list ap;
    va_start(ap, flags);
    mode = safe_mode(static_cast<mode_t>(va_arg(ap, int)), false, path);
    va_end(ap);
  }
  return real.openat_(dirfd, path, flags, mode);
}

GUARD_EXPORT int openat64(int dirfd, const char* path, int flags, ...) {
  resolve();
  mode_t mode = 0;
  if (creates(flags)) {
    va_list ap;
    va_start(ap, flags);
    mode = safe_mode(static_cast<mode_t>(va_arg(ap, int)), false, path);
    va_end(ap);
  }
  return real.openat64_(dirfd, path, flags, mode);
}

GUARD_EXPORT int creat(const char* path, mode_t mode) {
  resolve();
  return real.creat_(path, safe_mode(mode, false, path));
}

GUARD_EXPORT int creat64(const char* path, mode_t mode) {
  resolve();
  return real.creat64_(path, safe_mode(mode, false, path));
}

GUARD_EXPORT int mknodat(int dirfd, const char* path, mode_t mode, dev_t dev) {
  resolve();
  if (is_device(mode)) return refuse("mknod", path, mode);
  return real.mknodat_(dirfd, path, safe_mode(mode, false, path), dev);
}

GUARD_EXPORT int mknod(const char* path, mode_t mode, dev_t dev) {
  resolve();
  if (is_device(mode)) return refuse("mknod", path, mode);
  return real.mknod_(path, safe_mode(mode, false, path), dev);
}

GUARD_EXPORT int setxattr(const char* path, const char* name, const void* value, size_t size, int flags) {
  resolve();
  if (is_capability(name)) return refuse("xattr", path, 0);
  return real.setxattr_(path, name, value, size, flags);
}

GUARD_EXPORT int lsetxattr(const char* path, const char* name, const void* value, size_t size, int flags) {
  resolve();
  if (is_capability(name)) return refuse("xattr", path, 0);
  return real.lsetxattr_(path, name, value, size, flags);
}

GUARD_EXPORT int fsetxattr(int fd, const char* name, const void* value, size_t size, int flags) {
  resolve();
  if (is_capability(name)) return refuse("xattr", "(fd)", 0);
  return real.fsetxattr_(fd, name, value, size, flags);
}

GUARD_EXPORT int mkfifo(const char* path, mode_t mode) {
  resolve();
  return real.mkfifo_(path, safe_mode(mode, false, path));
}

GUARD_EXPORT int mkfifoat(int dirfd, const char* path, mode_t mode) {
  resolve();
  return real.mkfifoat_(dirfd, path, safe_mode(mode, false, path));
}

GUARD_EXPORT int getgroups(int size, gid_t list[]) {
  resolve();
  if (groups_locked) return 0;  // see the header: nothing this process could drop
  return real.getgroups_(size, list);
}

GUARD_EXPORT int setgroups(size_t size, const gid_t* list) {
  resolve();
  if (groups_locked && size == 0) return 0;
  return real.setgroups_(size, list);
}
