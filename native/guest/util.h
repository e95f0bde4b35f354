// Helpers shared by microvm-guest-init and its agent (both run inside the guest).
#pragma once

#include <dirent.h>
#include <time.h>

#include <cstdio>
#include <cstring>
#include <string>

namespace microvm {

// The /dev/vportNpM whose /sys/class/virtio-ports/<port>/name is `want` ("" when absent).
inline std::string FindPort(const char* want) {
  DIR* d = opendir("/sys/class/virtio-ports");
  if (d == nullptr) return "";
  std::string found;
  while (struct dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::string name_file = std::string("/sys/class/virtio-ports/") + e->d_name + "/name";
    FILE* f = std::fopen(name_file.c_str(), "re");
    if (f == nullptr) continue;
    char buf[64] = {0};
    if (std::fgets(buf, sizeof buf, f) != nullptr) {
      buf[std::strcspn(buf, "\n")] = '\0';
      if (std::strcmp(buf, want) == 0) found = std::string("/dev/") + e->d_name;
    }
    std::fclose(f);
  }
  closedir(d);
  return found;
}

// Nanoseconds on CLOCK_MONOTONIC.
long long MonotonicNs();

// FindPort, waiting up to `timeout_ms` for the port to appear: the guest's virtio-console driver
// adds ports from a work queue as the host announces them, so early in boot one may not be there
// yet (under load, the last ones often are not).
inline std::string WaitForPort(const char* want, int timeout_ms) {
  const long long deadline = MonotonicNs() + static_cast<long long>(timeout_ms) * 1000000LL;
  for (;;) {
    std::string found = FindPort(want);
    if (!found.empty() || MonotonicNs() >= deadline) return found;
    struct timespec pause = {0, 5 * 1000 * 1000};
    nanosleep(&pause, nullptr);
  }
}

// Nanoseconds on CLOCK_MONOTONIC.
inline long long MonotonicNs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

}  // namespace microvm
