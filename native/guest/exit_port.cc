// microvm-guest-init's "microvm.exit" port (guest/protocol.h has its line grammar).
#include <fcntl.h>
#include <sys/reboot.h>
#include <unistd.h>

#include <string>

#include "guest/init_parts.h"
#include "guest/protocol.h"
#include "guest/util.h"

namespace microvm {
namespace init {

void ExitPort::Say(const std::string& line) {
  if (fd_ < 0) {
    std::string port = WaitForPort(guest::kPortExit, 10000);
    if (!port.empty()) fd_ = open(port.c_str(), O_WRONLY | O_CLOEXEC);
  }
  if (fd_ < 0) {
    Log("no microvm.exit port: " + line);
    return;
  }
  std::string text = line + "\n";
  ssize_t ignored = write(fd_, text.data(), text.size());  // blocks until the host took it
  (void)ignored;
}

void ExitPort::Milestone(const char* name, long long ns) {
  Say(std::string(guest::kLineMilestone) + " " + name + " " + std::to_string(ns));
}

void ExitPort::Finish(int code) {
  Say(std::string(guest::kLineExit) + " " + std::to_string(code));
  sync();
  // The VM ends itself, with no host process needing to watch (a detached VM): a restart, which
  // the kernel does by a triple fault (reboot=t on the QEMU backend's command line) and QEMU, run
  // with -no-reboot, turns into its exit. (Power-off needs ACPI, which this machine has not.)
  reboot(RB_AUTOBOOT);
  for (;;) pause();  // the host stops the VM once it read the status
}

}  // namespace init
}  // namespace microvm
