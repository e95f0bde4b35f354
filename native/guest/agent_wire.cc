// The agent's link to the host: framing, the frames it sends, and waiting for the next host.
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "common/json.h"
#include "guest/agent_state.h"
#include "guest/util.h"

namespace microvm {
namespace agent {

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

void CloseFd(int* fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

void SetNonBlocking(int fd) {
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

void HostLink::Send(uint8_t type, uint32_t id, const char* data, size_t len) {
  if (broken) return;
  std::string frame(kHeader, '\0');
  PutU32(&frame[0], static_cast<uint32_t>(len));
  frame[4] = static_cast<char>(type);
  PutU32(&frame[5], id);
  frame.append(data, len);
  if (!WriteAll(port, frame.data(), frame.size())) broken = true;
}

void HostLink::Grant(uint32_t id, uint32_t n) {
  char b[4];
  PutU32(b, n);
  Send(kGrant, id, b, 4);
}

void HostLink::Error(uint32_t id, const std::string& code, const std::string& message) {
  std::string j = "{\"code\":";
  JsonQuote(code, &j);
  j += ",\"message\":";
  JsonQuote(message, &j);
  j += "}";
  Send(kError, id, j);
}

void HostLink::Errno(uint32_t id, int err, const std::string& what) {
  Error(id, ErrnoName(err), what + ": " + std::strerror(err));
}

void HostLink::Hello(const std::string& nonce) {
  std::string j = "{\"proto\":\"microvm-agent/1\",\"nonce\":";
  JsonQuote(nonce, &j);
  j += ",\"pid\":" + std::to_string(getpid()) + ",\"uptimeNs\":" + std::to_string(MonotonicNs()) +
       ",\"window\":" + std::to_string(kWindow) + ",\"maxPayload\":" + std::to_string(kMaxPayload) +
       ",\"caps\":[\"exec\",\"tty\",\"files\"]}";
  Send(kHello, 0, j);
}

void HostLink::Done(uint32_t id) {
  Send(kExit, id, "{\"code\":0}");
}

void HostLink::NextHost() {
  if (listen >= 0) {
    if (port >= 0) close(port);
    port = -1;
    while (port < 0) {
      port = accept4(listen, nullptr, nullptr, SOCK_CLOEXEC);
      if (port < 0 && errno != EINTR) {
        Log(std::string("accept: ") + std::strerror(errno));
        usleep(100000);
      }
    }
  }
  Hello("");
}

}  // namespace agent
}  // namespace microvm
