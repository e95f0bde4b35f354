// The launch plan: one JSON-serialisable description of a libkrun context's configuration.
// The same ApplyPlan() runs in the addon (to validate a plan against the real libkrun without
// starting a VM) and in the runner (right before krun_start_enter). Each libkrun call also has a
// single wrapper here, used by both ApplyPlan() and the KrunContext methods of the addon, and every
// wrapper goes through one checker (Check) that records the failing function and its -errno.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/json.h"
#include "common/krun_api.h"

namespace microvm {

struct KrunFailure {
  std::string syscall;  // libkrun function name, e.g. "krun_set_vm_config"
  int32_t rc = 0;       // the negative errno libkrun returned
  std::string detail;   // extra context (e.g. "symbol not exported by this libkrun")
};

struct VirtiofsMount {
  std::string tag;
  std::string path;
  bool read_only = false;
};

enum class PortMapKind { kAll, kNone, kList };
struct PortMap {
  PortMapKind kind = PortMapKind::kAll;
  std::vector<std::string> entries;  // "host:guest", when kind == kList
};

enum class NetKind { kUnixStream, kUnixGram };
struct NetDevice {
  NetKind kind = NetKind::kUnixStream;
  std::string path;  // empty when fd >= 0
  int fd = -1;
  uint8_t mac[6] = {0, 0, 0, 0, 0, 0};
  uint32_t features = 0;
  uint32_t flags = 0;
};

struct VsockPort {
  uint32_t port = 0;
  std::string path;
  bool has_listen = false;  // listen given => krun_add_vsock_port2
  bool listen = false;
};

struct ExecSpec {
  std::string path;
  std::vector<std::string> args;  // arguments after the executable (not argv[0])
  bool has_env = false;           // false => NULL envp: libkrun copies the host environment
  std::vector<std::string> env;
};

// Runner only (not a libkrun call): mount an overlay in a private mount namespace (plus a user
// namespace when not root) before configuring libkrun, and serve `merged` as the root.
struct OverlaySpec {
  std::string lower, upper, work, merged;
};

struct LaunchPlan {
  std::string libkrun_path;
  bool has_overlay = false;
  OverlaySpec overlay;
  std::string firmware_path;  // empty: let libkrun's own loader search find libkrunfw
  int log_level = -1;         // -1: leave libkrun's default
  uint8_t cpus = 1;
  uint32_t memory_mib = 512;
  std::string root;
  std::vector<VirtiofsMount> virtiofs;
  std::vector<NetDevice> net;
  bool has_port_map = false;
  PortMap port_map;
  bool has_exec = false;
  ExecSpec exec;
  bool has_env = false;
  std::vector<std::string> env;
  std::string workdir;
  bool has_rlimits = false;
  std::vector<std::string> rlimits;
  std::string console_output;
  std::vector<VsockPort> vsock_ports;
};

// Reads a plan from parsed JSON. Unknown keys and wrong types are errors (the TypeScript side
// validates meaning; this guards the runner against a malformed or foreign file).
bool ParsePlan(const JsonValue& json, LaunchPlan* plan, std::string* error);
bool ParsePlanText(const std::string& text, LaunchPlan* plan, std::string* error);

// Applies every setting of `plan` to context `ctx`, in a fixed order. Stops at the first failure.
// apply_log_level: the runner (a fresh process) applies the plan's log level; the addon's dry run
// never does (libkrun's logger can be installed once per process; see KrunSetLogLevel).
bool ApplyPlan(const KrunApi& api, uint32_t ctx, const LaunchPlan& plan, KrunFailure* failure, bool apply_log_level);

// One wrapper per libkrun call. Return true on success, else fill `failure`.
bool KrunSetLogLevel(const KrunApi& api, uint32_t level, KrunFailure* failure);
bool KrunCreateCtx(const KrunApi& api, uint32_t* ctx, KrunFailure* failure);
bool KrunFreeCtx(const KrunApi& api, uint32_t ctx, KrunFailure* failure);
bool KrunSetVmConfig(const KrunApi& api, uint32_t ctx, uint8_t cpus, uint32_t memory_mib, KrunFailure* failure);
bool KrunSetRoot(const KrunApi& api, uint32_t ctx, const std::string& path, KrunFailure* failure);
bool KrunAddVirtiofs(const KrunApi& api, uint32_t ctx, const VirtiofsMount& mount, KrunFailure* failure);
bool KrunAddNet(const KrunApi& api, uint32_t ctx, const NetDevice& net, KrunFailure* failure);
bool KrunSetPortMap(const KrunApi& api, uint32_t ctx, const PortMap& map, KrunFailure* failure);
bool KrunSetExec(const KrunApi& api, uint32_t ctx, const ExecSpec& exec, KrunFailure* failure);
bool KrunSetEnv(const KrunApi& api, uint32_t ctx, const std::vector<std::string>& env, KrunFailure* failure);
bool KrunSetWorkdir(const KrunApi& api, uint32_t ctx, const std::string& path, KrunFailure* failure);
bool KrunSetRlimits(const KrunApi& api, uint32_t ctx, const std::vector<std::string>& rlimits, KrunFailure* failure);
bool KrunSetConsoleOutput(const KrunApi& api, uint32_t ctx, const std::string& path, KrunFailure* failure);
bool KrunAddVsockPort(const KrunApi& api, uint32_t ctx, const VsockPort& port, KrunFailure* failure);
// Returns 1/0 for a feature, or fills `failure` (-ENOTSUP when krun_has_feature is absent).
bool KrunHasFeature(const KrunApi& api, uint64_t feature, bool* present, KrunFailure* failure);

}  // namespace microvm
