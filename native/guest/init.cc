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

#include "guest/init_parts.h"
#include "guest/protocol.h"
#include "guest/util.h"

namespace microvm {
namespace init {
namespace {

// Forks the command: its own session with the console as its terminal, stdout and stderr on
// their ports (or the relay's pipes), the config's environment and directory. Returns its pid.
pid_t StartCommand(const GuestConfig& config, const OutputRelay* relay, ExitPort& exit_port) {
  pid_t child = fork();
  if (child != 0) return child;
  setsid();
  ioctl(STDIN_FILENO, TIOCSCTTY, 0);
  // The command's own output channels; without them (an older host) it keeps the console.
  if (relay != nullptr) {
    relay->AttachChild();
  } else {
    const char* names[2] = {guest::kPortStdout, guest::kPortStderr};
    for (int i = 0; i < 2; i++) {
      std::string port = config.Provides(names[i]) ? WaitForPort(names[i], 10000) : FindPort(names[i]);
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
  }
  clearenv();
  for (const auto& e : config.env) putenv(const_cast<char*>(e.c_str()));
  if (getenv("HOME") == nullptr) setenv("HOME", "/root", 0);
  if (chdir(config.workdir.c_str()) != 0) {
    Log("chdir " + config.workdir + ": " + std::strerror(errno));
    _exit(125);
  }
  std::vector<char*> argv;
  for (auto& a : config.cmd) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  exit_port.Milestone("exec", MonotonicNs());  // the port's descriptor is close-on-exec
  execvp(argv[0], argv.data());
  int err = errno;
  Log("cannot execute " + config.cmd[0] + ": " + std::strerror(err));
  _exit(err == ENOENT ? 127 : 126);
}

// Reaps everything until the command (`child`; -1: idle, none) ends, relaying its output and
// restarting a crashed agent a few times; then reports the command's status and ends the VM.
// SIGCHLD comes through a signalfd so that one poll waits for the command's output and for its
// end alike. It is blocked only now: the command was forked with the mask as it was; a SIGCHLD
// that came before is caught by the waitpid(WNOHANG) that starts every round.
[[noreturn]] void Supervise(pid_t child, pid_t agent, const agent::Defaults& defaults, OutputRelay* relay,
                            ExitPort& exit_port) {
  constexpr long kBatchNs = 2 * 1000 * 1000;
  int agent_restarts = 0;
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigprocmask(SIG_BLOCK, &chld, nullptr);
  const int sigfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sigfd < 0) {
    Log(std::string("signalfd: ") + std::strerror(errno));
    exit_port.Finish(125);
  }
  for (;;) {
    for (;;) {
      int status = 0;
      pid_t pid = waitpid(-1, &status, WNOHANG);
      if (pid == 0) break;
      if (pid < 0) {
        if (errno == EINTR) continue;
        if (errno == ECHILD && child < 0) break;
        exit_port.Finish(125);
      }
      if (pid == agent && agent > 0) {
        const bool crashed = !WIFEXITED(status) || WEXITSTATUS(status) != 0;
        if (crashed) Log("the agent ended (status " + std::to_string(status) + ")");
        agent = crashed && ++agent_restarts <= 5 ? StartAgent(defaults) : -1;
        continue;
      }
      if (pid == child) {
        // What the command wrote before it ended is in the pipes: relay that much.
        if (relay != nullptr) relay->DrainQueued();
        exit_port.Finish(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
      }
    }
    struct pollfd fds[3] = {{sigfd, POLLIN, 0},
                            {relay != nullptr ? relay->fd(0) : -1, POLLIN, 0},
                            {relay != nullptr ? relay->fd(1) : -1, POLLIN, 0}};
    if (poll(fds, 3, -1) < 0 && errno != EINTR) exit_port.Finish(125);
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
      if (fds[i + 1].revents & (POLLIN | POLLHUP | POLLERR)) relay->Pump(i, false);
    }
  }
}

}  // namespace
}  // namespace init
}  // namespace microvm

int main(int argc, char** argv) {
  namespace guest = microvm::guest;
  using microvm::MonotonicNs;
  using namespace microvm::init;
  const long long started = MonotonicNs();
  if (argc >= 2 && std::strncmp(argv[1], guest::kArgAgentListen, std::strlen(guest::kArgAgentListen)) == 0)
    return AgentThenExec(argc, argv);
  if (getpid() != 1) {
    std::fprintf(stderr, "microvm-guest-init runs as PID 1 inside a VM\n");
    return 125;
  }
  ExitPort exit_port;
  MountBasics();
  const long long mounted = MonotonicNs();
  exit_port.Say(guest::kLineUp);
  exit_port.Milestone("init", started);
  exit_port.Milestone("mounts", mounted);
  if (sethostname("microvm", 7) != 0) Log(std::string("sethostname: ") + std::strerror(errno));
  Network();
  exit_port.Milestone("network", MonotonicNs());

  GuestConfig config;
  if (!ReadConfig(&config) || !MountShares(config)) exit_port.Finish(125);
  exit_port.Milestone("config", MonotonicNs());

  // The agent serves the host's exec and file requests beside the command (when the host gave it
  // a port); it is restarted if it dies, a few times.
  const microvm::agent::Defaults defaults{config.env, config.workdir, config.user};
  const pid_t agent = config.Provides(guest::kPortAgent) ? StartAgent(defaults) : -1;

  // Idle: no command of its own; the VM serves the agent until it is stopped (`microvm run -it`).
  const bool idle = config.Idle();
  // With "microvm.logtimes": the command's stdout and stderr are pipes this process relays.
  OutputRelay relay;
  const bool relayed = !idle && config.Provides(guest::kPortLogTimes);
  if (relayed && !relay.MakePipes()) exit_port.Finish(125);
  pid_t child = -1;
  if (!idle) {
    child = StartCommand(config, relayed ? &relay : nullptr, exit_port);
    if (child < 0) exit_port.Finish(125);
    if (relayed) relay.OpenPorts();
  }
  Supervise(child, agent, defaults, relayed ? &relay : nullptr, exit_port);
}
