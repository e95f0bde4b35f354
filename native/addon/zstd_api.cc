#include "addon/zstd_api.h"

#include <dlfcn.h>

#include <mutex>

namespace microvm {

namespace {

template <typename T>
bool Bind(void* lib, const char* name, T* fn) {
  *fn = reinterpret_cast<T>(dlsym(lib, name));
  return *fn != nullptr;
}

}  // namespace

const ZstdApi* Zstd() {
  static std::once_flag once;
  static ZstdApi api;
  static bool ok = false;
  std::call_once(once, [] {
    void* lib = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) return;
    ok = Bind(lib, "ZSTD_createDStream", &api.create_dstream) && Bind(lib, "ZSTD_freeDStream", &api.free_dstream) &&
         Bind(lib, "ZSTD_decompressStream", &api.decompress_stream) && Bind(lib, "ZSTD_isError", &api.is_error) &&
         Bind(lib, "ZSTD_getErrorName", &api.error_name);
    if (!ok) dlclose(lib);  // kept open otherwise: the process may decompress again
  });
  return ok ? &api : nullptr;
}

}  // namespace microvm
