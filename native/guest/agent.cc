// The guest agent (see guest_agent.h and docs/agent-protocol.md).
//
// One process, one poll loop: the port, a signalfd for SIGCHLD, and per stream the descriptors it
// moves bytes between. Nothing here trusts the host more than it must either: frames are
// length-checked, a stream the host overruns is ended, input is buffered only up to the window the
// agent granted, and output is read from a child only while the host has granted room for it, so a
// host that stops reading stops the child (its pipe fills) instead of growing this process.
#include "guest/agent.h"

#include "guest/protocol.h"

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

#include "common/json.h"
#include "guest/util.h"

namespace microvm {
namespace agent {
namespace {

constexpr size_t kHeader = 9;             // u32 length, u8 type, u32 stream (big-endian)
constexpr uint32_t kMaxPayload = 65536;   // either direction
constexpr uint32_t kWindow = 256 * 1024;  // input the host may send on a stream before a grant
constexpr size_t kMaxStreams = 64;        // concurrent execs and transfers
constexpr size_t kMaxJson = 65536;        // a request's JSON (one frame)
constexpr char kHostMarker[] = "{\"proto\":\"microvm-host/1\"";

enum Type : uint8_t {
  kHello = 1,   // both ways: JSON; the host's carries a nonce the agent echoes
  kExec = 2,    // host: JSON request, opens a stream
  kData = 3,    // host: input bytes (stdin, or a file being written)
  kEof = 4,     // host: end of input
  kStdout = 5,  // agent: output bytes (stdout, or a file being read)
  kStderr = 6,  // agent: stderr bytes
  kExit = 7,    // agent: JSON {code} or {signal}; ends the stream
  kSignal = 8,  // host: JSON {signal}; for a transfer: cancel it
  kResize = 9,  // host: JSON {rows, cols}
  kGrant = 10,  // both ways: u32, more bytes the other side may send on this stream
  kError = 11,  // agent: JSON {code, message}; ends the stream
  kOp = 12,     // host: JSON file request, opens a stream
  kInfo = 13,   // agent: JSON (a file's or a directory entry's metadata)
};

int g_port = -1;
bool g_broken = false;  // a write to the port failed
Defaults g_defaults;

void Log(const std::string& msg) {
  std::string line = "microvm-agent: " + msg + "\n";
  ssize_t ignored = write(STDERR_FILENO, line.data(), line.size());
  (void)ignored;
}

std::string ErrnoName(int err) {
  const char* name = strerrorname_np(err);
  return name != nullptr ? name : "EIO";
}

bool WriteAll(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

void PutU32(char* p, uint32_t v) {
  p[0] = static_cast<char>(v >> 24);
  p[1] = static_cast<char>(v >> 16);
  p[2] = static_cast<char>(v >> 8);
  p[3] = static_cast<char>(v);
}

uint32_t GetU32(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return (static_cast<uint32_t>(u[0]) << 24) | (static_cast<uint32_t>(u[1]) << 16) |
         (static_cast<uint32_t>(u[2]) << 8) | u[3];
}

// One frame to the host. A write blocks while no host is connected (virtio-serial).
void Send(uint8_t type, uint32_t id, const char* data, size_t len) {
  if (g_broken) return;
  std::string frame(kHeader, '\0');
  PutU32(&frame[0], static_cast<uint32_t>(len));
  frame[4] = static_cast<char>(type);
  PutU32(&frame[5], id);
  frame.append(data, len);
  if (!WriteAll(g_port, frame.data(), frame.size())) g_broken = true;
}

void Send(uint8_t type, uint32_t id, const std::string& s) {
  Send(type, id, s.data(), s.size());
}

void SendGrant(uint32_t id, uint32_t n) {
  char b[4];
  PutU32(b, n);
  Send(kGrant, id, b, 4);
}

void SendError(uint32_t id, const std::string& code, const std::string& message) {
  std::string j = "{\"code\":";
  JsonQuote(code, &j);
  j += ",\"message\":";
  JsonQuote(message, &j);
  j += "}";
  Send(kError, id, j);
}

void SendErrno(uint32_t id, int err, const std::string& what) {
  SendError(id, ErrnoName(err), what + ": " + std::strerror(err));
}

void SendHello(const std::string& nonce) {
  std::string j = "{\"proto\":\"microvm-agent/1\",\"nonce\":";
  JsonQuote(nonce, &j);
  j += ",\"pid\":" + std::to_string(getpid()) + ",\"uptimeNs\":" + std::to_string(MonotonicNs()) +
       ",\"window\":" + std::to_string(kWindow) + ",\"maxPayload\":" + std::to_string(kMaxPayload) +
       ",\"caps\":[\"exec\",\"tty\",\"files\"]}";
  Send(kHello, 0, j);
}

struct Stream {
  enum class Kind { kExec, kPut, kGet, kList } kind = Kind::kExec;
  uint32_t id = 0;
  uint64_t credit = 0;   // output bytes the host will still take
  uint32_t allowed = 0;  // input bytes the host may still send
  // exec
  pid_t pid = -1;
  bool exited = false;
  int status = 0;
  bool tty = false;
  int in_fd = -1, out_fd = -1, err_fd = -1;
  std::string inbuf;
  bool in_eof = false;
  // put
  std::string tmp, dest;
  mode_t mode = 0644;
  long uid = -1, gid = -1;
  // get
  int file_fd = -1;
  // list
  std::string root;
  std::vector<std::pair<std::string, DIR*>> dirs;  // relative path, open directory
};

std::map<uint32_t, std::unique_ptr<Stream>> g_streams;

void CloseFd(int* fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

// Releases what a stream holds; an unfinished put leaves no file behind.
void Release(Stream* s) {
  if (s->in_fd == s->out_fd) s->in_fd = -1;
  CloseFd(&s->in_fd);
  CloseFd(&s->out_fd);
  CloseFd(&s->err_fd);
  CloseFd(&s->file_fd);
  if (!s->tmp.empty()) unlink(s->tmp.c_str());
  s->tmp.clear();
  for (auto& d : s->dirs) closedir(d.second);
  s->dirs.clear();
}

void End(uint32_t id) {
  auto it = g_streams.find(id);
  if (it == g_streams.end()) return;
  Release(it->second.get());
  g_streams.erase(it);
}

void EndWithErrno(Stream* s, int err, const std::string& what) {
  SendErrno(s->id, err, what);
  End(s->id);
}

// A new host: what the previous one started ends (its processes are killed, transfers dropped).
void ResetAll() {
  for (auto& kv : g_streams) {
    Stream* s = kv.second.get();
    if (s->kind == Stream::Kind::kExec && s->pid > 0 && !s->exited) kill(-s->pid, SIGKILL);
    Release(s);
  }
  g_streams.clear();
}

std::vector<std::string> Strings(const JsonValue* v) {
  std::vector<std::string> out;
  if (v == nullptr || !v->is_array()) return out;
  for (const auto& item : v->array_items()) {
    if (item.is_string()) out.push_back(item.string_value());
  }
  return out;
}

std::string Str(const JsonValue& j, const char* key) {
  const JsonValue* v = j.Get(key);
  return v != nullptr && v->is_string() ? v->string_value() : "";
}

long Num(const JsonValue& j, const char* key, long dflt) {
  const JsonValue* v = j.Get(key);
  return v != nullptr && v->is_number() ? static_cast<long>(v->number_value()) : dflt;
}

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
std::string FindProgram(const std::string& name, const std::vector<std::string>& env) {
  if (name.find('/') != std::string::npos) return name;
  std::string path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
  for (const auto& e : env)
    if (e.compare(0, 5, "PATH=") == 0) path = e.substr(5);
  static std::map<std::string, std::string> found;
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

void SetNonBlocking(int fd) {
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
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
void StartExec(uint32_t id, const JsonValue& req) {
  std::vector<std::string> argv = Strings(req.Get("argv"));
  if (argv.empty()) {
    SendError(id, "EINVAL", "exec: argv is empty");
    return;
  }
  std::vector<std::string> env = g_defaults.env;
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
  if (cwd.empty()) cwd = g_defaults.workdir;
  std::string user = Str(req, "user");
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
      SendErrno(id, err, "openpty");
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
      SendErrno(id, errno, "pipe");
      return;
    }
    if (pipe2(err, O_CLOEXEC) != 0) {
      close(out[0]);
      close(out[1]);
      SendErrno(id, errno, "pipe");
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
  const std::string program = FindProgram(argv[0], env);
  const std::string user_what = "unknown user " + user;
  const std::string chdir_what = "chdir " + cwd;
  const std::string exec_what = "cannot execute " + argv[0];
  SpawnArgs sa{
      use_tty, slave_name.c_str(), child_in,        child_out,   child_err,   user_ok,   !user.empty(), uid,
      gid,     cwd.c_str(),        program.c_str(), args.data(), envp.data(), user_what, chdir_what,    exec_what};
  // The child runs on a stack of its own (as posix_spawn does): with plain vfork() it would share
  // this function's frame, whose spilled values it could overwrite before the agent resumes. One
  // static stack serves every exec: the agent is suspended until the child has exec'd or exited.
  alignas(16) static char spawn_stack[64 * 1024];
  pid_t pid = clone(SpawnChild, spawn_stack + sizeof spawn_stack, CLONE_VM | CLONE_VFORK | SIGCHLD, &sa);
  if (pid < 0) {
    int err = errno;
    Release(s.get());
    CloseFd(&child_in);
    CloseFd(&child_out);
    CloseFd(&child_err);
    SendErrno(id, err, "fork");
    return;
  }
  CloseFd(&child_in);
  CloseFd(&child_out);
  CloseFd(&child_err);
  s->pid = pid;
  g_streams[id] = std::move(s);
}

std::string Dirname(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

unsigned g_tmp_counter = 0;

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

void Done(uint32_t id) {
  Send(kExit, id, "{\"code\":0}");
}

// File requests: put/get/list open a stream; the others answer at once.
void StartOp(uint32_t id, const JsonValue& req) {
  std::string op = Str(req, "op");
  std::string path = Str(req, "path");
  if (path.empty() || path[0] != '/') {
    SendError(id, "EINVAL", op + ": path must be absolute");
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
    s->tmp = Dirname(path) + "/.microvm-put-" + std::to_string(getpid()) + "-" + std::to_string(++g_tmp_counter);
    s->file_fd = open(s->tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (s->file_fd < 0) {
      int err = errno;
      s->tmp.clear();
      SendErrno(id, err, "create " + path);
      return;
    }
    g_streams[id] = std::move(s);
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
        SendErrno(id, err, "open " + path);
        return;
      }
      if (!S_ISREG(st.st_mode)) {
        Release(s.get());
        SendError(id, S_ISDIR(st.st_mode) ? "EISDIR" : "EINVAL", path + " is not a regular file");
        return;
      }
      fcntl(s->file_fd, F_SETFL, fcntl(s->file_fd, F_GETFL) & ~O_NONBLOCK);
    } else {
      s->kind = Stream::Kind::kList;
      if (lstat(path.c_str(), &st) != 0) {
        SendErrno(id, errno, "lstat " + path);
        return;
      }
      s->root = path;
      if (S_ISDIR(st.st_mode)) {
        DIR* d = opendir(path.c_str());
        if (d == nullptr) {
          SendErrno(id, errno, "opendir " + path);
          return;
        }
        s->dirs.emplace_back("", d);
      }
    }
    std::string info = EntryJson("", path, st);
    s->credit = s->credit > info.size() ? s->credit - info.size() : 0;
    Send(kInfo, id, info);
    g_streams[id] = std::move(s);
    return;
  }
  int rc = -1;
  std::string what = op + " " + path;
  if (op == "stat") {
    struct stat st;
    rc = lstat(path.c_str(), &st);
    if (rc == 0) Send(kInfo, id, EntryJson("", path, st));
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
    SendError(id, "ENOSYS", "unknown op " + op);
    return;
  }
  if (rc != 0) {
    SendErrno(id, errno, what);
    return;
  }
  Done(id);
}

void HandleFrame(uint8_t type, uint32_t id, const std::string& payload) {
  JsonValue json;
  std::string error;
  bool is_json = type == kHello || type == kExec || type == kSignal || type == kResize || type == kOp;
  if (is_json && (payload.size() > kMaxJson || !JsonValue::Parse(payload, &json, &error) || !json.is_object())) {
    if (type == kExec || type == kOp) SendError(id, "EINVAL", "malformed request: " + error);
    return;
  }
  if (type == kHello) {
    if (Str(json, "proto") != "microvm-host/1") return;
    ResetAll();
    SendHello(Str(json, "nonce"));
    return;
  }
  auto it = g_streams.find(id);
  Stream* s = it == g_streams.end() ? nullptr : it->second.get();
  if (type == kExec || type == kOp) {
    if (s != nullptr) {
      SendError(id, "EEXIST", "stream id in use");
    } else if (g_streams.size() >= kMaxStreams) {
      SendError(id, "EAGAIN", "too many streams (at most " + std::to_string(kMaxStreams) + ")");
    } else if (type == kExec) {
      StartExec(id, json);
    } else {
      StartOp(id, json);
    }
    return;
  }
  if (s == nullptr) return;  // a stream that already ended (a late signal or grant)
  switch (type) {
    case kData:
      if (payload.size() > s->allowed) {
        if (s->kind == Stream::Kind::kExec && s->pid > 0 && !s->exited) kill(-s->pid, SIGKILL);
        SendError(id, "EPROTO", "input beyond the granted window");
        End(id);
        return;
      }
      s->allowed -= static_cast<uint32_t>(payload.size());
      if (s->kind == Stream::Kind::kPut) {
        if (!WriteAll(s->file_fd, payload.data(), payload.size())) {
          EndWithErrno(s, errno, "write " + s->dest);
          return;
        }
        s->allowed += static_cast<uint32_t>(payload.size());
        SendGrant(id, static_cast<uint32_t>(payload.size()));
      } else if (s->kind == Stream::Kind::kExec && s->in_fd >= 0 && !s->in_eof) {
        s->inbuf += payload;
      }
      return;
    case kEof:
      if (s->kind == Stream::Kind::kPut) {
        int rc = fchmod(s->file_fd, s->mode);
        if (rc == 0 && (s->uid >= 0 || s->gid >= 0))
          rc = fchown(s->file_fd, static_cast<uid_t>(s->uid), static_cast<gid_t>(s->gid));
        if (rc == 0) rc = close(s->file_fd);
        s->file_fd = -1;
        if (rc == 0) rc = rename(s->tmp.c_str(), s->dest.c_str());
        if (rc != 0) {
          EndWithErrno(s, errno, "write " + s->dest);
          return;
        }
        s->tmp.clear();
        Done(id);
        End(id);
      } else if (s->kind == Stream::Kind::kExec) {
        s->in_eof = true;
      }
      return;
    case kSignal: {
      long sig = Num(json, "signal", SIGKILL);
      if (s->kind == Stream::Kind::kExec) {
        if (s->pid > 0 && !s->exited && sig > 0 && sig < 65 && kill(-s->pid, static_cast<int>(sig)) != 0)
          kill(s->pid, static_cast<int>(sig));
      } else {
        SendError(id, "ECANCELED", "cancelled by the host");
        End(id);
      }
      return;
    }
    case kResize:
      if (s->tty && s->out_fd >= 0) {
        struct winsize ws;
        std::memset(&ws, 0, sizeof ws);
        ws.ws_row = static_cast<unsigned short>(Num(json, "rows", 24));
        ws.ws_col = static_cast<unsigned short>(Num(json, "cols", 80));
        ioctl(s->out_fd, TIOCSWINSZ, &ws);
        if (s->pid > 0 && !s->exited) kill(-s->pid, SIGWINCH);
      }
      return;
    case kGrant:
      if (payload.size() == 4) s->credit += GetU32(payload.data());
      return;
    default:
      return;
  }
}

// Parses what the host sent. A frame that cannot be one (an unknown type, an oversized length)
// means the stream lost its framing (a host that died mid-frame, then a new one): skip to the
// next host hello.
void ParseFrames(std::string* buf) {
  while (buf->size() >= kHeader) {
    uint32_t len = GetU32(buf->data());
    uint8_t type = static_cast<uint8_t>((*buf)[4]);
    bool host_type = type == kHello || type == kExec || type == kData || type == kEof || type == kSignal ||
                     type == kResize || type == kGrant || type == kOp;
    if (len > kMaxPayload || !host_type) {
      size_t pos = buf->find(kHostMarker, kHeader + 1);
      if (pos == std::string::npos) {
        size_t keep = sizeof kHostMarker + kHeader;
        if (buf->size() > keep) buf->erase(0, buf->size() - keep);
        return;
      }
      buf->erase(0, pos - kHeader);
      continue;
    }
    if (buf->size() < kHeader + len) return;
    uint32_t id = GetU32(buf->data() + 5);
    std::string payload = buf->substr(kHeader, len);
    buf->erase(0, kHeader + len);
    HandleFrame(type, id, payload);
  }
}

// Moves what can move on one stream without blocking; after an exec's process exited, its output
// is drained until it would block (a background child may hold the pipe open forever).
void Service(Stream* s) {
  static char buf[kMaxPayload];
  uint32_t id = s->id;
  if (s->kind == Stream::Kind::kExec) {
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
      SendGrant(id, static_cast<uint32_t>(w));
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
        size_t want = s->credit < sizeof buf ? static_cast<size_t>(s->credit) : sizeof buf;
        ssize_t n = read(*fd, buf, want);
        if (n > 0) {
          Send(which == 0 ? kStdout : kStderr, id, buf, static_cast<size_t>(n));
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
      Send(kExit, id, j);
      End(id);
    }
    return;
  }
  if (s->kind == Stream::Kind::kGet) {
    while (s->credit > 0) {
      size_t want = s->credit < sizeof buf ? static_cast<size_t>(s->credit) : sizeof buf;
      ssize_t n = read(s->file_fd, buf, want);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        EndWithErrno(s, errno, "read");
        return;
      }
      if (n == 0) {
        Done(id);
        End(id);
        return;
      }
      Send(kStdout, id, buf, static_cast<size_t>(n));
      s->credit -= static_cast<uint64_t>(n);
    }
    return;
  }
  if (s->kind == Stream::Kind::kList) {
    while (s->credit > 0) {
      if (s->dirs.empty()) {
        Done(id);
        End(id);
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
      Send(kInfo, id, info);
      if (S_ISDIR(st.st_mode) && s->dirs.size() < 256) {
        if (DIR* d = opendir(full.c_str())) s->dirs.emplace_back(rel, d);
      }
    }
  }
}

void Reap() {
  for (;;) {
    int status = 0;
    pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid <= 0) return;
    for (auto& kv : g_streams) {
      if (kv.second->pid == pid) {
        kv.second->exited = true;
        kv.second->status = status;
      }
    }
  }
}

}  // namespace

// A listening socket (ServeListening), or -1: the port (Serve).
int g_listen = -1;

// Waits for the next host and greets it. On the port the hello's write is the wait (it blocks
// until a host connects); on a listening socket the previous connection is closed and the next
// one accepted.
void NextHost() {
  if (g_listen >= 0) {
    if (g_port >= 0) close(g_port);
    g_port = -1;
    while (g_port < 0) {
      g_port = accept4(g_listen, nullptr, nullptr, SOCK_CLOEXEC);
      if (g_port < 0 && errno != EINTR) {
        Log(std::string("accept: ") + std::strerror(errno));
        usleep(100000);
      }
    }
  }
  SendHello("");
}

[[noreturn]] void ServeLoop();

void Serve(const Defaults& defaults) {
  g_defaults = defaults;
  std::string port = WaitForPort(guest::kPortAgent, 30000);
  if (port.empty()) {
    Log(std::string("no ") + guest::kPortAgent + " port");
    _exit(0);  // nothing to serve: not restarted
  }
  g_port = open(port.c_str(), O_RDWR | O_CLOEXEC);
  if (g_port < 0) {
    Log(port + ": " + std::strerror(errno));
    _exit(1);
  }
  ServeLoop();
}

void ServeListening(const Defaults& defaults, int listen_fd) {
  g_defaults = defaults;
  g_listen = listen_fd;
  ServeLoop();
}

void ServeLoop() {
  signal(SIGPIPE, SIG_IGN);
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigprocmask(SIG_BLOCK, &chld, nullptr);
  int sigfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
  NextHost();  // blocks until a host connects
  std::string inbuf;
  std::vector<char> rbuf(kMaxPayload + kHeader);
  for (;;) {
    if (g_broken) {  // the port failed under a write: start over with the next host
      ResetAll();
      inbuf.clear();
      g_broken = false;
      usleep(100000);
      NextHost();
      continue;
    }
    std::vector<struct pollfd> fds = {{g_port, POLLIN, 0}, {sigfd, POLLIN, 0}};
    bool busy = false;  // a transfer that can move without waiting (a regular file, a directory)
    for (auto& kv : g_streams) {
      Stream* s = kv.second.get();
      if (s->kind == Stream::Kind::kExec) {
        if (s->credit > 0 && s->out_fd >= 0) fds.push_back({s->out_fd, POLLIN, 0});
        if (s->credit > 0 && s->err_fd >= 0) fds.push_back({s->err_fd, POLLIN, 0});
        if (!s->inbuf.empty() && s->in_fd >= 0 && s->in_fd != s->out_fd) fds.push_back({s->in_fd, POLLOUT, 0});
        if ((s->exited && s->credit > 0) || (s->in_eof && s->inbuf.empty() && s->in_fd >= 0)) busy = true;
      } else if (s->kind != Stream::Kind::kPut && s->credit > 0) {
        busy = true;
      }
    }
    int n = poll(fds.data(), fds.size(), busy ? 0 : -1);
    if (n < 0 && errno != EINTR) {
      Log(std::string("poll: ") + std::strerror(errno));
      usleep(10000);
    }
    if (fds[1].revents & POLLIN) {
      struct signalfd_siginfo si;
      while (read(sigfd, &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
      }
      Reap();
    }
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t got = read(g_port, rbuf.data(), rbuf.size());
      if (got > 0) {
        inbuf.append(rbuf.data(), static_cast<size_t>(got));
        ParseFrames(&inbuf);
      } else if (got == 0 || (errno != EINTR && errno != EAGAIN)) {
        // The host went away: end what it started, then wait (in the write) for the next one.
        ResetAll();
        inbuf.clear();
        NextHost();
        continue;
      }
    }
    std::vector<uint32_t> ids;
    for (auto& kv : g_streams) ids.push_back(kv.first);
    for (uint32_t id : ids) {
      auto it = g_streams.find(id);
      if (it != g_streams.end()) Service(it->second.get());
    }
  }
}

}  // namespace agent
}  // namespace microvm
