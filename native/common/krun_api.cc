#include "common/krun_api.h"

#include <dlfcn.h>
#include <link.h>

#include <map>
#include <memory>
#include <mutex>

namespace microvm {

namespace {

std::mutex g_mutex;
std::map<std::string, std::unique_ptr<KrunApi>>& Loaded() {
  static auto* loaded = new std::map<std::string, std::unique_ptr<KrunApi>>();
  return *loaded;
}

template <typename Fn>
void Optional(void* handle, const char* name, Fn* slot) {
  *slot = reinterpret_cast<Fn>(dlsym(handle, name));
}

template <typename Fn>
bool Required(void* handle, const char* name, Fn* slot, std::string* missing) {
  *slot = reinterpret_cast<Fn>(dlsym(handle, name));
  if (*slot == nullptr && missing->empty()) *missing = name;
  return *slot != nullptr;
}

}  // namespace

const KrunApi* LoadKrunApi(const std::string& path, std::string* error) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = Loaded().find(path);
  if (it != Loaded().end()) return it->second.get();

  dlerror();
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    *error = why != nullptr ? why : "dlopen failed";
    return nullptr;
  }

  auto api = std::make_unique<KrunApi>();
  api->path = path;
  api->handle = handle;
  api->resolved = path;
  struct link_map* map = nullptr;
  if (dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 && map != nullptr && map->l_name != nullptr &&
      map->l_name[0] != '\0') {
    api->resolved = map->l_name;
  }
  std::string missing;
  Required(handle, "krun_set_log_level", &api->set_log_level, &missing);
  Required(handle, "krun_create_ctx", &api->create_ctx, &missing);
  Required(handle, "krun_free_ctx", &api->free_ctx, &missing);
  Required(handle, "krun_set_vm_config", &api->set_vm_config, &missing);
  Required(handle, "krun_set_root", &api->set_root, &missing);
  Required(handle, "krun_start_enter", &api->start_enter, &missing);
  if (!missing.empty()) {
    *error = path + " does not export " + missing + "; is it libkrun 1.x?";
    dlclose(handle);
    return nullptr;
  }
  Optional(handle, "krun_has_feature", &api->has_feature);
  Optional(handle, "krun_get_max_vcpus", &api->get_max_vcpus);
  Optional(handle, "krun_add_virtiofs", &api->add_virtiofs);
  Optional(handle, "krun_add_virtiofs3", &api->add_virtiofs3);
  Optional(handle, "krun_set_port_map", &api->set_port_map);
  Optional(handle, "krun_set_exec", &api->set_exec);
  Optional(handle, "krun_set_env", &api->set_env);
  Optional(handle, "krun_set_workdir", &api->set_workdir);
  Optional(handle, "krun_set_rlimits", &api->set_rlimits);
  Optional(handle, "krun_set_console_output", &api->set_console_output);
  Optional(handle, "krun_add_net_unixstream", &api->add_net_unixstream);
  Optional(handle, "krun_add_net_unixgram", &api->add_net_unixgram);
  Optional(handle, "krun_add_vsock_port", &api->add_vsock_port);
  Optional(handle, "krun_add_vsock_port2", &api->add_vsock_port2);

  const KrunApi* result = api.get();
  Loaded()[path] = std::move(api);
  return result;
}

bool PreloadFirmware(const std::string& path, std::string* error) {
  dlerror();
  // Deliberately never closed: libkrun keeps pointers into the firmware image.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    *error = why != nullptr ? why : "dlopen failed";
    return false;
  }
  return true;
}

}  // namespace microvm
