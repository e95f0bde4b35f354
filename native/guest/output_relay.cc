// microvm-guest-init's output relay (see OutputRelay in guest/init_parts.h).
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

constexpr long long kNoteEveryNs = 10 * 1000 * 1000;

}  // namespace

bool OutputRelay::MakePipes() {
  for (int i = 0; i < 2; i++) {
    if (pipe2(pipes_[i], O_CLOEXEC) != 0) {
      Log(std::string("pipe: ") + std::strerror(errno));
      return false;
    }
  }
  return true;
}

void OutputRelay::AttachChild() const {
  for (int i = 0; i < 2; i++) dup2(pipes_[i][1], STDOUT_FILENO + i);  // the copy is not close-on-exec
}

void OutputRelay::OpenPorts() {
  const char* names[2] = {guest::kPortStdout, guest::kPortStderr};
  for (int i = 0; i < 2; i++) {
    close(pipes_[i][1]);
    streams_[i].in = pipes_[i][0];
    fcntl(streams_[i].in, F_SETPIPE_SZ, 1 << 20);  // room to batch: fewer wake-ups under TCG
    std::string port = WaitForPort(names[i], 10000);
    streams_[i].out = port.empty() ? -1 : open(port.c_str(), O_WRONLY | O_CLOEXEC);
    if (streams_[i].out < 0) Log(std::string("no port ") + names[i] + ": the command's output is dropped");
  }
  std::string port = WaitForPort(guest::kPortLogTimes, 10000);
  times_fd_ = port.empty() ? -1 : open(port.c_str(), O_WRONLY | O_CLOEXEC);
}

// splice keeps the bytes in the kernel (virtio ports take it); a port that refuses it gets read +
// write instead.
bool OutputRelay::Pump(int i, bool drain) {
  Stream& st = streams_[i];
  const long long at = MonotonicNs();
  ssize_t n = -1;
  if (st.out >= 0 && st.splice) {
    n = splice(st.in, nullptr, st.out, nullptr, 1 << 20, SPLICE_F_MOVE | (drain ? SPLICE_F_NONBLOCK : 0));
    if (n < 0 && errno == EINVAL) {
      st.splice = false;
      return true;
    }
  } else {
    n = read(st.in, chunk_.data(), chunk_.size());
    for (ssize_t done = 0; st.out >= 0 && n > 0 && done < n;) {
      ssize_t w = write(st.out, chunk_.data() + done, static_cast<size_t>(n - done));
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
  if (times_fd_ >= 0 && (st.noted < 0 || at - st.noted >= kNoteEveryNs)) {
    st.noted = at;
    std::string line = std::to_string(i + 1) + " " + std::to_string(st.offset) + " " + std::to_string(at) + "\n";
    ssize_t ignored = write(times_fd_, line.data(), line.size());
    (void)ignored;
  }
  st.offset += static_cast<unsigned long long>(n);
  return true;
}

void OutputRelay::DrainQueued() {
  for (int i = 0; i < 2; i++) {
    int queued = 0;
    if (streams_[i].in < 0 || ioctl(streams_[i].in, FIONREAD, &queued) != 0) continue;
    fcntl(streams_[i].in, F_SETFL, O_NONBLOCK);
    const unsigned long long until = streams_[i].offset + static_cast<unsigned long long>(queued);
    while (streams_[i].in >= 0 && streams_[i].offset < until) {
      const unsigned long long before = streams_[i].offset;
      if (!Pump(i, true) || streams_[i].offset == before) break;
    }
  }
}

}  // namespace init
}  // namespace microvm
