// The guest agent (see guest/agent.h and docs/agent-protocol.md): its loop and the host's frames.
// Commands are in agent_exec.cc, file requests in agent_files.cc, the link to the host in
// agent_wire.cc; their shared state is one Agent (agent_state.h).
//
// One process, one poll loop: the port, a signalfd for SIGCHLD, and per stream the descriptors it
// moves bytes between. Nothing here trusts the host more than it must either: frames are
// length-checked, a stream the host overruns is ended, input is buffered only up to the window the
// agent granted, and output is read from a child only while the host has granted room for it, so a
// host that stops reading stops the child (its pipe fills) instead of growing this process.
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
#include "guest/agent_state.h"
#include "guest/protocol.h"
#include "guest/util.h"

namespace microvm {
namespace agent {

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

void Agent::End(uint32_t id) {
  auto it = streams.find(id);
  if (it == streams.end()) return;
  Release(it->second.get());
  streams.erase(it);
}

void Agent::EndWithErrno(Stream* s, int err, const std::string& what) {
  host.Errno(s->id, err, what);
  End(s->id);
}

void Agent::ResetAll() {
  for (auto& kv : streams) {
    Stream* s = kv.second.get();
    if (s->kind == Stream::Kind::kExec && s->pid > 0 && !s->exited) kill(-s->pid, SIGKILL);
    Release(s);
  }
  streams.clear();
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

void Agent::Reap() {
  for (;;) {
    int status = 0;
    pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid <= 0) return;
    for (auto& kv : streams) {
      if (kv.second->pid == pid) {
        kv.second->exited = true;
        kv.second->status = status;
      }
    }
  }
}

namespace {

void HandleFrame(Agent& a, uint8_t type, uint32_t id, const std::string& payload) {
  JsonValue json;
  std::string error;
  bool is_json = type == kHello || type == kExec || type == kSignal || type == kResize || type == kOp;
  if (is_json && (payload.size() > kMaxJson || !JsonValue::Parse(payload, &json, &error) || !json.is_object())) {
    if (type == kExec || type == kOp) a.host.Error(id, "EINVAL", "malformed request: " + error);
    return;
  }
  if (type == kHello) {
    if (Str(json, "proto") != "microvm-host/1") return;
    a.ResetAll();
    a.host.Hello(Str(json, "nonce"));
    return;
  }
  auto it = a.streams.find(id);
  Stream* s = it == a.streams.end() ? nullptr : it->second.get();
  if (type == kExec || type == kOp) {
    if (s != nullptr) {
      a.host.Error(id, "EEXIST", "stream id in use");
    } else if (a.streams.size() >= kMaxStreams) {
      a.host.Error(id, "EAGAIN", "too many streams (at most " + std::to_string(kMaxStreams) + ")");
    } else if (type == kExec) {
      StartExec(a, id, json);
    } else {
      StartOp(a, id, json);
    }
    return;
  }
  if (s == nullptr) return;  // a stream that already ended (a late signal or grant)
  switch (type) {
    case kData:
      if (payload.size() > s->allowed) {
        if (s->kind == Stream::Kind::kExec && s->pid > 0 && !s->exited) kill(-s->pid, SIGKILL);
        a.host.Error(id, "EPROTO", "input beyond the granted window");
        a.End(id);
        return;
      }
      s->allowed -= static_cast<uint32_t>(payload.size());
      if (s->kind == Stream::Kind::kPut) {
        PutData(a, s, payload);
      } else if (s->kind == Stream::Kind::kExec && s->in_fd >= 0 && !s->in_eof) {
        s->inbuf += payload;
      }
      return;
    case kEof:
      if (s->kind == Stream::Kind::kPut) {
        PutEnd(a, s);
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
        a.host.Error(id, "ECANCELED", "cancelled by the host");
        a.End(id);
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
void ParseFrames(Agent& a, std::string* buf) {
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
    HandleFrame(a, type, id, payload);
  }
}

// Moves what can move on one stream without blocking.
void Service(Agent& a, Stream* s) {
  switch (s->kind) {
    case Stream::Kind::kExec:
      return ServiceExec(a, s);
    case Stream::Kind::kGet:
      return ServiceGet(a, s);
    case Stream::Kind::kList:
      return ServiceList(a, s);
    case Stream::Kind::kPut:
      return;  // moved by the host's frames
  }
}

[[noreturn]] void ServeLoop(Agent& a);

}  // namespace

void Serve(const Defaults& defaults) {
  Agent a;  // ServeLoop never returns
  a.defaults = defaults;
  std::string port = WaitForPort(guest::kPortAgent, 30000);
  if (port.empty()) {
    Log(std::string("no ") + guest::kPortAgent + " port");
    _exit(0);  // nothing to serve: not restarted
  }
  a.host.port = open(port.c_str(), O_RDWR | O_CLOEXEC);
  if (a.host.port < 0) {
    Log(port + ": " + std::strerror(errno));
    _exit(1);
  }
  ServeLoop(a);
}

void ServeListening(const Defaults& defaults, int listen_fd) {
  Agent a;
  a.defaults = defaults;
  a.host.listen = listen_fd;
  ServeLoop(a);
}

namespace {

void ServeLoop(Agent& a) {
  signal(SIGPIPE, SIG_IGN);
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigprocmask(SIG_BLOCK, &chld, nullptr);
  int sigfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
  a.host.NextHost();  // blocks until a host connects
  std::string inbuf;
  std::vector<char> rbuf(kMaxPayload + kHeader);
  for (;;) {
    if (a.host.broken) {  // the port failed under a write: start over with the next host
      a.ResetAll();
      inbuf.clear();
      a.host.broken = false;
      usleep(100000);
      a.host.NextHost();
      continue;
    }
    std::vector<struct pollfd> fds = {{a.host.port, POLLIN, 0}, {sigfd, POLLIN, 0}};
    bool busy = false;  // a transfer that can move without waiting (a regular file, a directory)
    for (auto& kv : a.streams) {
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
      a.Reap();
    }
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t got = read(a.host.port, rbuf.data(), rbuf.size());
      if (got > 0) {
        inbuf.append(rbuf.data(), static_cast<size_t>(got));
        ParseFrames(a, &inbuf);
      } else if (got == 0 || (errno != EINTR && errno != EAGAIN)) {
        // The host went away: end what it started, then wait (in the write) for the next one.
        a.ResetAll();
        inbuf.clear();
        a.host.NextHost();
        continue;
      }
    }
    std::vector<uint32_t> ids;
    for (auto& kv : a.streams) ids.push_back(kv.first);
    for (uint32_t id : ids) {
      auto it = a.streams.find(id);
      if (it != a.streams.end()) Service(a, it->second.get());
    }
  }
}

}  // namespace
}  // namespace agent
}  // namespace microvm