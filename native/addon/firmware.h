// libkrunfw probing: dlopen a candidate, ask it for its ABI version and kernel geometry.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace microvm {

struct FirmwareInfo {
  std::string path;  // the file the loader actually opened
  int abi_version = 0;
  size_t kernel_size = 0;
  size_t load_address = 0;
  size_t entry_address = 0;
};

// `candidate` is an absolute path, or a bare soname for the loader's own search. The library is
// opened RTLD_LOCAL and closed again. If `kernel` is non-null the raw kernel image is copied
// into it. Returns false with `error` (dlerror text or the missing symbol) on failure.
bool ProbeFirmware(const std::string& candidate, FirmwareInfo* info, std::vector<uint8_t>* kernel, std::string* error);

}  // namespace microvm
