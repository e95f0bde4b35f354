// zstd decompression through libzstd.so.1, opened at run time: no build-time dependency, and an
// image without zstd layers never loads it. Only the stable streaming API is used
// (ZSTD_createDStream / ZSTD_decompressStream, zstd >= 1.0); its two buffer structs are part of
// that ABI and declared here as libzstd defines them.
#pragma once

#include <cstddef>

namespace microvm {

struct ZstdInBuffer {
  const void* src;
  size_t size;
  size_t pos;
};

struct ZstdOutBuffer {
  void* dst;
  size_t size;
  size_t pos;
};

struct ZstdApi {
  void* (*create_dstream)();
  size_t (*free_dstream)(void*);
  size_t (*decompress_stream)(void*, ZstdOutBuffer*, ZstdInBuffer*);
  unsigned (*is_error)(size_t);
  const char* (*error_name)(size_t);
};

// The loaded library, or null when libzstd.so.1 (or one of its symbols) is missing. Loaded once.
const ZstdApi* Zstd();

}  // namespace microvm
