// The agent's commands: resolving the user and the program, the exec child, and moving a
// command's input and output within the window and credit the host granted.
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

// "name", "uid" or "uid:gid", looked up in the guest's /etc/passwd (static binary: no NSS).
bool ResolveUser(const std::string& spec, uid_t* uid, gid_t* gid, std::string* home) {
  std::string user = spec, group;
  size_t colon = spec.find(':');
  if (colon != std::string::npos) {
    user = spec.substr(0, colon);
    group = spec.substr(colon + 1);
  }
  bool numeric = !user.empty() && user.find_first_not_of("0123456789") == std::string::npos;
  bool found = false;
  if (FILE* f = std::fopen("/etc/passwd", "re")) {
    char line[1024];
    while (std::fgets(line, sizeof line, f) != nullptr) {
      std::vector<std::string> fields;
      std::string cur;
      for (const char* p = line; *p != '\0' && *p != '\n'; p++) {
        if (*p == ':') {
          fields.push_back(cur);
          cur.clear();
        } else {
          cur += *p;
        }
      }
      fields.push_back(cur);
      if (fields.size() < 6) continue;
      if ((numeric && fields[2] == user) || (!numeric && fields[0] == user)) {
        *uid = static_cast<uid_t>(std::strtoul(fields[2].c_str(), nullptr, 10));
        *gid = static_cast<gid_t>(std::strtoul(fields[3].c_str(), nullptr, 10));
        *home = fields[5];
        found = true;
        break;
      }
    }
    std::fclose(f);
  }
  if (!found) {
    if (!numeric) return false;
    *uid = static_cast<uid_t>(std::strtoul(user.c_str(), nullptr, 10));
    *gid = *uid;
  }
  if (!group.empty()) {
    if (group.find_first_not_of("0123456789") != std::string::npos) return false;
    *gid = static_cast<gid_t>(std::strtoul(group.c_str(), nullptr, 10));
  }
  return true;
}

// Names of the calls the exec child can fail in (it must not build strings: its memory is the agent's).
const std::string kSetgroups = "setgroups", kSetgid = "setgid", kSetuid = "setuid";

// In the exec child: no allocation (its memory is the agent's), only write() and _exit().
[[noreturn]] void ChildFail(const std::string& what, int err, int code) {
  const char* parts[] = {"microvm: ", what.c_str(), ": ", std::strerror(err), "\n"};
  for (const char* p : parts) {
    ssize_t ignored = write(STDERR_FILENO, p, std::strlen(p));
    (void)ignored;
  }
  _exit(code);
}

bool IsExecutableFile(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode) && access(p.c_str(), X_OK) == 0;
}

// execvp's search, done before the child is made with the command's own PATH (the child must not
// allocate): the first PATH entry where `name` is an executable file, else `name` (execve then
// says why). Found paths are remembered per PATH, as a shell's hash table does: each directory
// before the one that has it is a lookup that fails, and on the VM's virtio-fs root every lookup
// is a round trip to the host (`true` from /bin with the default PATH: 9.7 ms an exec under TCG,
// 7.3 ms by absolute path). A remembered path is checked again before use; one that is gone is
// searched for anew. A program put earlier in PATH later is not seen until then (`hash -r`).
std::string FindProgram(std::map<std::string, std::string>& found, const std::string& name,
                        const std::vector<std::string>& env) {
  if (name.find('/') != std::string::npos) return name;
  std::string path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
  for (const auto& e : env)
    if (e.compare(0, 5, "PATH=") == 0) path = e.substr(5);
  const std::string key = path + '\0' + name;
  auto hit = found.find(key);
  if (hit != found.end()) {
    if (IsExecutableFile(hit->second)) return hit->second;
    found.erase(hit);
  }
  if (found.size() >= 256) found.clear();
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find(':', start);
    if (end == std::string::npos) end = path.size();
    std::string dir = path.substr(start, end - start);
    std::string candidate = (dir.empty() ? std::string(".") : dir) + "/" + name;
    if (IsExecutableFile(candidate)) {
      if (!dir.empty() && dir[0] == '/') found[key] = candidate;  // a relative entry depends on the cwd
      return candidate;
    }
    start = end + 1;
  }
  return name;
}

// What the exec child needs, all made before clone(): it shares the agent's memory until it execs.
struct SpawnArgs {
  bool use_tty;
  const char* slave_name;
  int child_in, child_out, child_err;
  bool user_ok, switch_user;
  uid_t uid;
  gid_t gid;
  const char* cwd;
  const char* program;
  char* const* argv;
  char* const* envp;
  const std::string& user_what;
  const std::string& chdir_what;
  const std::string& exec_what;
};

// The exec child (clone(CLONE_VM | CLONE_VFORK), a stack of its own): system calls only, then
// execve or _exit. Its own session; the tty or the pipes as 0, 1, 2; the user; the directory.
int SpawnChild(void* arg) {
  const SpawnArgs& a = *static_cast<const SpawnArgs*>(arg);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  signal(SIGPIPE, SIG_DFL);
  setsid();
  if (a.use_tty) {
    int slave = open(a.slave_name, O_RDWR);
    if (slave < 0) _exit(126);
    ioctl(slave, TIOCSCTTY, 0);
    for (int fd = 0; fd < 3; fd++) dup2(slave, fd);
    if (slave > 2) close(slave);
  } else {
    int in = a.child_in >= 0 ? a.child_in : open("/dev/null", O_RDONLY | O_CLOEXEC);
    dup2(in, STDIN_FILENO);
    dup2(a.child_out, STDOUT_FILENO);
    dup2(a.child_err, STDERR_FILENO);
  }
  if (!a.user_ok) ChildFail(a.user_what, ENOENT, 126);
  if (a.switch_user) {
    if (setgroups(0, nullptr) != 0 && getuid() == 0) ChildFail(kSetgroups, errno, 126);
    if (setgid(a.gid) != 0) ChildFail(kSetgid, errno, 126);
    if (setuid(a.uid) != 0) ChildFail(kSetuid, errno, 126);
  }
  if (chdir(a.cwd) != 0) ChildFail(a.chdir_what, errno, 126);
  execve(a.program, a.argv, a.envp);
  int err = errno;
  ChildFail(a.exec_what, err, err == ENOENT ? 127 : 126);
}

// {argv, env, cwd, user, tty: {rows, cols} | null, stdin, window}

}  // namespace

void StartExec(Agent& a, uint32_t id, const JsonValue& req) {
  std::vector<std::string> argv = Strings(req.Get("argv"));
  if (argv.empty()) {
    a.host.Error(id, "EINVAL", "exec: argv is empty");
    return;
  }
  std::vector<std::string> env = a.defaults.env;
  for (const auto& e : Strings(req.Get("env"))) {
    size_t eq = e.find('=');
    if (eq == std::string::npos || eq == 0) continue;
    bool replaced = false;
    for (auto& have : env) {
      if (have.compare(0, eq + 1, e, 0, eq + 1) == 0) {
        have = e;
        replaced = true;
      }
    }
    if (!replaced) env.push_back(e);
  }
  std::string cwd = Str(req, "cwd");
  if (cwd.empty()) cwd = a.defaults.workdir;
  std::string user = Str(req, "user");
  if (user.empty()) user = a.defaults.user;
  const JsonValue* tty = req.Get("tty");
  bool use_tty = tty != nullptr && tty->is_object();
  const JsonValue* want_stdin = req.Get("stdin");
  bool keep_stdin = want_stdin != nullptr && want_stdin->is_bool() && want_stdin->bool_value();

  auto s = std::make_unique<Stream>();
  s->kind = Stream::Kind::kExec;
  s->id = id;
  s->credit = static_cast<uint64_t>(Num(req, "window", kWindow));
  s->allowed = kWindow;
  s->tty = use_tty;
  int child_in = -1, child_out = -1, child_err = -1;
  std::string slave_name;
  if (use_tty) {
    int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0 || grantpt(master) != 0 || unlockpt(master) != 0) {
      int err = errno;
      if (master >= 0) close(master);
      a.host.Errno(id, err, "openpty");
      return;
    }
    slave_name = ptsname(master);
    struct winsize ws;
    std::memset(&ws, 0, sizeof ws);
    ws.ws_row = static_cast<unsigned short>(Num(*tty, "rows", 24));
    ws.ws_col = static_cast<unsigned short>(Num(*tty, "cols", 80));
    ioctl(master, TIOCSWINSZ, &ws);
    SetNonBlocking(master);
    s->out_fd = master;
    s->in_fd = master;
  } else {
    int in[2] = {-1, -1}, out[2], err[2];
    if ((keep_stdin && pipe2(in, O_CLOEXEC) != 0) || pipe2(out, O_CLOEXEC) != 0) {
      a.host.Errno(id, errno, "pipe");
      return;
    }
    if (pipe2(err, O_CLOEXEC) != 0) {
      close(out[0]);
      close(out[1]);
      a.host.Errno(id, errno, "pipe");
      return;
    }
    child_in = in[0];
    s->in_fd = in[1];
    child_out = out[1];
    s->out_fd = out[0];
    child_err = err[1];
    s->err_fd = err[0];
    SetNonBlocking(s->out_fd);
    SetNonBlocking(s->err_fd);
    if (s->in_fd >= 0) SetNonBlocking(s->in_fd);
  }
  // Everything the child needs is made here: it shares the agent's memory until it execs (no copy
  // of the agent's page tables, no copy-on-write faults in the agent after it; under TCG every
  // page fault is emulated) and may only make system calls.
  bool user_ok = true;
  uid_t uid = 0;
  gid_t gid = 0;
  std::string home;
  if (!user.empty()) user_ok = ResolveUser(user, &uid, &gid, &home);
  auto set_env = [&env](const std::string& key, const std::string& value, bool overwrite) {
    for (auto& have : env) {
      if (have.compare(0, key.size() + 1, key + "=") == 0) {
        if (overwrite) have = key + "=" + value;
        return;
      }
    }
    env.push_back(key + "=" + value);
  };
  if (!home.empty()) set_env("HOME", home, true);
  set_env("HOME", "/root", false);
  if (use_tty) set_env("TERM", "xterm", false);
  std::vector<char*> envp;
  for (auto& e : env) envp.push_back(&e[0]);
  envp.push_back(nullptr);
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(&a[0]);
  args.push_back(nullptr);
  const std::string program = FindProgram(a.program_cache, argv[0], env);
  const std::string user_what = "unknown user " + user;
  const std::string chdir_what = "chdir " + cwd;
  const std::string exec_what = "cannot execute " + argv[0];
  SpawnArgs sa{
      use_tty, slave_name.c_str(), child_in,        child_out,   child_err,   user_ok,   !user.empty(), uid,
      gid,     cwd.c_str(),        program.c_str(), args.data(), envp.data(), user_what, chdir_what,    exec_what};
  // The child runs on a stack of its own (as posix_spawn does): with plain vfork() it would share
  // this function's frame, whose spilled values it could overwrite before the agent resumes.
  pid_t pid = clone(SpawnChild, a.spawn_stack + sizeof a.spawn_stack, CLONE_VM | CLONE_VFORK | SIGCHLD, &sa);
  if (pid < 0) {
    int err = errno;
    Release(s.get());
    CloseFd(&child_in);
    CloseFd(&child_out);
    CloseFd(&child_err);
    a.host.Errno(id, err, "fork");
    return;
  }
  CloseFd(&child_in);
  CloseFd(&child_out);
  CloseFd(&child_err);
  s->pid = pid;
  a.streams[id] = std::move(s);
}

void ServiceExec(Agent& a, Stream* s) {
  char* const buf = a.io_buf.data();
  const size_t buf_size = a.io_buf.size();
  uint32_t id = s->id;
  while (!s->inbuf.empty() && s->in_fd >= 0) {
    ssize_t w = write(s->in_fd, s->inbuf.data(), s->inbuf.size());
    if (w < 0) {
      if (errno == EAGAIN || errno == EINTR) break;
      s->inbuf.clear();  // the command closed its stdin: drop the rest
      if (!s->tty) CloseFd(&s->in_fd);
      break;
    }
    s->inbuf.erase(0, static_cast<size_t>(w));
    s->allowed += static_cast<uint32_t>(w);
    a.host.Grant(id, static_cast<uint32_t>(w));
  }
  if (s->in_eof && s->inbuf.empty() && s->in_fd >= 0) {
    if (s->tty) {
      char eof = 4;  // ^D: the line discipline's end of file
      ssize_t ignored = write(s->in_fd, &eof, 1);
      (void)ignored;
      s->in_fd = -1;  // the master stays open as out_fd
    } else {
      CloseFd(&s->in_fd);
    }
  }
  for (int which = 0; which < 2; which++) {
    int* fd = which == 0 ? &s->out_fd : &s->err_fd;
    while (*fd >= 0 && s->credit > 0) {
      size_t want = s->credit < buf_size ? static_cast<size_t>(s->credit) : buf_size;
      ssize_t n = read(*fd, buf, want);
      if (n > 0) {
        a.host.Send(which == 0 ? kStdout : kStderr, id, buf, static_cast<size_t>(n));
        s->credit -= static_cast<uint64_t>(n);
        if (!s->exited) break;  // one read per wake while it runs; drain once it exited
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN && !s->exited) break;
      // EOF, EIO (a pty whose other side closed), or nothing more after the exit
      if (s->in_fd == *fd) s->in_fd = -1;
      CloseFd(fd);
    }
  }
  if (s->exited && s->out_fd < 0 && s->err_fd < 0) {
    std::string j = WIFSIGNALED(s->status) ? "{\"signal\":" + std::to_string(WTERMSIG(s->status)) + "}"
                                           : "{\"code\":" + std::to_string(WEXITSTATUS(s->status)) + "}";
    a.host.Send(kExit, id, j);
    a.End(id);
  }
}

}  // namespace agent
}  // namespace microvm
