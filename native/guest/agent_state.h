// The guest agent's state and the pieces its source files share (guest/agent.cc: the loop and the
// frames; agent_wire.cc: the link to the host; agent_exec.cc: commands; agent_files.cc: file
// requests). Everything lives in one Agent, made by Serve/ServeListening: no file-level state.
#pragma once

#include <dirent.h>
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/json.h"
#include "guest/agent.h"

namespace microvm {
namespace agent {

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

// A line on the agent's stderr (the guest's console).
void Log(const std::string& msg);
// "ENOENT" for ENOENT ("EIO" for a number with no name).
std::string ErrnoName(int err);
// write() until all of it is written; false on an error other than EINTR.
bool WriteAll(int fd, const char* p, size_t n);
void PutU32(char* p, uint32_t v);
uint32_t GetU32(const char* p);
void CloseFd(int* fd);
void SetNonBlocking(int fd);

// The connection to the host: the port (or the accepted socket) and whether a write to it failed.
struct HostLink {
  int port = -1;
  int listen = -1;  // a listening socket (ServeListening), or -1: the port (Serve)
  bool broken = false;

  // One frame. A write blocks while no host is connected (virtio-serial); a failed one marks
  // the link broken and later frames are dropped until the next host.
  void Send(uint8_t type, uint32_t id, const char* data, size_t len);
  void Send(uint8_t type, uint32_t id, const std::string& s) { Send(type, id, s.data(), s.size()); }
  void Grant(uint32_t id, uint32_t n);
  void Error(uint32_t id, const std::string& code, const std::string& message);
  void Errno(uint32_t id, int err, const std::string& what);
  void Hello(const std::string& nonce);
  void Done(uint32_t id);  // an exit frame {code: 0}: a file request succeeded
  // Waits for the next host and greets it. On the port the hello's write is the wait (it blocks
  // until a host connects); on a listening socket the previous connection is closed and the next
  // one accepted.
  void NextHost();
};

// One exec or file transfer the host started.
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

// Releases what a stream holds; an unfinished put leaves no file behind.
void Release(Stream* s);

struct Agent {
  HostLink host;
  Defaults defaults;
  std::map<uint32_t, std::unique_ptr<Stream>> streams;
  unsigned put_counter = 0;                          // names of puts' temporary files
  std::map<std::string, std::string> program_cache;  // FindProgram's finds, per PATH and name
  std::vector<char> io_buf = std::vector<char>(kMaxPayload);
  // The exec child's stack (agent_exec.cc): one serves every exec, as the agent is suspended until
  // the child has exec'd or exited.
  alignas(16) char spawn_stack[64 * 1024];

  void End(uint32_t id);
  void EndWithErrno(Stream* s, int err, const std::string& what);
  // A new host: what the previous one started ends (its processes are killed, transfers dropped).
  void ResetAll();
  // Collects ended children and marks their streams.
  void Reap();
};

// Request fields: a string array, a string ("" when absent), a number (`dflt` when absent).
std::vector<std::string> Strings(const JsonValue* v);
std::string Str(const JsonValue& j, const char* key);
long Num(const JsonValue& j, const char* key, long dflt);

// agent_exec.cc: {argv, env, cwd, user, tty: {rows, cols} | null, stdin, window}
void StartExec(Agent& a, uint32_t id, const JsonValue& req);
// Moves what can move on an exec's stream without blocking; reports its exit once drained.
void ServiceExec(Agent& a, Stream* s);

// agent_files.cc: put/get/list open a stream; the others answer at once.
void StartOp(Agent& a, uint32_t id, const JsonValue& req);
// A put's data and its end (the file is renamed into place only then).
void PutData(Agent& a, Stream* s, const std::string& payload);
void PutEnd(Agent& a, Stream* s);
// A get's or a list's output, as far as the host's credit goes.
void ServiceGet(Agent& a, Stream* s);
void ServiceList(Agent& a, Stream* s);

}  // namespace agent
}  // namespace microvm
