// Starting the guest agent: as a child of PID 1 (QEMU), or under libkrun before the command
// (see the top of guest/init.cc).
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

namespace microvm {
namespace init {
namespace {

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

}  // namespace

// Forks the guest agent (native/guest/agent.cc), in a session of its own.
pid_t StartAgent(const agent::Defaults& defaults) {
  pid_t pid = fork();
  if (pid == 0) {
    setsid();
    agent::Serve(defaults);
  }
  if (pid < 0) Log(std::string(guest::kPhraseCannotStartAgent) + ": " + std::strerror(errno));
  return pid;
}

// Under libkrun: see the top of guest/init.cc. argv: --agent-listen=SPEC -- CMD...
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
    agent::Defaults defaults;
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
        if (agent == 0) agent::ServeListening(defaults, lfd);
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

}  // namespace init
}  // namespace microvm
