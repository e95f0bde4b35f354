// The guest agent: a child of microvm-guest-init that serves the host's exec and file requests on
// the virtio-serial port "microvm.agent", so a VM needs no SSH server in its image.
// The wire format is documented in docs/agent-protocol.md; the host side is lib/agent/.
#pragma once

#include <string>
#include <vector>

namespace microvm {
namespace agent {

// What every exec starts from: the image's Env plus run()'s env, and the working directory.
struct Defaults {
  std::vector<std::string> env;
  std::string workdir = "/";
  std::string user;  // the image's User: exec runs as it unless a request names one ("": root)
};

// Opens the port and serves until the VM ends. Never returns; exits 1 when the port is missing.
[[noreturn]] void Serve(const Defaults& defaults);

// Serves each connection accepted on `listen_fd` (a listening stream socket: vsock under libkrun,
// where libkrun bridges the host's unix socket to a guest port), one host at a time, until the VM
// ends. The protocol is the same as on the port: a hello as soon as a host is connected.
[[noreturn]] void ServeListening(const Defaults& defaults, int listen_fd);

}  // namespace agent
}  // namespace microvm
