#include "addon/firmware.h"

#include <dlfcn.h>
#include <link.h>

#include <cstring>

namespace microvm {

namespace {
using GetKernelFn = char* (*)(size_t* load_addr, size_t* entry_addr, size_t* size);
using GetVersionFn = int (*)();
}  // namespace

bool ProbeFirmware(const std::string& candidate, FirmwareInfo* info, std::vector<uint8_t>* kernel, std::string* error) {
  dlerror();
  void* handle = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    *error = why != nullptr ? why : "dlopen failed";
    return false;
  }
  bool ok = false;
  auto get_version = reinterpret_cast<GetVersionFn>(dlsym(handle, "krunfw_get_version"));
  auto get_kernel = reinterpret_cast<GetKernelFn>(dlsym(handle, "krunfw_get_kernel"));
  struct link_map* map = nullptr;
  if (get_version == nullptr || get_kernel == nullptr) {
    *error = candidate + " does not export krunfw_get_version and krunfw_get_kernel";
  } else {
    info->path = candidate;
    if (dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 && map != nullptr && map->l_name != nullptr &&
        map->l_name[0] != '\0') {
      info->path = map->l_name;
    }
    info->abi_version = get_version();
    size_t load = 0, entry = 0, size = 0;
    char* image = get_kernel(&load, &entry, &size);
    info->kernel_size = size;
    info->load_address = load;
    info->entry_address = entry;
    if (image == nullptr || size == 0) {
      *error = candidate + ": krunfw_get_kernel returned no kernel";
    } else {
      if (kernel != nullptr) kernel->assign(image, image + size);
      ok = true;
    }
  }
  dlclose(handle);
  return ok;
}

}  // namespace microvm
