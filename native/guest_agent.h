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
};

// Opens the port and serves until the VM ends. Never returns; exits 1 when the port is missing.
[[noreturn]] void Serve(const Defaults& defaults);

}  // namespace agent
}  // namespace microvm
