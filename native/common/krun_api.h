// libkrun loaded at run time. Nothing in this project links against libkrun: the library is
// dlopen()ed from the path runtime resolution chose, and every symbol is resolved on its own.
// Required symbols missing => the load fails; optional ones stay null and calls through them
// fail with -ENOTSUP (see KrunFailure::missing_symbol).
#pragma once

#include <sys/types.h>
#include <cstdint>
#include <string>

namespace microvm {

struct KrunApi {
  std::string path;      // as given to dlopen
  std::string resolved;  // the file the loader opened (differs for a bare soname)
  void* handle = nullptr;

  // Required (libkrun 1.x core).
  int32_t (*set_log_level)(uint32_t) = nullptr;
  int32_t (*create_ctx)() = nullptr;
  int32_t (*free_ctx)(uint32_t) = nullptr;
  int32_t (*set_vm_config)(uint32_t, uint8_t, uint32_t) = nullptr;
  int32_t (*set_root)(uint32_t, const char*) = nullptr;
  int32_t (*start_enter)(uint32_t) = nullptr;

  // Optional: present depending on the libkrun version and build features.
  int32_t (*has_feature)(uint64_t) = nullptr;
  int32_t (*get_max_vcpus)() = nullptr;
  int32_t (*add_virtiofs)(uint32_t, const char*, const char*) = nullptr;
  int32_t (*add_virtiofs3)(uint32_t, const char*, const char*, uint64_t, bool) = nullptr;
  int32_t (*set_port_map)(uint32_t, const char* const*) = nullptr;
  int32_t (*set_exec)(uint32_t, const char*, const char* const*, const char* const*) = nullptr;
  int32_t (*set_env)(uint32_t, const char* const*) = nullptr;
  int32_t (*set_workdir)(uint32_t, const char*) = nullptr;
  int32_t (*set_rlimits)(uint32_t, const char* const*) = nullptr;
  int32_t (*set_console_output)(uint32_t, const char*) = nullptr;
  int32_t (*add_net_unixstream)(uint32_t, const char*, int, uint8_t*, uint32_t, uint32_t) = nullptr;
  int32_t (*add_net_unixgram)(uint32_t, const char*, int, uint8_t*, uint32_t, uint32_t) = nullptr;
  int32_t (*add_vsock_port)(uint32_t, uint32_t, const char*) = nullptr;
  int32_t (*add_vsock_port2)(uint32_t, uint32_t, const char*, bool) = nullptr;
};

// Loads (once per path, process-wide, thread-safe) and returns the API table, or nullptr with
// `error` set (dlerror text, or the missing required symbol). Loaded libraries are never
// unloaded: libkrun starts threads and registers process state that outlive a context.
const KrunApi* LoadKrunApi(const std::string& path, std::string* error);

// Loads libkrunfw by path into the global namespace so that libkrun's own
// dlopen("libkrunfw.so.5") (done in krun_create_ctx) finds this copy by its soname instead of
// searching the loader path. Returns false with `error` on failure. Process-wide, idempotent.
bool PreloadFirmware(const std::string& path, std::string* error);

}  // namespace microvm
