#include "common/plan.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <set>

namespace microvm {

namespace {

// The one checker every libkrun call goes through.
bool Check(const char* fn, int32_t rc, KrunFailure* failure) {
  if (rc >= 0) return true;
  failure->syscall = fn;
  failure->rc = rc;
  failure->detail.clear();
  return false;
}

bool Missing(const char* fn, KrunFailure* failure) {
  failure->syscall = fn;
  failure->rc = -ENOTSUP;
  failure->detail = "this libkrun does not export it";
  return false;
}

// NULL-terminated array view over a vector of strings (owned by the caller).
class CStringArray {
 public:
  explicit CStringArray(const std::vector<std::string>& items) {
    ptrs_.reserve(items.size() + 1);
    for (const auto& s : items) ptrs_.push_back(s.c_str());
    ptrs_.push_back(nullptr);
  }
  const char* const* get() const { return ptrs_.data(); }

 private:
  std::vector<const char*> ptrs_;
};

// ---- JSON readers with path-qualified errors ------------------------------------------------

bool Fail(std::string* error, const std::string& where, const char* what) {
  *error = "plan." + where + ": " + what;
  return false;
}

bool ReadString(const JsonValue& v, const std::string& where, std::string* out, std::string* error) {
  if (!v.is_string()) return Fail(error, where, "expected a string");
  if (v.string_value().find('\0') != std::string::npos) {
    return Fail(error, where, "must not contain NUL");
  }
  *out = v.string_value();
  return true;
}

bool ReadUint(const JsonValue& v, const std::string& where, double max, uint64_t* out, std::string* error) {
  if (!v.is_number()) return Fail(error, where, "expected a number");
  double d = v.number_value();
  if (d < 0 || d > max || std::floor(d) != d) {
    return Fail(error, where, "expected a non-negative integer in range");
  }
  *out = static_cast<uint64_t>(d);
  return true;
}

bool ReadBool(const JsonValue& v, const std::string& where, bool* out, std::string* error) {
  if (!v.is_bool()) return Fail(error, where, "expected a boolean");
  *out = v.bool_value();
  return true;
}

bool ReadStrings(const JsonValue& v, const std::string& where, std::vector<std::string>* out, std::string* error) {
  if (!v.is_array()) return Fail(error, where, "expected an array of strings");
  out->clear();
  size_t i = 0;
  for (const auto& item : v.array_items()) {
    std::string s;
    if (!ReadString(item, where + "[" + std::to_string(i++) + "]", &s, error)) return false;
    out->push_back(std::move(s));
  }
  return true;
}

bool OnlyKeys(const JsonValue& obj, const std::string& where, std::set<std::string> allowed, std::string* error) {
  if (!obj.is_object()) return Fail(error, where, "expected an object");
  for (const auto& kv : obj.object_items()) {
    if (!allowed.count(kv.first)) {
      *error = "plan." + where + (where.empty() ? "" : ".") + kv.first + ": unknown key";
      return false;
    }
  }
  return true;
}

bool ParseMac(const std::string& text, uint8_t mac[6]) {
  unsigned int b[6];
  char tail;
  if (std::sscanf(text.c_str(), "%2x:%2x:%2x:%2x:%2x:%2x%c", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &tail) != 6 ||
      text.size() != 17) {
    return false;
  }
  for (int i = 0; i < 6; i++) mac[i] = static_cast<uint8_t>(b[i]);
  return true;
}

}  // namespace

// ---- libkrun call wrappers -------------------------------------------------------------------

// libkrun 1.19 installs a process-wide logger on every krun_set_log_level (and krun_init_log)
// call, and the second one panics and aborts the process. So the level is applied at most once
// per process: the same level again is a no-op, another level is refused with -EALREADY.
bool KrunSetLogLevel(const KrunApi& api, uint32_t level, KrunFailure* f) {
  static std::mutex mu;
  static int applied = -1;
  std::lock_guard<std::mutex> lock(mu);
  if (applied == static_cast<int>(level)) return true;
  if (applied >= 0) {
    f->syscall = "krun_set_log_level";
    f->rc = -EALREADY;
    f->detail = "libkrun's log level is set once per process and is already " + std::to_string(applied) +
                "; a second krun_set_log_level would abort the process";
    return false;
  }
  if (!Check("krun_set_log_level", api.set_log_level(level), f)) return false;
  applied = static_cast<int>(level);
  return true;
}

bool KrunCreateCtx(const KrunApi& api, uint32_t* ctx, KrunFailure* f) {
  int32_t rc = api.create_ctx();
  if (!Check("krun_create_ctx", rc, f)) return false;
  *ctx = static_cast<uint32_t>(rc);
  return true;
}

bool KrunFreeCtx(const KrunApi& api, uint32_t ctx, KrunFailure* f) {
  return Check("krun_free_ctx", api.free_ctx(ctx), f);
}

bool KrunSetVmConfig(const KrunApi& api, uint32_t ctx, uint8_t cpus, uint32_t mem, KrunFailure* f) {
  return Check("krun_set_vm_config", api.set_vm_config(ctx, cpus, mem), f);
}

bool KrunSetRoot(const KrunApi& api, uint32_t ctx, const std::string& path, KrunFailure* f) {
  return Check("krun_set_root", api.set_root(ctx, path.c_str()), f);
}

bool KrunAddVirtiofs(const KrunApi& api, uint32_t ctx, const VirtiofsMount& m, KrunFailure* f) {
  if (api.add_virtiofs3 != nullptr) {
    return Check("krun_add_virtiofs3", api.add_virtiofs3(ctx, m.tag.c_str(), m.path.c_str(), 0, m.read_only), f);
  }
  // Older libkrun: only the read-write call exists; a read-only mount cannot be honoured.
  if (m.read_only || api.add_virtiofs == nullptr) return Missing("krun_add_virtiofs3", f);
  return Check("krun_add_virtiofs", api.add_virtiofs(ctx, m.tag.c_str(), m.path.c_str()), f);
}

bool KrunAddNet(const KrunApi& api, uint32_t ctx, const NetDevice& n, KrunFailure* f) {
  uint8_t mac[6];
  for (int i = 0; i < 6; i++) mac[i] = n.mac[i];
  const char* path = n.fd >= 0 ? nullptr : n.path.c_str();
  if (n.kind == NetKind::kUnixStream) {
    if (api.add_net_unixstream == nullptr) return Missing("krun_add_net_unixstream", f);
    return Check("krun_add_net_unixstream", api.add_net_unixstream(ctx, path, n.fd, mac, n.features, n.flags), f);
  }
  if (api.add_net_unixgram == nullptr) return Missing("krun_add_net_unixgram", f);
  return Check("krun_add_net_unixgram", api.add_net_unixgram(ctx, path, n.fd, mac, n.features, n.flags), f);
}

bool KrunSetPortMap(const KrunApi& api, uint32_t ctx, const PortMap& map, KrunFailure* f) {
  // "All listening guest ports" is libkrun's default when krun_set_port_map is never called. The
  // header's NULL for it crashes 1.19.0 (it dereferences the array unchecked): never pass NULL.
  if (map.kind == PortMapKind::kAll) return true;
  if (api.set_port_map == nullptr) return Missing("krun_set_port_map", f);
  static const std::vector<std::string> kNone;
  CStringArray arr(map.kind == PortMapKind::kNone ? kNone : map.entries);
  return Check("krun_set_port_map", api.set_port_map(ctx, arr.get()), f);
}

bool KrunSetExec(const KrunApi& api, uint32_t ctx, const ExecSpec& e, KrunFailure* f) {
  if (api.set_exec == nullptr) return Missing("krun_set_exec", f);
  CStringArray args(e.args);
  CStringArray env(e.env);
  return Check("krun_set_exec", api.set_exec(ctx, e.path.c_str(), args.get(), e.has_env ? env.get() : nullptr), f);
}

bool KrunSetEnv(const KrunApi& api, uint32_t ctx, const std::vector<std::string>& env, KrunFailure* f) {
  if (api.set_env == nullptr) return Missing("krun_set_env", f);
  CStringArray arr(env);
  return Check("krun_set_env", api.set_env(ctx, arr.get()), f);
}

bool KrunSetWorkdir(const KrunApi& api, uint32_t ctx, const std::string& path, KrunFailure* f) {
  if (api.set_workdir == nullptr) return Missing("krun_set_workdir", f);
  return Check("krun_set_workdir", api.set_workdir(ctx, path.c_str()), f);
}

bool KrunSetRlimits(const KrunApi& api, uint32_t ctx, const std::vector<std::string>& rlimits, KrunFailure* f) {
  if (api.set_rlimits == nullptr) return Missing("krun_set_rlimits", f);
  CStringArray arr(rlimits);
  return Check("krun_set_rlimits", api.set_rlimits(ctx, arr.get()), f);
}

bool KrunSetConsoleOutput(const KrunApi& api, uint32_t ctx, const std::string& path, KrunFailure* f) {
  if (api.set_console_output == nullptr) return Missing("krun_set_console_output", f);
  return Check("krun_set_console_output", api.set_console_output(ctx, path.c_str()), f);
}

bool KrunAddVsockPort(const KrunApi& api, uint32_t ctx, const VsockPort& p, KrunFailure* f) {
  if (p.has_listen) {
    if (api.add_vsock_port2 == nullptr) return Missing("krun_add_vsock_port2", f);
    return Check("krun_add_vsock_port2", api.add_vsock_port2(ctx, p.port, p.path.c_str(), p.listen), f);
  }
  if (api.add_vsock_port == nullptr) return Missing("krun_add_vsock_port", f);
  return Check("krun_add_vsock_port", api.add_vsock_port(ctx, p.port, p.path.c_str()), f);
}

bool KrunHasFeature(const KrunApi& api, uint64_t feature, bool* present, KrunFailure* f) {
  if (api.has_feature == nullptr) return Missing("krun_has_feature", f);
  int32_t rc = api.has_feature(feature);
  if (!Check("krun_has_feature", rc, f)) return false;
  *present = rc == 1;
  return true;
}

// ---- the plan --------------------------------------------------------------------------------

bool ParsePlan(const JsonValue& j, LaunchPlan* p, std::string* error) {
  *p = LaunchPlan();
  if (!OnlyKeys(j, "",
                {"version", "libkrunPath", "firmwarePath", "logLevel", "vm", "root", "virtiofs", "net", "portMap",
                 "exec", "env", "workdir", "rlimits", "consoleOutput", "vsockPorts", "overlay"},
                error)) {
    return false;
  }
  uint64_t u = 0;
  const JsonValue* v = j.Get("version");
  if (v == nullptr) return Fail(error, "version", "missing");
  if (!ReadUint(*v, "version", 1000, &u, error)) return false;
  if (u != 1) return Fail(error, "version", "unsupported plan version (this runner reads 1)");

  if ((v = j.Get("libkrunPath")) == nullptr) return Fail(error, "libkrunPath", "missing");
  if (!ReadString(*v, "libkrunPath", &p->libkrun_path, error)) return false;
  if ((v = j.Get("firmwarePath")) && !ReadString(*v, "firmwarePath", &p->firmware_path, error)) {
    return false;
  }
  if ((v = j.Get("logLevel"))) {
    if (!ReadUint(*v, "logLevel", 5, &u, error)) return false;
    p->log_level = static_cast<int>(u);
  }

  if ((v = j.Get("vm")) == nullptr) return Fail(error, "vm", "missing");
  if (!OnlyKeys(*v, "vm", {"cpus", "memoryMiB"}, error)) return false;
  const JsonValue* c = v->Get("cpus");
  if (c == nullptr) return Fail(error, "vm.cpus", "missing");
  if (!ReadUint(*c, "vm.cpus", 255, &u, error)) return false;
  p->cpus = static_cast<uint8_t>(u);
  if ((c = v->Get("memoryMiB")) == nullptr) return Fail(error, "vm.memoryMiB", "missing");
  if (!ReadUint(*c, "vm.memoryMiB", 4294967295.0, &u, error)) return false;
  p->memory_mib = static_cast<uint32_t>(u);

  if ((v = j.Get("root")) == nullptr) return Fail(error, "root", "missing");
  if (!ReadString(*v, "root", &p->root, error)) return false;

  if ((v = j.Get("overlay"))) {
    if (!OnlyKeys(*v, "overlay", {"lower", "upper", "work", "merged"}, error)) return false;
    p->has_overlay = true;
    const char* keys[] = {"lower", "upper", "work", "merged"};
    std::string* slots[] = {&p->overlay.lower, &p->overlay.upper, &p->overlay.work, &p->overlay.merged};
    for (int i = 0; i < 4; i++) {
      const JsonValue* x = v->Get(keys[i]);
      std::string where = std::string("overlay.") + keys[i];
      if (x == nullptr) return Fail(error, where, "missing");
      if (!ReadString(*x, where, slots[i], error)) return false;
      // Overlay options are comma-separated: these characters would change their meaning.
      if (slots[i]->find_first_of(",:\\") != std::string::npos || slots[i]->empty() || (*slots[i])[0] != '/') {
        return Fail(error, where, "must be an absolute path without ',', ':' or '\\'");
      }
    }
  }

  if ((v = j.Get("virtiofs"))) {
    if (!v->is_array()) return Fail(error, "virtiofs", "expected an array");
    size_t i = 0;
    for (const auto& item : v->array_items()) {
      std::string where = "virtiofs[" + std::to_string(i++) + "]";
      if (!OnlyKeys(item, where, {"tag", "path", "readOnly"}, error)) return false;
      VirtiofsMount m;
      const JsonValue* x;
      if ((x = item.Get("tag")) == nullptr) return Fail(error, where + ".tag", "missing");
      if (!ReadString(*x, where + ".tag", &m.tag, error)) return false;
      if ((x = item.Get("path")) == nullptr) return Fail(error, where + ".path", "missing");
      if (!ReadString(*x, where + ".path", &m.path, error)) return false;
      if ((x = item.Get("readOnly")) && !ReadBool(*x, where + ".readOnly", &m.read_only, error)) {
        return false;
      }
      p->virtiofs.push_back(std::move(m));
    }
  }

  if ((v = j.Get("net"))) {
    if (!v->is_array()) return Fail(error, "net", "expected an array");
    size_t i = 0;
    for (const auto& item : v->array_items()) {
      std::string where = "net[" + std::to_string(i++) + "]";
      if (!OnlyKeys(item, where, {"kind", "path", "fd", "mac", "features", "flags"}, error)) {
        return false;
      }
      NetDevice n;
      const JsonValue* x;
      std::string s;
      if ((x = item.Get("kind")) == nullptr) return Fail(error, where + ".kind", "missing");
      if (!ReadString(*x, where + ".kind", &s, error)) return false;
      if (s == "unixstream")
        n.kind = NetKind::kUnixStream;
      else if (s == "unixgram")
        n.kind = NetKind::kUnixGram;
      else
        return Fail(error, where + ".kind", "expected \"unixstream\" or \"unixgram\"");
      const JsonValue* path = item.Get("path");
      const JsonValue* fd = item.Get("fd");
      if ((path == nullptr) == (fd == nullptr)) {
        return Fail(error, where, "exactly one of path and fd is required");
      }
      if (path && !ReadString(*path, where + ".path", &n.path, error)) return false;
      if (fd) {
        if (!ReadUint(*fd, where + ".fd", 2147483647.0, &u, error)) return false;
        n.fd = static_cast<int>(u);
      }
      if ((x = item.Get("mac")) == nullptr) return Fail(error, where + ".mac", "missing");
      if (!ReadString(*x, where + ".mac", &s, error)) return false;
      if (!ParseMac(s, n.mac)) return Fail(error, where + ".mac", "expected xx:xx:xx:xx:xx:xx");
      if ((x = item.Get("features"))) {
        if (!ReadUint(*x, where + ".features", 4294967295.0, &u, error)) return false;
        n.features = static_cast<uint32_t>(u);
      }
      if ((x = item.Get("flags"))) {
        if (!ReadUint(*x, where + ".flags", 4294967295.0, &u, error)) return false;
        n.flags = static_cast<uint32_t>(u);
      }
      p->net.push_back(std::move(n));
    }
  }

  if ((v = j.Get("portMap"))) {
    p->has_port_map = true;
    if (v->is_string() && v->string_value() == "all") {
      p->port_map.kind = PortMapKind::kAll;
    } else if (v->is_string() && v->string_value() == "none") {
      p->port_map.kind = PortMapKind::kNone;
    } else {
      p->port_map.kind = PortMapKind::kList;
      if (!ReadStrings(*v, "portMap", &p->port_map.entries, error)) return false;
    }
  }

  if ((v = j.Get("exec"))) {
    if (!OnlyKeys(*v, "exec", {"path", "args", "env"}, error)) return false;
    p->has_exec = true;
    const JsonValue* x;
    if ((x = v->Get("path")) == nullptr) return Fail(error, "exec.path", "missing");
    if (!ReadString(*x, "exec.path", &p->exec.path, error)) return false;
    if ((x = v->Get("args")) && !ReadStrings(*x, "exec.args", &p->exec.args, error)) return false;
    if ((x = v->Get("env")) && !x->is_null()) {
      p->exec.has_env = true;
      if (!ReadStrings(*x, "exec.env", &p->exec.env, error)) return false;
    }
  }
  if ((v = j.Get("env"))) {
    p->has_env = true;
    if (!ReadStrings(*v, "env", &p->env, error)) return false;
  }
  if ((v = j.Get("workdir")) && !ReadString(*v, "workdir", &p->workdir, error)) return false;
  if ((v = j.Get("rlimits"))) {
    p->has_rlimits = true;
    if (!ReadStrings(*v, "rlimits", &p->rlimits, error)) return false;
    // libkrun's guest init parses the resource with strtoull: it must be a number.
    for (const auto& r : p->rlimits) {
      size_t eq = r.find('=');
      size_t colon = r.find(':');
      auto digits = [&](size_t from, size_t to) {
        if (to <= from || to - from > 20) return false;
        for (size_t i = from; i < to; i++) {
          if (r[i] < '0' || r[i] > '9') return false;
        }
        return true;
      };
      if (eq == std::string::npos || colon == std::string::npos || colon < eq || !digits(0, eq) ||
          !digits(eq + 1, colon) || !digits(colon + 1, r.size())) {
        *error = "rlimits: expected \"ID=SOFT:HARD\" with a numeric resource ID, got \"" + r + "\"";
        return false;
      }
    }
  }
  if ((v = j.Get("consoleOutput")) && !ReadString(*v, "consoleOutput", &p->console_output, error)) {
    return false;
  }
  if ((v = j.Get("vsockPorts"))) {
    if (!v->is_array()) return Fail(error, "vsockPorts", "expected an array");
    size_t i = 0;
    for (const auto& item : v->array_items()) {
      std::string where = "vsockPorts[" + std::to_string(i++) + "]";
      if (!OnlyKeys(item, where, {"port", "path", "listen"}, error)) return false;
      VsockPort vp;
      const JsonValue* x;
      if ((x = item.Get("port")) == nullptr) return Fail(error, where + ".port", "missing");
      if (!ReadUint(*x, where + ".port", 4294967295.0, &u, error)) return false;
      vp.port = static_cast<uint32_t>(u);
      if ((x = item.Get("path")) == nullptr) return Fail(error, where + ".path", "missing");
      if (!ReadString(*x, where + ".path", &vp.path, error)) return false;
      if ((x = item.Get("listen"))) {
        vp.has_listen = true;
        if (!ReadBool(*x, where + ".listen", &vp.listen, error)) return false;
      }
      p->vsock_ports.push_back(std::move(vp));
    }
  }
  return true;
}

bool ParsePlanText(const std::string& text, LaunchPlan* plan, std::string* error) {
  JsonValue json;
  if (!JsonValue::Parse(text, &json, error)) return false;
  return ParsePlan(json, plan, error);
}

bool ApplyPlan(const KrunApi& api, uint32_t ctx, const LaunchPlan& p, KrunFailure* f, bool apply_log_level) {
  if (apply_log_level && p.log_level >= 0 && !KrunSetLogLevel(api, static_cast<uint32_t>(p.log_level), f)) {
    return false;
  }
  if (!KrunSetVmConfig(api, ctx, p.cpus, p.memory_mib, f)) return false;
  if (!KrunSetRoot(api, ctx, p.root, f)) return false;
  for (const auto& m : p.virtiofs) {
    if (!KrunAddVirtiofs(api, ctx, m, f)) return false;
  }
  // libkrun wants virtio-net devices added before the port map (which they make -ENOTSUP).
  for (const auto& n : p.net) {
    if (!KrunAddNet(api, ctx, n, f)) return false;
  }
  if (p.has_port_map && !KrunSetPortMap(api, ctx, p.port_map, f)) return false;
  if (p.has_exec && !KrunSetExec(api, ctx, p.exec, f)) return false;
  if (p.has_env && !KrunSetEnv(api, ctx, p.env, f)) return false;
  if (!p.workdir.empty() && !KrunSetWorkdir(api, ctx, p.workdir, f)) return false;
  if (p.has_rlimits && !KrunSetRlimits(api, ctx, p.rlimits, f)) return false;
  if (!p.console_output.empty() && !KrunSetConsoleOutput(api, ctx, p.console_output, f)) {
    return false;
  }
  for (const auto& vp : p.vsock_ports) {
    if (!KrunAddVsockPort(api, ctx, vp, f)) return false;
  }
  return true;
}

}  // namespace microvm
