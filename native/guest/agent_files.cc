// The agent's file requests: put (a private temporary file renamed into place at the end), get,
// list, and the requests answered at once (stat, mkdir, symlink, attr, rename, remove).
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "guest/agent_state.h"

namespace microvm {
namespace agent {
namespace {

std::string Dirname(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string EntryJson(const std::string& rel, const std::string& full, const struct stat& st) {
  std::string j = "{\"p\":";
  JsonQuote(rel, &j);
  const char* t = S_ISDIR(st.st_mode) ? "d" : S_ISREG(st.st_mode) ? "f" : S_ISLNK(st.st_mode) ? "l" : "o";
  j += std::string(",\"t\":\"") + t + "\",\"m\":" + std::to_string(st.st_mode & 07777) +
       ",\"s\":" + std::to_string(st.st_size) + ",\"u\":" + std::to_string(st.st_uid) +
       ",\"g\":" + std::to_string(st.st_gid) +
       ",\"mt\":" + std::to_string(static_cast<long long>(st.st_mtim.tv_sec) * 1000 + st.st_mtim.tv_nsec / 1000000);
  if (S_ISLNK(st.st_mode)) {
    char target[4096];
    ssize_t n = readlink(full.c_str(), target, sizeof target);
    if (n >= 0) {
      j += ",\"l\":";
      JsonQuote(std::string(target, static_cast<size_t>(n)), &j);
    }
  }
  return j + "}";
}

int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) {
  return remove(path) == 0 ? 0 : -1;
}

}  // namespace

void StartOp(Agent& a, uint32_t id, const JsonValue& req) {
  std::string op = Str(req, "op");
  std::string path = Str(req, "path");
  if (path.empty() || path[0] != '/') {
    a.host.Error(id, "EINVAL", op + ": path must be absolute");
    return;
  }
  if (op == "put") {
    auto s = std::make_unique<Stream>();
    s->kind = Stream::Kind::kPut;
    s->id = id;
    s->allowed = kWindow;
    s->dest = path;
    s->mode = static_cast<mode_t>(Num(req, "mode", 0644) & 07777);
    s->uid = Num(req, "uid", -1);
    s->gid = Num(req, "gid", -1);
    s->tmp = Dirname(path) + "/.microvm-put-" + std::to_string(getpid()) + "-" + std::to_string(++a.put_counter);
    s->file_fd = open(s->tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (s->file_fd < 0) {
      int err = errno;
      s->tmp.clear();
      a.host.Errno(id, err, "create " + path);
      return;
    }
    a.streams[id] = std::move(s);
    return;
  }
  if (op == "get" || op == "list") {
    auto s = std::make_unique<Stream>();
    s->id = id;
    s->credit = static_cast<uint64_t>(Num(req, "window", kWindow));
    struct stat st;
    if (op == "get") {
      s->kind = Stream::Kind::kGet;
      // O_NONBLOCK: a FIFO at that path must not block the agent in open(); it is refused below.
      s->file_fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
      if (s->file_fd < 0 || fstat(s->file_fd, &st) != 0) {
        int err = errno;
        Release(s.get());
        a.host.Errno(id, err, "open " + path);
        return;
      }
      if (!S_ISREG(st.st_mode)) {
        Release(s.get());
        a.host.Error(id, S_ISDIR(st.st_mode) ? "EISDIR" : "EINVAL", path + " is not a regular file");
        return;
      }
      fcntl(s->file_fd, F_SETFL, fcntl(s->file_fd, F_GETFL) & ~O_NONBLOCK);
    } else {
      s->kind = Stream::Kind::kList;
      if (lstat(path.c_str(), &st) != 0) {
        a.host.Errno(id, errno, "lstat " + path);
        return;
      }
      s->root = path;
      if (S_ISDIR(st.st_mode)) {
        DIR* d = opendir(path.c_str());
        if (d == nullptr) {
          a.host.Errno(id, errno, "opendir " + path);
          return;
        }
        s->dirs.emplace_back("", d);
      }
    }
    std::string info = EntryJson("", path, st);
    s->credit = s->credit > info.size() ? s->credit - info.size() : 0;
    a.host.Send(kInfo, id, info);
    a.streams[id] = std::move(s);
    return;
  }
  int rc = -1;
  std::string what = op + " " + path;
  if (op == "stat") {
    struct stat st;
    rc = lstat(path.c_str(), &st);
    if (rc == 0) a.host.Send(kInfo, id, EntryJson("", path, st));
  } else if (op == "mkdir") {
    rc = mkdir(path.c_str(), static_cast<mode_t>(Num(req, "mode", 0700) & 07777));
  } else if (op == "symlink") {
    rc = symlink(Str(req, "target").c_str(), path.c_str());
  } else if (op == "attr") {
    long uid = Num(req, "uid", -1), gid = Num(req, "gid", -1), mode = Num(req, "mode", -1);
    rc = 0;
    if (uid >= 0 || gid >= 0) rc = lchown(path.c_str(), static_cast<uid_t>(uid), static_cast<gid_t>(gid));
    struct stat st;
    if (rc == 0 && mode >= 0 && lstat(path.c_str(), &st) == 0 && !S_ISLNK(st.st_mode))
      rc = chmod(path.c_str(), static_cast<mode_t>(mode & 07777));
  } else if (op == "rename") {
    std::string to = Str(req, "to");
    rc = to.empty() || to[0] != '/' ? (errno = EINVAL, -1) : rename(path.c_str(), to.c_str());
  } else if (op == "remove") {
    struct stat st;
    rc = lstat(path.c_str(), &st);
    if (rc == 0)
      rc = S_ISDIR(st.st_mode) ? nftw(path.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS) : unlink(path.c_str());
  } else {
    a.host.Error(id, "ENOSYS", "unknown op " + op);
    return;
  }
  if (rc != 0) {
    a.host.Errno(id, errno, what);
    return;
  }
  a.host.Done(id);
}

void PutData(Agent& a, Stream* s, const std::string& payload) {
  if (!WriteAll(s->file_fd, payload.data(), payload.size())) {
    a.EndWithErrno(s, errno, "write " + s->dest);
    return;
  }
  s->allowed += static_cast<uint32_t>(payload.size());
  a.host.Grant(s->id, static_cast<uint32_t>(payload.size()));
}

void PutEnd(Agent& a, Stream* s) {
  int rc = fchmod(s->file_fd, s->mode);
  if (rc == 0 && (s->uid >= 0 || s->gid >= 0))
    rc = fchown(s->file_fd, static_cast<uid_t>(s->uid), static_cast<gid_t>(s->gid));
  if (rc == 0) rc = close(s->file_fd);
  s->file_fd = -1;
  if (rc == 0) rc = rename(s->tmp.c_str(), s->dest.c_str());
  if (rc != 0) {
    a.EndWithErrno(s, errno, "write " + s->dest);
    return;
  }
  s->tmp.clear();
  a.host.Done(s->id);
  a.End(s->id);
}

void ServiceGet(Agent& a, Stream* s) {
  char* const buf = a.io_buf.data();
  const size_t buf_size = a.io_buf.size();
  const uint32_t id = s->id;
  while (s->credit > 0) {
    size_t want = s->credit < buf_size ? static_cast<size_t>(s->credit) : buf_size;
    ssize_t n = read(s->file_fd, buf, want);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      a.EndWithErrno(s, errno, "read");
      return;
    }
    if (n == 0) {
      a.host.Done(id);
      a.End(id);
      return;
    }
    a.host.Send(kStdout, id, buf, static_cast<size_t>(n));
    s->credit -= static_cast<uint64_t>(n);
  }
}

void ServiceList(Agent& a, Stream* s) {
  const uint32_t id = s->id;
  while (s->credit > 0) {
    if (s->dirs.empty()) {
      a.host.Done(id);
      a.End(id);
      return;
    }
    auto& top = s->dirs.back();
    struct dirent* e = readdir(top.second);
    if (e == nullptr) {
      closedir(top.second);
      s->dirs.pop_back();
      continue;
    }
    if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
    std::string rel = top.first.empty() ? e->d_name : top.first + "/" + e->d_name;
    std::string full = s->root + (s->root.back() == '/' ? "" : "/") + rel;
    struct stat st;
    if (lstat(full.c_str(), &st) != 0) continue;  // gone meanwhile
    std::string info = EntryJson(rel, full, st);
    s->credit = s->credit > info.size() ? s->credit - info.size() : 0;
    a.host.Send(kInfo, id, info);
    if (S_ISDIR(st.st_mode) && s->dirs.size() < 256) {
      if (DIR* d = opendir(full.c_str())) s->dirs.emplace_back(rel, d);
    }
  }
}

}  // namespace agent
}  // namespace microvm
