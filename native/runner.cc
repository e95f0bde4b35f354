// microvm-runner: a small native executable (no Node inside) that owns one libkrun VM.
//
//   microvm-runner (--plan PATH | --plan-fd N) [--ready-fd N] [--die-with-parent]
//   microvm-runner --relay-connect SOCKET RULE
//   microvm-runner --listen-unix PATH -- PROGRAM ARGS...
//   microvm-runner --log-sink STATUS [NAME MAXBYTES SOCKET FILE]...
//
// The second form is the QEMU backend's per-connection helper for egress allow-lists: QEMU starts
// it for each guest connection to an allowed name (guestfwd=...-cmd:), with that connection as
// its stdin and stdout. It connects to the VM's one relay (lib/network/relay.ts, listening on
// SOCKET), says which rule it serves ("RULE\n"), and copies bytes both ways until both sides are
// done. It decides nothing: the relay connects upstream (or refuses) and logs.
//
// The third form starts the QEMU backend's virtiofsd on a socket made beforehand: it creates the
// listening unix socket PATH (0600), puts it on fd 3 and execs PROGRAM (virtiofsd --fd=3 ...).
// Given its socket, virtiofsd writes no pid file under /run (which a caller who is not root cannot
// write) and the socket exists before virtiofsd has started, so QEMU can connect at once.
//
// The fourth form writes what the guest sends on the QEMU backend's output ports (console, stdout,
// stderr, exit, output times) to their files, bounded on the host: it listens on each SOCKET (QEMU
// connects to them as a client), appends to FILE up to MAXBYTES, then writes one marker line and
// discards the rest. A write the disk refuses (ENOSPC, EDQUOT, EFBIG) discards the rest of that
// stream too, and says so: STATUS, preallocated at start so that it can be written on a full disk,
// holds one line per stream, "NAME BYTES truncated|lost|ok DISCARDED". It exits when every stream
// has ended (QEMU's exit closes them); until every stream is connected it dies with its parent.
//
// It reads a launch plan (JSON, see plan.h), preloads libkrunfw from the plan's firmwarePath,
// dlopens libkrun from the plan's libkrunPath, creates a context, applies the plan with the same
// ApplyPlan() the addon uses, writes one byte 'C' ("configured") to --ready-fd and closes it, and
// then calls krun_start_enter(), which takes over this process and never returns on success: the
// VMM _exit()s with the guest's exit code.
//
// Failures before the VM starts are reported as ONE JSON line on stderr,
//   {"microvmRunnerError":{"stage":"...","code":"...","message":"...","errno":-22,"syscall":"..."}}
// and one of these exit codes (lib/backends/libkrun/runner.ts maps them to coded errors):
//   64 usage error          65 plan is not valid          66 plan cannot be read
//   69 libkrun/libkrunfw cannot be loaded                 70 a krun_* configuration call failed
//   71 krun_start_enter returned (the VM did not start)
//   72 the overlay root could not be mounted (plan.overlay)
// Once 'C' was written, the exit status is the guest's (or 71 with the JSON line).
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
#include <string>
#include <vector>

#include "errno_names.h"
#include "json.h"
#include "krun_api.h"
#include "plan.h"

namespace {

using microvm::ErrnoName;
using microvm::JsonQuote;
using microvm::KrunFailure;

constexpr int kExitUsage = 64;
constexpr int kExitPlanInvalid = 65;
constexpr int kExitPlanUnreadable = 66;
constexpr int kExitUnavailable = 69;
constexpr int kExitConfigure = 70;
constexpr int kExitStart = 71;
constexpr int kExitMount = 72;
constexpr size_t kMaxPlanBytes = 1 << 20;

[[noreturn]] void Die(int status, const char* stage, const std::string& code, const std::string& message,
                      const KrunFailure* failure = nullptr) {
  std::string line = "{\"microvmRunnerError\":{\"stage\":";
  JsonQuote(stage, &line);
  line += ",\"code\":";
  JsonQuote(code, &line);
  line += ",\"message\":";
  JsonQuote(message, &line);
  if (failure != nullptr) {
    line += ",\"errno\":" + std::to_string(failure->rc) + ",\"syscall\":";
    JsonQuote(failure->syscall, &line);
  }
  line += "}}\n";
  ssize_t ignored = write(STDERR_FILENO, line.data(), line.size());
  (void)ignored;
  _exit(status);
}

[[noreturn]] void DieKrun(int status, const char* stage, const KrunFailure& f) {
  int err = -f.rc;
  std::string message = f.syscall + " failed: " + ErrnoName(err) + " (" + std::strerror(err) + ")";
  if (!f.detail.empty()) message += ": " + f.detail;
  Die(status, stage, ErrnoName(err), message, &f);
}

bool ParseFd(const char* text, int* fd) {
  char* end = nullptr;
  errno = 0;
  long v = std::strtol(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || v < 0 || v > 1 << 20) return false;
  *fd = static_cast<int>(v);
  return true;
}

bool ReadAll(int fd, std::string* out, std::string* error) {
  char buf[65536];
  while (true) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      *error = std::strerror(errno);
      return false;
    }
    if (n == 0) return true;
    out->append(buf, static_cast<size_t>(n));
    if (out->size() > kMaxPlanBytes) {
      *error = "plan larger than 1 MiB";
      return false;
    }
  }
}

bool WriteFile(const char* path, const std::string& text) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  close(fd);
  return ok;
}

// Mounts plan.overlay in a private mount namespace. Unprivileged: also a new user namespace that
// maps our uid/gid to 0, so files we own look root-owned to the guest (as in a container).
void MountOverlay(const microvm::OverlaySpec& o) {
  uid_t uid = geteuid();
  gid_t gid = getegid();
  int flags = CLONE_NEWNS | (uid == 0 ? 0 : CLONE_NEWUSER);
  if (unshare(flags) != 0) {
    Die(kExitMount, "mount", ErrnoName(errno),
        std::string("unshare(") + (uid == 0 ? "CLONE_NEWNS" : "CLONE_NEWUSER|CLONE_NEWNS") +
            ") failed: " + std::strerror(errno) +
            (uid == 0 ? "" : "; are unprivileged user namespaces disabled (kernel.unprivileged_userns_clone)?"));
  }
  if (uid != 0) {
    WriteFile("/proc/self/setgroups", "deny");
    if (!WriteFile("/proc/self/uid_map", "0 " + std::to_string(uid) + " 1\n") ||
        !WriteFile("/proc/self/gid_map", "0 " + std::to_string(gid) + " 1\n")) {
      Die(kExitMount, "mount", ErrnoName(errno),
          std::string("writing the user namespace id maps failed: ") + std::strerror(errno));
    }
  }
  // Keep our mounts out of the parent namespace.
  if (mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    Die(kExitMount, "mount", ErrnoName(errno), std::string("making / private failed: ") + std::strerror(errno));
  }
  std::string data = "lowerdir=" + o.lower + ",upperdir=" + o.upper + ",workdir=" + o.work;
  if (uid != 0) data += ",userxattr";
  if (mount("overlay", o.merged.c_str(), "overlay", 0, data.c_str()) != 0) {
    int err = errno;
    // Older kernels (< 5.11) lack userxattr; try once without it.
    if (uid != 0 && err == EINVAL) {
      data = "lowerdir=" + o.lower + ",upperdir=" + o.upper + ",workdir=" + o.work;
      if (mount("overlay", o.merged.c_str(), "overlay", 0, data.c_str()) == 0) return;
      err = errno;
    }
    Die(kExitMount, "mount", ErrnoName(err),
        "mounting the overlay root on " + o.merged + " failed: " + std::strerror(err));
  }
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

// --relay-connect SOCKET RULE: see the header. Exits 0 when both directions are done, 1 when the
// relay cannot be reached (the guest then sees its connection closed).
int RelayConnect(const char* socket_path, const char* rule) {
  signal(SIGPIPE, SIG_IGN);
  size_t rule_len = std::strlen(rule);
  if (rule_len == 0 || rule_len > 8 || std::strspn(rule, "0123456789") != rule_len) return kExitUsage;
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

}  // namespace

// --listen-unix PATH -- PROGRAM ARGS...: see the header. Returns only on failure.
int ListenExec(const char* socket_path, char** program) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (std::strlen(socket_path) >= sizeof addr.sun_path) {
    std::fprintf(stderr, "microvm-runner: socket path too long: %s\n", socket_path);
    return kExitUsage;
  }
  std::memcpy(addr.sun_path, socket_path, std::strlen(socket_path) + 1);
  int s = socket(AF_UNIX, SOCK_STREAM, 0);
  mode_t old_mask = umask(0177);
  bool ok = s >= 0 && bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 && listen(s, 16) == 0;
  umask(old_mask);
  if (!ok || (s != 3 && dup2(s, 3) != 3)) {
    std::fprintf(stderr, "microvm-runner: cannot listen on %s: %s\n", socket_path, std::strerror(errno));
    return 1;
  }
  if (s != 3) close(s);
  execv(program[0], program);
  std::fprintf(stderr, "microvm-runner: cannot run %s: %s\n", program[0], std::strerror(errno));
  return 1;
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

int LogSink(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);
  if (argc < 7 || (argc - 3) % 4 != 0) {
    std::fprintf(stderr, "usage: microvm-runner --log-sink STATUS [NAME MAXBYTES SOCKET FILE]...\n");
    return kExitUsage;
  }
  prctl(PR_SET_PDEATHSIG, SIGKILL);  // until every stream is connected (then QEMU's exit ends them)
  // Out of the VM's process group: a stop signals QEMU's group, and the sink must still write what
  // QEMU sent before it went (it ends on its own when QEMU's exit closes the streams).
  setpgid(0, 0);
  int status_fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (status_fd < 0 || posix_fallocate(status_fd, 0, 4096) != 0) {
    std::fprintf(stderr, "microvm-runner: cannot make %s: %s\n", argv[2], std::strerror(errno));
    return 1;
  }
  std::vector<SinkStream> streams;
  for (int i = 3; i + 3 < argc; i += 4) {
    SinkStream st;
    st.name = argv[i];
    st.max = std::strtoull(argv[i + 1], nullptr, 10);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (std::strlen(argv[i + 2]) >= sizeof addr.sun_path) return kExitUsage;
    std::memcpy(addr.sun_path, argv[i + 2], std::strlen(argv[i + 2]) + 1);
    st.listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    mode_t old_mask = umask(0177);
    bool ok = st.listen_fd >= 0 && bind(st.listen_fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
              listen(st.listen_fd, 1) == 0;
    umask(old_mask);
    st.file_fd = open(argv[i + 3], O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0640);
    if (!ok || st.file_fd < 0) {
      std::fprintf(stderr, "microvm-runner: log sink %s: %s\n", st.name.c_str(), std::strerror(errno));
      return 1;
    }
    streams.push_back(st);
  }
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
      return 1;
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
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "--relay-connect") == 0) return RelayConnect(argv[2], argv[3]);
  if (argc >= 2 && std::strcmp(argv[1], "--log-sink") == 0) return LogSink(argc, argv);
  if (argc >= 5 && std::strcmp(argv[1], "--listen-unix") == 0 && std::strcmp(argv[3], "--") == 0)
    return ListenExec(argv[2], argv + 4);
  std::string plan_path;
  int plan_fd = -1;
  int ready_fd = -1;
  bool die_with_parent = false;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--plan" && i + 1 < argc) {
      plan_path = argv[++i];
    } else if (a == "--plan-fd" && i + 1 < argc) {
      if (!ParseFd(argv[++i], &plan_fd)) Die(kExitUsage, "usage", "ERR_MICROVM_RUNNER_USAGE", "bad --plan-fd");
    } else if (a == "--ready-fd" && i + 1 < argc) {
      if (!ParseFd(argv[++i], &ready_fd)) Die(kExitUsage, "usage", "ERR_MICROVM_RUNNER_USAGE", "bad --ready-fd");
    } else if (a == "--die-with-parent") {
      die_with_parent = true;
    } else if (a == "--version") {
      std::printf("microvm-runner plan-version 1\n");
      return 0;
    } else {
      Die(kExitUsage, "usage", "ERR_MICROVM_RUNNER_USAGE",
          "usage: microvm-runner (--plan PATH | --plan-fd N) [--ready-fd N] [--die-with-parent]; "
          "unexpected argument: " +
              a);
    }
  }
  if (plan_path.empty() == (plan_fd < 0)) {
    Die(kExitUsage, "usage", "ERR_MICROVM_RUNNER_USAGE", "exactly one of --plan and --plan-fd is required");
  }
  if (die_with_parent) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1) _exit(kExitUsage);  // the parent is already gone
  }
  if (ready_fd >= 0) fcntl(ready_fd, F_SETFD, FD_CLOEXEC);

  // 1. Read the plan.
  std::string text, error;
  int fd = plan_fd;
  if (!plan_path.empty()) {
    fd = open(plan_path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      Die(kExitPlanUnreadable, "plan", "ERR_MICROVM_PLAN_UNREADABLE",
          "cannot open plan " + plan_path + ": " + std::strerror(errno));
    }
  }
  if (!ReadAll(fd, &text, &error)) {
    Die(kExitPlanUnreadable, "plan", "ERR_MICROVM_PLAN_UNREADABLE", "cannot read plan: " + error);
  }
  close(fd);

  // 2. Parse it.
  microvm::LaunchPlan plan;
  if (!microvm::ParsePlanText(text, &plan, &error)) {
    Die(kExitPlanInvalid, "plan", "ERR_MICROVM_PLAN_INVALID", error);
  }

  // 3. The root: an overlay of the shared image (read-only lower) and this VM's layer.
  if (plan.has_overlay) MountOverlay(plan.overlay);

  // 4. Firmware first, so libkrun's dlopen("libkrunfw.so.5") finds this copy by soname.
  if (!plan.firmware_path.empty() && !microvm::PreloadFirmware(plan.firmware_path, &error)) {
    Die(kExitUnavailable, "load", "ERR_MICROVM_LIBKRUNFW_LOAD", error);
  }
  const microvm::KrunApi* api = microvm::LoadKrunApi(plan.libkrun_path, &error);
  if (api == nullptr) Die(kExitUnavailable, "load", "ERR_MICROVM_LIBKRUN_LOAD", error);

  // 5. Create and configure.
  KrunFailure failure;
  uint32_t ctx = 0;
  if (!microvm::KrunCreateCtx(*api, &ctx, &failure)) DieKrun(kExitConfigure, "configure", failure);
  if (!microvm::ApplyPlan(*api, ctx, plan, &failure, /*apply_log_level=*/true))
    DieKrun(kExitConfigure, "configure", failure);

  // 6. Tell the parent, then hand the process to libkrun.
  if (ready_fd >= 0) {
    const char c = 'C';
    ssize_t n;
    do {
      n = write(ready_fd, &c, 1);
    } while (n < 0 && errno == EINTR);
    close(ready_fd);
  }
  int32_t rc = api->start_enter(ctx);
  failure.syscall = "krun_start_enter";
  failure.rc = rc < 0 ? rc : -EIO;
  failure.detail.clear();
  DieKrun(kExitStart, "start", failure);
}
