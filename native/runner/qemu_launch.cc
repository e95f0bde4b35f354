// The QEMU backend's launcher and helpers: see qemu_launch.h.
#include "runner/qemu_launch.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "common/json.h"

namespace microvm {
namespace {

constexpr int kUsage = 64;
constexpr size_t kMaxPlanBytes = 1 << 20;

[[noreturn]] void Fail(const std::string& message) {
  std::string line = "microvm: " + message + "\n";
  ssize_t ignored = write(STDERR_FILENO, line.data(), line.size());
  (void)ignored;
  _exit(kLaunchFailed);
}

std::string Errno() {
  return std::strerror(errno);
}

bool WriteText(const char* path, const std::string& text) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  close(fd);
  return ok;
}

// A listening unix socket at `path` (0600), close-on-exec; -1 with errno on failure.
int ListenOn(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) {
    errno = ENAMETOOLONG;
    return -1;
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) return -1;
  mode_t old_mask = umask(0177);
  bool ok = bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 && listen(s, 16) == 0;
  umask(old_mask);
  if (!ok) {
    int err = errno;
    close(s);
    errno = err;
    return -1;
  }
  return s;
}

// Copies what arrives on `from` to `to` once; false at end of input or on an error.
bool Pump(int from, int to) {
  char buf[65536];
  ssize_t n = read(from, buf, sizeof buf);
  if (n < 0 && (errno == EINTR || errno == EAGAIN)) return true;
  if (n <= 0) return false;
  for (ssize_t off = 0; off < n;) {
    ssize_t w = write(to, buf + off, static_cast<size_t>(n - off));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    off += w;
  }
  return true;
}

struct SinkStream {
  std::string name;
  unsigned long long max = 0, written = 0, discarded = 0;
  int listen_fd = -1, conn_fd = -1, file_fd = -1;
  bool ended = false;
  const char* state = "ok";  // "truncated" at the limit, "lost" when the disk refused a write
};

// Rewrites the status file in place (it was preallocated: no write here needs new space): the
// sink's pid, a line per stream, and "end" once every stream has ended and all is written.
void WriteSinkStatus(int fd, const std::vector<SinkStream>& streams, bool end = false) {
  std::string text = "pid " + std::to_string(getpid()) + "\n";
  for (const auto& st : streams)
    text += st.name + " " + std::to_string(st.written) + " " + st.state + " " + std::to_string(st.discarded) + "\n";
  if (end) text += "end\n";
  text.resize(4096, ' ');
  ssize_t ignored = pwrite(fd, text.data(), text.size(), 0);
  (void)ignored;
}

// Opens the status file (preallocated, so that it can be written on a full disk); -1 on failure.
int OpenSinkStatus(const std::string& path) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return -1;
  int err = posix_fallocate(fd, 0, 4096);
  if (err != 0) {
    close(fd);
    errno = err;
    return -1;
  }
  return fd;
}

// The sink's work, once its sockets listen and its files are open. Never returns.
[[noreturn]] void SinkLoop(int status_fd, std::vector<SinkStream>& streams) {
  signal(SIGPIPE, SIG_IGN);
  prctl(PR_SET_PDEATHSIG, SIGKILL);  // until every stream is connected (then QEMU's exit ends them)
  // Out of the VM's process group: a stop signals QEMU's group, and the sink must still write what
  // QEMU sent before it went (it ends on its own when QEMU's exit closes the streams).
  setpgid(0, 0);
  WriteSinkStatus(status_fd, streams);
  std::vector<char> buf(65536);
  for (;;) {
    std::vector<pollfd> fds;
    std::vector<size_t> which;
    bool all_connected = true, all_ended = true;
    for (size_t k = 0; k < streams.size(); k++) {
      auto& st = streams[k];
      if (st.conn_fd < 0 && !st.ended) all_connected = false;
      if (!st.ended) all_ended = false;
      int fd = st.ended ? -1 : (st.conn_fd >= 0 ? st.conn_fd : st.listen_fd);
      if (fd < 0) continue;
      fds.push_back({fd, POLLIN, 0});
      which.push_back(k);
    }
    if (all_ended) break;
    if (all_connected) prctl(PR_SET_PDEATHSIG, 0);
    if (poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      _exit(1);
    }
    bool changed = false;
    for (size_t j = 0; j < fds.size(); j++) {
      if (!(fds[j].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      auto& st = streams[which[j]];
      if (st.conn_fd < 0) {
        st.conn_fd = accept4(st.listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
        if (st.conn_fd >= 0) {
          close(st.listen_fd);
          st.listen_fd = -1;
        }
        continue;
      }
      ssize_t n = read(st.conn_fd, buf.data(), buf.size());
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n <= 0) {
        st.ended = true;
        close(st.conn_fd);
        continue;
      }
      size_t len = static_cast<size_t>(n), off = 0;
      if (std::strcmp(st.state, "ok") == 0) {
        size_t room =
            st.written >= st.max ? 0 : static_cast<size_t>(std::min<unsigned long long>(st.max - st.written, len));
        while (off < room) {
          ssize_t w = write(st.file_fd, buf.data() + off, room - off);
          if (w < 0 && errno == EINTR) continue;
          if (w <= 0) {
            st.state = "lost";  // the disk is full (or over quota): the rest goes nowhere, and we say so
            changed = true;
            break;
          }
          off += static_cast<size_t>(w);
          st.written += static_cast<unsigned long long>(w);
        }
        if (std::strcmp(st.state, "ok") == 0 && off < len) {
          st.state = "truncated";
          changed = true;
          std::string mark = "\n[microvm: this log reached its limit of " + std::to_string(st.max) +
                             " bytes; the rest is discarded]\n";
          ssize_t ignored = write(st.file_fd, mark.data(), mark.size());
          (void)ignored;
        }
      }
      if (off < len) st.discarded += len - off;
    }
    if (changed) WriteSinkStatus(status_fd, streams);  // on a change of state; the counts at the end
  }
  for (auto& st : streams) close(st.file_fd);
  WriteSinkStatus(status_fd, streams, true);
  _exit(0);
}

// A string member of `obj`, or Fail.
std::string Str(const JsonValue& obj, const char* key, const char* where) {
  const JsonValue* v = obj.Get(key);
  if (v == nullptr || !v->is_string() || v->string_value().empty() || v->string_value().find('\0') != std::string::npos)
    Fail(std::string("launch plan: ") + where + "." + key + " must be a non-empty string");
  return v->string_value();
}

std::vector<std::string> StrList(const JsonValue* v, const char* where) {
  std::vector<std::string> out;
  if (v == nullptr) return out;
  if (!v->is_array()) Fail(std::string("launch plan: ") + where + " must be an array");
  for (const auto& x : v->array_items()) {
    if (!x.is_string()) Fail(std::string("launch plan: ") + where + " must hold strings");
    out.push_back(x.string_value());
  }
  return out;
}

std::vector<char*> Argv(std::vector<std::string>& args) {
  std::vector<char*> out;
  for (auto& a : args) out.push_back(a.data());
  out.push_back(nullptr);
  return out;
}

// Starts `args` with `env` and `fd` as its fd 3, dying with this process (which becomes QEMU).
void StartHelper(std::vector<std::string> args, std::vector<std::string> env, int fd) {
  pid_t pid = fork();
  if (pid < 0) Fail("fork: " + Errno());
  if (pid > 0) return;
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() == 1) _exit(1);
  if (fd >= 0 && (fd == 3 ? fcntl(3, F_SETFD, 0) : dup2(fd, 3)) < 0) _exit(1);
  auto argv = Argv(args);
  auto envp = Argv(env);
  execve(argv[0], argv.data(), envp.data());
  std::fprintf(stderr, "microvm: cannot run %s: %s\n", args[0].c_str(), std::strerror(errno));
  _exit(127);
}

}  // namespace

int QemuLaunch(int plan_fd, bool die_with_parent) {
  if (die_with_parent) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1) _exit(kLaunchFailed);
  }
  std::string text;
  char chunk[65536];
  for (;;) {
    ssize_t n = read(plan_fd, chunk, sizeof chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) Fail("reading the launch plan: " + Errno());
    if (n == 0) break;
    text.append(chunk, static_cast<size_t>(n));
    if (text.size() > kMaxPlanBytes) Fail("the launch plan is larger than 1 MiB");
  }
  close(plan_fd);
  JsonValue plan;
  std::string error;
  if (!JsonValue::Parse(text, &plan, &error) || !plan.is_object()) Fail("launch plan: " + error);
  const JsonValue* version = plan.Get("version");
  if (version == nullptr || !version->is_number() || version->number_value() != 1)
    Fail("launch plan: version 1 expected");

  // The environment every program started here gets (helpers add their own lines).
  std::vector<std::string> env;
  if (const JsonValue* e = plan.Get("env"); e != nullptr && e->is_object())
    for (const auto& [k, v] : e->object_items())
      if (v.is_string()) env.push_back(k + "=" + v.string_value());

  // 1. A private mount namespace; a user namespace mapping us to root when we are not root.
  uid_t uid = geteuid();
  gid_t gid = getegid();
  if (unshare(CLONE_NEWNS | (uid == 0 ? 0 : CLONE_NEWUSER)) != 0)
    Fail(std::string("unshare: ") + Errno() +
         (uid == 0 ? "" : "; are unprivileged user namespaces disabled (kernel.unprivileged_userns_clone)?"));
  if (uid != 0) {
    WriteText("/proc/self/setgroups", "deny");
    if (!WriteText("/proc/self/uid_map", "0 " + std::to_string(uid) + " 1\n") ||
        !WriteText("/proc/self/gid_map", "0 " + std::to_string(gid) + " 1\n"))
      Fail("writing the user namespace's id maps: " + Errno());
  }
  if (mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) Fail("making / private: " + Errno());

  // 2. The overlay root (userxattr when not root; kernels before 5.11 lack it: once without).
  if (const JsonValue* o = plan.Get("overlay"); o != nullptr && o->is_object()) {
    std::string base = "lowerdir=" + Str(*o, "lower", "overlay") + ",upperdir=" + Str(*o, "upper", "overlay") +
                       ",workdir=" + Str(*o, "work", "overlay");
    std::string merged = Str(*o, "merged", "overlay");
    int rc = mount("overlay", merged.c_str(), "overlay", 0, (base + (uid == 0 ? "" : ",userxattr")).c_str());
    if (rc != 0 && uid != 0 && errno == EINVAL) rc = mount("overlay", merged.c_str(), "overlay", 0, base.c_str());
    if (rc != 0) Fail("mounting the overlay root on " + merged + ": " + Errno());
  }

  // 3. File servers: read-only ones from a read-only bind mount (kernel-enforced; this virtiofsd
  //    has no read-only option); each virtiofsd on a socket made here, with the guard preloaded.
  std::string virtiofsd = Str(plan, "virtiofsd", "plan");
  std::string fs_guard = Str(plan, "fsGuard", "plan");
  const JsonValue* servers = plan.Get("fileServers");
  if (servers == nullptr || !servers->is_array()) Fail("launch plan: fileServers must be an array");
  for (const auto& fsv : servers->array_items()) {
    std::string source = Str(fsv, "source", "fileServers[]");
    std::string socket_path = Str(fsv, "socket", "fileServers[]");
    std::string cache = Str(fsv, "cache", "fileServers[]");
    if (const JsonValue* at = fsv.Get("readOnlyAt"); at != nullptr && at->is_string()) {
      const std::string& mnt = at->string_value();
      if (mount(source.c_str(), mnt.c_str(), nullptr, MS_BIND, nullptr) != 0 ||
          mount(nullptr, mnt.c_str(), nullptr, MS_BIND | MS_REMOUNT | MS_RDONLY, nullptr) != 0)
        Fail("the read-only bind mount of " + source + ": " + Errno());
      source = mnt;
    }
    int s = ListenOn(socket_path);
    if (s < 0) Fail("listening on " + socket_path + ": " + Errno());
    std::vector<std::string> fenv = env;
    fenv.push_back("LD_PRELOAD=" + fs_guard);
    StartHelper({virtiofsd, "--fd=3", "-o", "source=" + source, "-o", "cache=" + cache}, fenv, s);
    close(s);
  }

  // 4. The egress allow-list's relay (Node), on a socket made here.
  if (const JsonValue* r = plan.Get("relay"); r != nullptr && r->is_object()) {
    std::string socket_path = Str(*r, "socket", "relay");
    int s = ListenOn(socket_path);
    if (s < 0) Fail("listening on " + socket_path + ": " + Errno());
    std::vector<std::string> renv = env;
    for (const auto& line : StrList(r->Get("env"), "relay.env")) renv.push_back(line);
    StartHelper({Str(*r, "node", "relay"), Str(*r, "script", "relay"), "--fd", "3", Str(*r, "rules", "relay"),
                 Str(*r, "log", "relay")},
                renv, s);
    close(s);
  }

  // 5. The output ports' sink: sockets made and files opened here, the sink forked.
  const JsonValue* sink = plan.Get("sink");
  if (sink == nullptr || !sink->is_object()) Fail("launch plan: sink must be an object");
  int status_fd = OpenSinkStatus(Str(*sink, "status", "sink"));
  if (status_fd < 0) Fail("the output status file: " + Errno());
  std::vector<SinkStream> streams;
  const JsonValue* list = sink->Get("streams");
  if (list == nullptr || !list->is_array()) Fail("launch plan: sink.streams must be an array");
  for (const auto& sv : list->array_items()) {
    SinkStream st;
    st.name = Str(sv, "name", "sink.streams[]");
    const JsonValue* max = sv.Get("max");
    if (max == nullptr || !max->is_number() || max->number_value() < 0) Fail("launch plan: sink max");
    st.max = static_cast<unsigned long long>(max->number_value());
    std::string socket_path = Str(sv, "socket", "sink.streams[]");
    std::string file = Str(sv, "file", "sink.streams[]");
    st.listen_fd = ListenOn(socket_path);
    if (st.listen_fd < 0) Fail("listening on " + socket_path + ": " + Errno());
    st.file_fd = open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0640);
    if (st.file_fd < 0) Fail("opening " + file + ": " + Errno());
    streams.push_back(st);
  }
  pid_t sink_pid = fork();
  if (sink_pid < 0) Fail("fork: " + Errno());
  if (sink_pid == 0) SinkLoop(status_fd, streams);
  close(status_fd);
  for (auto& st : streams) {
    close(st.listen_fd);
    close(st.file_fd);
  }

  // 6. QEMU, with the egress filter preloaded when the policy needs it.
  std::vector<std::string> qenv = env;
  if (const JsonValue* g = plan.Get("netGuard"); g != nullptr && g->is_object()) {
    qenv.push_back("LD_PRELOAD=" + Str(*g, "library", "netGuard"));
    qenv.push_back("MICROVM_NETGUARD_POLICY=" + Str(*g, "policy", "netGuard"));
  }
  std::vector<std::string> qemu = StrList(plan.Get("qemu"), "qemu");
  if (qemu.empty()) Fail("launch plan: qemu must name the program and its arguments");
  auto argv = Argv(qemu);
  auto envp = Argv(qenv);
  execve(argv[0], argv.data(), envp.data());
  Fail("cannot run " + qemu[0] + ": " + Errno());
}

// --relay-connect SOCKET RULE: QEMU starts it for each guest connection to an allowed name
// (guestfwd=...-cmd:), with that connection as its stdin and stdout. It connects to the VM's one
// relay (lib/network/relay.ts), says which rule it serves ("RULE\n") and copies bytes both ways
// until both sides are done. It decides nothing. Exits 0 when done, 1 when the relay cannot be
// reached (the guest then sees its connection closed).
int RelayConnect(const char* socket_path, const char* rule) {
  signal(SIGPIPE, SIG_IGN);
  size_t rule_len = std::strlen(rule);
  if (rule_len == 0 || rule_len > 8 || std::strspn(rule, "0123456789") != rule_len) return kUsage;
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (s < 0 || std::strlen(socket_path) >= sizeof addr.sun_path) return 1;
  std::memcpy(addr.sun_path, socket_path, std::strlen(socket_path) + 1);
  if (connect(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return 1;
  std::string hello = std::string(rule) + "\n";
  if (write(s, hello.data(), hello.size()) != static_cast<ssize_t>(hello.size())) return 1;
  // fd 0 and fd 1 are the guest's connection (QEMU hands over one socket as both).
  bool from_guest = true, to_guest = true;
  while (from_guest || to_guest) {
    // The relay's socket stays watched after its end of input: POLLHUP there means the relay closed
    // both directions (a refusal, an idle close), and nothing the guest sends can go anywhere.
    pollfd fds[2] = {{from_guest ? 0 : -1, POLLIN, 0}, {s, static_cast<short>(to_guest ? POLLIN : 0), 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return 1;
    }
    if (!to_guest && (fds[1].revents & (POLLHUP | POLLERR))) return 0;
    if (from_guest && (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) && !Pump(0, s)) {
      from_guest = false;
      shutdown(s, SHUT_WR);
    }
    if (to_guest && (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) && !Pump(s, 1)) {
      to_guest = false;
      if (shutdown(1, SHUT_WR) != 0) close(1);
    }
  }
  return 0;
}

// --log-sink STATUS [NAME MAXBYTES SOCKET FILE]...: the sink alone (the launcher forks the same
// loop): each SOCKET listens (QEMU connects to it as a client), FILE keeps at most MAXBYTES, then a
// marker line, and the rest is discarded; a write the disk refuses (ENOSPC, EDQUOT, EFBIG) discards
// the rest too, and says so. STATUS holds "NAME BYTES ok|truncated|lost DISCARDED" per stream.
int LogSink(int argc, char** argv) {
  if (argc < 7 || (argc - 3) % 4 != 0) {
    std::fprintf(stderr, "usage: microvm-runner --log-sink STATUS [NAME MAXBYTES SOCKET FILE]...\n");
    return kUsage;
  }
  int status_fd = OpenSinkStatus(argv[2]);
  if (status_fd < 0) {
    std::fprintf(stderr, "microvm-runner: cannot make %s: %s\n", argv[2], std::strerror(errno));
    return 1;
  }
  std::vector<SinkStream> streams;
  for (int i = 3; i + 3 < argc; i += 4) {
    SinkStream st;
    st.name = argv[i];
    st.max = std::strtoull(argv[i + 1], nullptr, 10);
    st.listen_fd = ListenOn(argv[i + 2]);
    st.file_fd = open(argv[i + 3], O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0640);
    if (st.listen_fd < 0 || st.file_fd < 0) {
      std::fprintf(stderr, "microvm-runner: log sink %s: %s\n", st.name.c_str(), std::strerror(errno));
      return 1;
    }
    streams.push_back(st);
  }
  SinkLoop(status_fd, streams);
}

// --listen-unix PATH -- PROGRAM ARGS...: creates the listening unix socket PATH (0600), puts it on
// fd 3 and execs PROGRAM (virtiofsd --fd=3 ..., for `microvm doctor`'s check). Returns on failure.
int ListenExec(const char* socket_path, char** program) {
  int s = ListenOn(socket_path);
  if (s < 0 || (s == 3 ? fcntl(3, F_SETFD, 0) : dup2(s, 3)) < 0) {
    std::fprintf(stderr, "microvm-runner: cannot listen on %s: %s\n", socket_path, std::strerror(errno));
    return 1;
  }
  execv(program[0], program);
  std::fprintf(stderr, "microvm-runner: cannot run %s: %s\n", program[0], std::strerror(errno));
  return 1;
}

}  // namespace microvm
