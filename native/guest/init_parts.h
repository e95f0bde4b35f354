// The pieces of microvm-guest-init (guest/init.cc has the boot sequence and the supervisor):
// guest/setup.cc mounts, brings up the network and reads the config; guest/exit_port.cc speaks on
// "microvm.exit"; guest/output_relay.cc moves the command's output with the arrival times;
// guest/agent_launch.cc starts the agent (as PID 1's child, or under libkrun before the command).
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "guest/agent.h"

namespace microvm {
namespace init {

// A line on the console, prefixed as the host's console reader expects (guest/protocol.h).
void Log(const std::string& msg);

// --- setup.cc
// /proc, /sys, /dev, /dev/pts, /dev/shm, /run.
void MountBasics();
// lo, and eth0 as QEMU's user-mode network wants it (10.0.2.15/24, gateway 10.0.2.2).
void Network();

struct ShareMount {
  std::string tag, target;
  bool read_only = false;
};

// What /.krun_config.json (or $KRUN_CONFIG) says.
struct GuestConfig {
  std::vector<std::string> cmd, env;
  std::string workdir = "/";
  std::string user;  // the image's User, for the agent's exec
  std::vector<ShareMount> mounts;
  std::vector<std::string> ports;  // the virtio ports the host provides (beside microvm.exit)

  bool Provides(const char* port) const;
  // The idle command (["/.microvm/init", "--idle"]): no command; the VM serves its agent.
  bool Idle() const;
};

// Reads the config (and appends its host names to /etc/hosts); false, logged, when it cannot.
bool ReadConfig(GuestConfig* config);
// Mounts the virtio-fs shares; false, logged, at the first that fails.
bool MountShares(const GuestConfig& config);

// --- exit_port.cc
// The "microvm.exit" port: the host's sign of life, the milestones and the exit status.
class ExitPort {
 public:
  void Say(const std::string& line);
  void Milestone(const char* name, long long ns);
  // Reports the status, syncs and ends the VM.
  [[noreturn]] void Finish(int code);

 private:
  int fd_ = -1;  // opened once (a virtio port takes one opener at a time)
};

// --- output_relay.cc
// The command's stdout and stderr through pipes this process copies to their ports, noting on
// "microvm.logtimes" when each chunk arrived, as "<1|2> <offset> <ns>\n" (stream, the chunk's offset
// in that stream, CLOCK_MONOTONIC): what `microvm logs --since` reads.
class OutputRelay {
 public:
  // Before the command is forked; false (logged) when a pipe cannot be made.
  bool MakePipes();
  // In the command's process: the pipes' write ends become its stdout and stderr.
  void AttachChild() const;
  // In this process, after the fork: closes the write ends and opens the ports.
  void OpenPorts();
  // The read end of stream i (0: stdout, 1: stderr), -1 once it ended.
  int fd(int i) const { return streams_[i].in; }
  // Moves what one pipe has to its port and notes when; false at the pipe's end. `drain`: the
  // command has ended; take only what is there (the pipe is non-blocking then).
  bool Pump(int i, bool drain);
  // The command ended: relays what the pipes hold now, without waiting for the pipes' end (a
  // process it left behind may hold them open, and write on).
  void DrainQueued();

 private:
  struct Stream {
    int in = -1;   // the pipe's read end (-1: none, or at its end)
    int out = -1;  // the port
    bool splice = true;
    unsigned long long offset = 0;
    long long noted = -1;  // when the last note on microvm.logtimes was taken
  };
  int pipes_[2][2] = {{-1, -1}, {-1, -1}};
  Stream streams_[2];
  int times_fd_ = -1;
  std::vector<char> chunk_ = std::vector<char>(64 * 1024);
};

// --- agent_launch.cc
// Forks the guest agent (guest/agent.cc) in a session of its own; -1 (logged) when it cannot.
pid_t StartAgent(const agent::Defaults& defaults);
// Under libkrun (not PID 1): argv is --agent-listen=SPEC -- CMD...; starts the agent, then execs CMD.
int AgentThenExec(int argc, char** argv);

}  // namespace init
}  // namespace microvm
