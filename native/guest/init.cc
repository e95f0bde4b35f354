// microvm-guest-init: PID 1 inside VMs booted by the QEMU backend (libkrun brings its own init).
//
// It does what libkrun's built-in init does for a container image, for QEMU's user-mode network:
//   1. mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run;
//   2. brings up lo and eth0 (10.0.2.15/24, gateway 10.0.2.2) (the host has written
//      /etc/resolv.conf, nameserver 10.0.2.3, when the image has none);
//   3. reads /.krun_config.json (or $KRUN_CONFIG): Cmd, Env, WorkingDir, and mounts the virtio-fs
//      shares listed in MicrovmMounts ([{tag, target, readOnly}]), and MicrovmPorts: the virtio ports
//      the host provides, which it waits for (the driver adds them asynchronously);
//   4. says "UP\n" on the virtio-serial port "microvm.exit" as soon as /sys and /dev are mounted
//      (the host's sign of life: the kernel booted and this init runs);
//   5. runs Cmd as a child with stdout and stderr on the ports "microvm.stdout"/"microvm.stderr"
//      when the host provides them (not a tty: no CRLF, no kernel messages mixed in; stdin stays the
//      console), reaping every orphan while it runs. When the host also provides "microvm.logtimes",
//      the command writes into pipes and this init copies each chunk to its port and notes on
//      "microvm.logtimes" when it arrived, as "<1|2> <offset> <ns>\n" (stream, the chunk's offset
//      in that stream, CLOCK_MONOTONIC): what `microvm logs --since` reads;
//   6. serves the host on the port "microvm.agent" when there is one (native/guest/agent.cc);
//   7. reports the command's exit status on "microvm.exit" as "EXIT <code>\n" (125: setup failed,
//      126: cannot execute, 127: not found, 128+N: killed by signal N), then powers off.
// Milestones go on "microvm.exit" too, as "T <name> <ns>" on the guest's CLOCK_MONOTONIC (0 is the
// kernel's timekeeping start): init (this process started), mounts, network, config (read, shares
// mounted), exec (the command is about to be exec'd). The host turns them into spans.
// A Cmd of exactly ["/.microvm/init", "--idle"] runs no command: the VM serves its agent until stopped.
//
// Under libkrun (not PID 1): libkrun's own init mounts, sets up the network (TSI), reads
// /.krun_config.json and runs Cmd, which the libkrun backend makes
//   /.microvm/init --agent-listen=vsock:PORT -- CMD...
// This process then starts the agent on that listening socket (libkrun bridges the host's unix
// socket to the guest port), outside the command's process tree so that the command never reaps
// or waits for it, and becomes CMD (exec): libkrun's init reports CMD's exit status as before.
// `unix:PATH` listens on a unix socket instead (what the libkrun test double's guest gets: it has no
// vsock device).
// Statically linked, so it runs in any image.
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/json.h"
#include "guest/agent.h"
#include "guest/protocol.h"
#include "guest/util.h"

namespace guest = microvm::guest;

namespace {

using microvm::FindPort;
using microvm::MonotonicNs;
using microvm::WaitForPort;

void Log(const std::string& msg) {
  std::string line = std::string(guest::kConsolePrefix) + msg + "\n";
  ssize_t ignored = write(STDERR_FILENO, line.data(), line.size());
  (void)ignored;
}

void MountFs(const char* source, const char* target, const char* type, unsigned long flags, const char* data) {
  mkdir(target, 0755);
  if (mount(source, target, type, flags, data) != 0 && errno != EBUSY) {
    Log(std::string("mount ") + target + ": " + std::strerror(errno));
  }
}

bool SetFlags(int sock, const char* ifname, short flags) {
  struct ifreq ifr;
  std::memset(&ifr, 0, sizeof ifr);
  std::snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
  if (ioctl(sock, SIOCGIFFLAGS, &ifr) != 0) return false;
  ifr.ifr_flags |= flags;
  return ioctl(sock, SIOCSIFFLAGS, &ifr) == 0;
}

bool SetAddr(int sock, const char* ifname, unsigned long request, const char* addr) {
  struct ifreq ifr;
  std::memset(&ifr, 0, sizeof ifr);
  std::snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
  auto* sin = reinterpret_cast<struct sockaddr_in*>(&ifr.ifr_addr);
  sin->sin_family = AF_INET;
  inet_pton(AF_INET, addr, &sin->sin_addr);
  return ioctl(sock, request, &ifr) == 0;
}

void Network() {
  int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (sock < 0) return;
  SetFlags(sock, "lo", IFF_UP);
  if (SetAddr(sock, "eth0", SIOCSIFADDR, "10.0.2.15") && SetAddr(sock, "eth0", SIOCSIFNETMASK, "255.255.255.0") &&
      SetFlags(sock, "eth0", IFF_UP | IFF_RUNNING)) {
    struct rtentry rt;
    std::memset(&rt, 0, sizeof rt);
    auto* gw = reinterpret_cast<struct sockaddr_in*>(&rt.rt_gateway);
    gw->sin_family = AF_INET;
    inet_pton(AF_INET, "10.0.2.2", &gw->sin_addr);
    reinterpret_cast<struct sockaddr_in*>(&rt.rt_dst)->sin_family = AF_INET;
    reinterpret_cast<struct sockaddr_in*>(&rt.rt_genmask)->sin_family = AF_INET;
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    char dev[] = "eth0";
    rt.rt_dev = dev;
    if (ioctl(sock, SIOCADDRT, &rt) != 0 && errno != EEXIST) Log(std::string("default route: ") + std::strerror(errno));
  }
  close(sock);
}

// The microvm.exit port, opened once (a virtio port takes one opener at a time).
int g_exit_fd = -1;

void SayToHost(const std::string& line) {
  if (g_exit_fd < 0) {
    std::string port = WaitForPort(guest::kPortExit, 10000);
    if (!port.empty()) g_exit_fd = open(port.c_str(), O_WRONLY | O_CLOEXEC);
  }
  if (g_exit_fd < 0) {
    Log("no microvm.exit port: " + line);
    return;
  }
  std::string text = line + "\n";
  ssize_t ignored = write(g_exit_fd, text.data(), text.size());  // blocks until the host took it
  (void)ignored;
}

void Milestone(const char* name, long long ns) {
  SayToHost(std::string(guest::kLineMilestone) + " " + name + " " + std::to_string(ns));
}

[[noreturn]] void Finish(int code) {
  SayToHost(std::string(guest::kLineExit) + " " + std::to_string(code));
  sync();
  // The VM ends itself, with no host process needing to watch (a detached VM): a restart, which
  // the kernel does by a triple fault (reboot=t on the QEMU backend's command line) and QEMU, run
  // with -no-reboot, turns into its exit. (Power-off needs ACPI, which this machine has not.)
  reboot(RB_AUTOBOOT);
  for (;;) pause();  // the host stops the VM once it read the status
}

struct ShareMount {
  std::string tag, target;
  bool read_only = false;
};

void MkdirP(const std::string& path) {
  for (size_t i = 1; i <= path.size(); i++) {
    if (i == path.size() || path[i] == '/') mkdir(path.substr(0, i).c_str(), 0755);
  }
}

// An egress allow-list's names at their virtual addresses ([[ip, name], ...], lib/network/egress.ts),
// appended to /etc/hosts. Only characters a host name or an IPv4 address has; the rest is skipped.
void AddHosts(const microvm::JsonValue* hosts) {
  if (hosts == nullptr || !hosts->is_array() || hosts->array_items().empty()) return;
  auto only = [](const std::string& s, const char* allowed) {
    return !s.empty() && s.size() <= 253 && s.find_first_not_of(allowed) == std::string::npos;
  };
  std::string lines;
  for (const auto& h : hosts->array_items()) {
    if (!h.is_array() || h.array_items().size() != 2 || !h.array_items()[0].is_string() ||
        !h.array_items()[1].is_string())
      continue;
    const std::string& ip = h.array_items()[0].string_value();
    const std::string& name = h.array_items()[1].string_value();
    if (!only(ip, "0123456789.") || !only(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-"))
      continue;
    lines += ip + " " + name + "\n";
  }
  mkdir("/etc", 0755);
  int fd = open("/etc/hosts", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) {
    Log(std::string("/etc/hosts: ") + std::strerror(errno));
    return;
  }
  ssize_t ignored = write(fd, lines.data(), lines.size());
  (void)ignored;
  close(fd);
}

bool ReadConfig(std::vector<std::string>* cmd, std::vector<std::string>* env, std::string* workdir,
                std::vector<ShareMount>* mounts, std::vector<std::string>* ports) {
  const char* path = getenv("KRUN_CONFIG");
  if (path == nullptr) path = guest::kConfigPath;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    Log(std::string("cannot open ") + path + ": " + std::strerror(errno));
    return false;
  }
  std::string text;
  char buf[8192];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) text.append(buf, static_cast<size_t>(n));
  close(fd);
  microvm::JsonValue json;
  std::string error;
  if (!microvm::JsonValue::Parse(text, &json, &error)) {
    Log(std::string(path) + ": " + error);
    return false;
  }
  auto strings = [](const microvm::JsonValue* v, std::vector<std::string>* out) {
    if (v == nullptr || !v->is_array()) return;
    for (const auto& item : v->array_items()) {
      if (item.is_string()) out->push_back(item.string_value());
    }
  };
  strings(json.Get(guest::kConfigCmd), cmd);
  strings(json.Get(guest::kConfigEnv), env);
  strings(json.Get(guest::kConfigPorts), ports);
  AddHosts(json.Get(guest::kConfigHosts));
  const microvm::JsonValue* ms = json.Get(guest::kConfigMounts);
  if (ms != nullptr && ms->is_array()) {
    for (const auto& m : ms->array_items()) {
      const microvm::JsonValue* tag = m.Get("tag");
      const microvm::JsonValue* target = m.Get("target");
      const microvm::JsonValue* ro = m.Get("readOnly");
      if (tag == nullptr || target == nullptr || !tag->is_string() || !target->is_string() ||
          target->string_value().empty() || target->string_value()[0] != '/') {
        continue;
      }
      mounts->push_back(
          {tag->string_value(), target->string_value(), ro != nullptr && ro->is_bool() && ro->bool_value()});
    }
  }
  const microvm::JsonValue* wd = json.Get(guest::kConfigWorkingDir);
  if (wd != nullptr && wd->is_string() && !wd->string_value().empty()) *workdir = wd->string_value();
  if (cmd->empty()) {
    Log(std::string(path) + ": no Cmd");
    return false;
  }
  return true;
}

// Forks the guest agent (native/guest/agent.cc), in a session of its own.
pid_t StartAgent(const microvm::agent::Defaults& defaults) {
  pid_t pid = fork();
  if (pid == 0) {
    setsid();
    microvm::agent::Serve(defaults);
  }
  if (pid < 0) Log(std::string(guest::kPhraseCannotStartAgent) + ": " + std::strerror(errno));
  return pid;
}

// A listening socket for the agent from `vsock:PORT` or `unix:PATH`; -1 (logged) when it cannot be.
int ListenFor(const std::string& spec) {
  int fd = -1;
  if (spec.compare(0, 6, "vsock:") == 0) {
    const std::string digits = spec.substr(6);
    char* end = nullptr;
    errno = 0;
    unsigned long long port = std::strtoull(digits.c_str(), &end, 10);
    if (digits.empty() || digits.size() > 10 || *end != '\0' || errno != 0 || port == 0 || port >= VMADDR_PORT_ANY) {
      Log(std::string(guest::kPhraseBadAgent) + " port: " + spec);
      return -1;
    }
    fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_vm addr;
    std::memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = VMADDR_CID_ANY;
    addr.svm_port = static_cast<unsigned int>(port);
    if (fd >= 0 && bind(fd, reinterpret_cast<struct sockaddr*>(&addr), sizeof addr) != 0) {
      close(fd);
      fd = -1;
    }
  } else if (spec.compare(0, 5, "unix:") == 0) {
    const std::string path = spec.substr(5);
    struct sockaddr_un addr;
    std::memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (path.empty() || path.size() >= sizeof addr.sun_path) {
      Log(std::string(guest::kPhraseBadAgent) + " socket path: " + spec);
      return -1;
    }
    std::memcpy(addr.sun_path, path.data(), path.size());
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 &&
        (bind(fd, reinterpret_cast<struct sockaddr*>(&addr), sizeof addr) != 0 || chmod(path.c_str(), 0600) != 0)) {
      close(fd);
      fd = -1;
    }
  } else {
    Log(std::string(guest::kPhraseBadAgent) + " listen address: " + spec);
    return -1;
  }
  if (fd >= 0 && listen(fd, 4) != 0) {
    close(fd);
    fd = -1;
  }
  if (fd < 0) Log(std::string(guest::kPhraseCannotListen) + " " + spec + ": " + std::strerror(errno));
  return fd;
}

// Under libkrun: see the top of this file. argv: --agent-listen=SPEC -- CMD...
int AgentThenExec(int argc, char** argv) {
  const std::string spec = argv[1] + std::strlen(guest::kArgAgentListen);
  if (argc < 4 || std::strcmp(argv[2], "--") != 0) {
    Log("usage: /.microvm/init --agent-listen=vsock:PORT -- CMD...");
    return 125;
  }
  char** cmd = argv + 3;
  const bool idle =
      argc == 5 && std::strcmp(cmd[0], guest::kInitPath) == 0 && std::strcmp(cmd[1], guest::kArgIdle) == 0;
  int lfd = ListenFor(spec);
  if (lfd >= 0) {
    microvm::agent::Defaults defaults;
    for (char** e = environ; *e != nullptr; e++) defaults.env.emplace_back(*e);
    char cwd[4096];
    if (getcwd(cwd, sizeof cwd) != nullptr) defaults.workdir = cwd;
    pid_t first = fork();
    if (first == 0) {
      // The middle process exits at once: its child, the supervisor, is re-parented to PID 1
      // (libkrun's init), never to the command. It restarts an agent that crashed, a few times.
      setsid();
      if (fork() != 0) _exit(0);
      for (int restarts = 0;; restarts++) {
        pid_t agent = fork();
        if (agent == 0) microvm::agent::ServeListening(defaults, lfd);
        int status = 0;
        while (agent > 0 && waitpid(agent, &status, 0) < 0 && errno == EINTR) {
        }
        const bool crashed = agent < 0 || WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) != 0);
        if (!crashed || restarts >= 5) _exit(0);
        Log("the agent ended (status " + std::to_string(status) + ")");
      }
    }
    while (first > 0 && waitpid(first, nullptr, 0) < 0 && errno == EINTR) {
    }
    if (first < 0) Log(std::string(guest::kPhraseCannotStartAgent) + ": " + std::strerror(errno));
    close(lfd);
  }
  if (idle) {
    for (;;) pause();  // no command: the VM serves its agent until it is stopped
  }
  execvp(cmd[0], cmd);
  const int err = errno;
  Log(std::string("cannot execute ") + cmd[0] + ": " + std::strerror(err));
  return err == ENOENT ? 127 : 126;
}

}  // namespace

int main(int argc, char** argv) {
  const long long started = MonotonicNs();
  if (argc >= 2 && std::strncmp(argv[1], guest::kArgAgentListen, std::strlen(guest::kArgAgentListen)) == 0)
    return AgentThenExec(argc, argv);
  if (getpid() != 1) {
    std::fprintf(stderr, "microvm-guest-init runs as PID 1 inside a VM\n");
    return 125;
  }
  MountFs("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr);
  MountFs("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr);
  MountFs("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
  MountFs("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666");
  MountFs("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  MountFs("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
  const long long mounted = MonotonicNs();
  SayToHost(guest::kLineUp);
  Milestone("init", started);
  Milestone("mounts", mounted);
  if (sethostname("microvm", 7) != 0) Log(std::string("sethostname: ") + std::strerror(errno));
  Network();
  Milestone("network", MonotonicNs());

  std::vector<std::string> cmd, env;
  std::string workdir = "/";
  std::vector<ShareMount> mounts;
  std::vector<std::string> ports;  // the virtio ports the host provides (beside microvm.exit)
  if (!ReadConfig(&cmd, &env, &workdir, &mounts, &ports)) Finish(125);
  auto provided = [&ports](const char* name) {
    for (const auto& p : ports) {
      if (p == name) return true;
    }
    return false;
  };
  for (const auto& m : mounts) {
    MkdirP(m.target);
    if (mount(m.tag.c_str(), m.target.c_str(), "virtiofs", m.read_only ? MS_RDONLY : 0, nullptr) != 0) {
      Log("mount " + m.tag + " on " + m.target + ": " + std::strerror(errno));
      Finish(125);
    }
  }
  Milestone("config", MonotonicNs());

  // The agent serves the host's exec and file requests beside the command (when the host gave it
  // a port); it is restarted if it dies, a few times.
  microvm::agent::Defaults defaults{env, workdir};
  const bool with_agent = provided(guest::kPortAgent);
  pid_t agent = with_agent ? StartAgent(defaults) : -1;
  int agent_restarts = 0;

  // Idle: no command of its own; the VM serves the agent until it is stopped (`microvm run -it`).
  const bool idle = cmd.size() == 2 && cmd[0] == guest::kInitPath && cmd[1] == guest::kArgIdle;
  // With "microvm.logtimes": the command's stdout and stderr are pipes this process relays.
  const bool relay = !idle && provided(guest::kPortLogTimes);
  int pipes[2][2] = {{-1, -1}, {-1, -1}};
  for (int i = 0; relay && i < 2; i++) {
    if (pipe2(pipes[i], O_CLOEXEC) != 0) {
      Log(std::string("pipe: ") + std::strerror(errno));
      Finish(125);
    }
  }
  pid_t child = idle ? 0 : fork();
  if (child < 0) Finish(125);
  if (idle) {
    child = -1;
  } else if (child == 0) {
    setsid();
    ioctl(STDIN_FILENO, TIOCSCTTY, 0);
    // The command's own output channels; without them (an older host) it keeps the console.
    const char* names[2] = {guest::kPortStdout, guest::kPortStderr};
    for (int i = 0; i < 2; i++) {
      if (relay) {
        dup2(pipes[i][1], STDOUT_FILENO + i);  // the copy is not close-on-exec
        continue;
      }
      std::string port = provided(names[i]) ? WaitForPort(names[i], 10000) : FindPort(names[i]);
      if (port.empty()) continue;
      int fd = open(port.c_str(), O_WRONLY);
      if (fd < 0) {
        Log(port + ": " + std::strerror(errno));
        continue;
      }
      if (fd != STDOUT_FILENO + i) {
        dup2(fd, STDOUT_FILENO + i);
        close(fd);
      }
    }
    clearenv();
    for (const auto& e : env) putenv(const_cast<char*>(e.c_str()));
    if (getenv("HOME") == nullptr) setenv("HOME", "/root", 0);
    if (chdir(workdir.c_str()) != 0) {
      Log("chdir " + workdir + ": " + std::strerror(errno));
      _exit(125);
    }
    std::vector<char*> argv;
    for (auto& a : cmd) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    Milestone("exec", MonotonicNs());  // the port's descriptor is close-on-exec
    execvp(argv[0], argv.data());
    int err = errno;
    Log("cannot execute " + cmd[0] + ": " + std::strerror(err));
    _exit(err == ENOENT ? 127 : 126);
  }

  // Reap everything; the VM's status is the command's. SIGCHLD comes through a signalfd so that one
  // poll waits for the command's output and for its end alike. It is blocked only now: the
  // command was forked with the mask as it was; a SIGCHLD that came before is caught by the
  // waitpid(WNOHANG) that starts every round.
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigprocmask(SIG_BLOCK, &chld, nullptr);
  const int sigfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sigfd < 0) {
    Log(std::string("signalfd: ") + std::strerror(errno));
    Finish(125);
  }
  struct Stream {
    int in = -1;   // the pipe's read end (-1: none, or at its end)
    int out = -1;  // the port
    bool splice = true;
    unsigned long long offset = 0;
    long long noted = -1;  // when the last note on microvm.logtimes was taken
  } streams[2];
  int times_fd = -1;
  if (relay) {
    const char* names[2] = {guest::kPortStdout, guest::kPortStderr};
    for (int i = 0; i < 2; i++) {
      close(pipes[i][1]);
      streams[i].in = pipes[i][0];
      fcntl(streams[i].in, F_SETPIPE_SZ, 1 << 20);  // room to batch: fewer wake-ups under TCG
      std::string port = WaitForPort(names[i], 10000);
      streams[i].out = port.empty() ? -1 : open(port.c_str(), O_WRONLY | O_CLOEXEC);
      if (streams[i].out < 0) Log(std::string("no port ") + names[i] + ": the command's output is dropped");
    }
    std::string port = WaitForPort(guest::kPortLogTimes, 10000);
    times_fd = port.empty() ? -1 : open(port.c_str(), O_WRONLY | O_CLOEXEC);
  }
  // Moves what one pipe has to its port and notes when; false at the pipe's end. splice keeps the
  // bytes in the kernel (virtio ports take it); a port that refuses it gets read + write instead.
  // `drain`: the command has ended; take only what is there (the pipe is non-blocking then).
  static char chunk[64 * 1024];
  constexpr long long kNoteEveryNs = 10 * 1000 * 1000;
  constexpr long kBatchNs = 2 * 1000 * 1000;
  auto pump = [&](int i, bool drain) -> bool {
    Stream& st = streams[i];
    const long long at = MonotonicNs();
    ssize_t n = -1;
    if (st.out >= 0 && st.splice) {
      n = splice(st.in, nullptr, st.out, nullptr, 1 << 20, SPLICE_F_MOVE | (drain ? SPLICE_F_NONBLOCK : 0));
      if (n < 0 && errno == EINVAL) {
        st.splice = false;
        return true;
      }
    } else {
      n = read(st.in, chunk, sizeof chunk);
      for (ssize_t done = 0; st.out >= 0 && n > 0 && done < n;) {
        ssize_t w = write(st.out, chunk + done, static_cast<size_t>(n - done));
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break;  // the port is gone: the rest is dropped
        done += w;
      }
    }
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return true;
    if (n <= 0) {
      close(st.in);
      st.in = -1;
      return false;
    }
    // One note per 10 ms of each stream at most (a note per write would double the port traffic of
    // chatty commands): a chunk without one arrived less than 10 ms after the last note's time.
    if (times_fd >= 0 && (st.noted < 0 || at - st.noted >= kNoteEveryNs)) {
      st.noted = at;
      std::string line = std::to_string(i + 1) + " " + std::to_string(st.offset) + " " + std::to_string(at) + "\n";
      ssize_t ignored = write(times_fd, line.data(), line.size());
      (void)ignored;
    }
    st.offset += static_cast<unsigned long long>(n);
    return true;
  };
  for (;;) {
    for (;;) {
      int status = 0;
      pid_t pid = waitpid(-1, &status, WNOHANG);
      if (pid == 0) break;
      if (pid < 0) {
        if (errno == EINTR) continue;
        if (errno == ECHILD && (idle || child < 0)) break;
        Finish(125);
      }
      if (pid == agent && agent > 0) {
        const bool crashed = !WIFEXITED(status) || WEXITSTATUS(status) != 0;
        if (crashed) Log("the agent ended (status " + std::to_string(status) + ")");
        agent = crashed && ++agent_restarts <= 5 ? StartAgent(defaults) : -1;
        continue;
      }
      if (pid == child) {
        // What the command wrote before it ended is in the pipes: relay that much, without
        // waiting for the pipes' end (a process it left behind may hold them open, and write on).
        for (int i = 0; i < 2; i++) {
          int queued = 0;
          if (streams[i].in < 0 || ioctl(streams[i].in, FIONREAD, &queued) != 0) continue;
          fcntl(streams[i].in, F_SETFL, O_NONBLOCK);
          const unsigned long long until = streams[i].offset + static_cast<unsigned long long>(queued);
          while (streams[i].in >= 0 && streams[i].offset < until) {
            const unsigned long long before = streams[i].offset;
            if (!pump(i, true) || streams[i].offset == before) break;
          }
        }
        int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        Finish(code);
      }
    }
    struct pollfd fds[3] = {{sigfd, POLLIN, 0}, {streams[0].in, POLLIN, 0}, {streams[1].in, POLLIN, 0}};
    if (poll(fds, 3, -1) < 0 && errno != EINTR) Finish(125);
    if (fds[0].revents & POLLIN) {
      struct signalfd_siginfo si;
      while (read(sigfd, &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
      }
    }
    if ((fds[1].revents | fds[2].revents) & POLLIN) {
      // Let a writing command fill the pipe a little before moving it: under emulation each
      // switch between the command and this process costs more than the copy (bench/output.js).
      struct timespec batch = {0, kBatchNs};
      nanosleep(&batch, nullptr);
    }
    for (int i = 0; i < 2; i++) {
      if (fds[i + 1].revents & (POLLIN | POLLHUP | POLLERR)) pump(i, false);
    }
  }
}
