// microvm-runner: a small native executable (no Node inside) that owns one libkrun VM.
//
//   microvm-runner (--plan PATH | --plan-fd N) [--ready-fd N] [--die-with-parent]
//   microvm-runner --qemu-plan-fd N | --relay-connect ... | --log-sink ... | --listen-unix ...
//       the QEMU backend's modes: see qemu_launch.h.
//
// It reads a launch plan (JSON, see plan.h), preloads libkrunfw from the plan's firmwarePath,
// dlopens libkrun from the plan's libkrunPath, creates a context, applies the plan with the same
// ApplyPlan() the addon uses, writes one byte 'C' ("configured") to --ready-fd and closes it, and
// then calls krun_start_enter(), which takes over this process and never returns on success: the
// VMM _exit()s with the guest's exit code.
//
// Failures before the VM starts are reported as ONE JSON line on stderr,
//   {"microvmRunnerError":{"stage":"...","code":"...","message":"...","errno":-22,"syscall":"..."}}
// and one of these exit codes (lib/backends/libkrun/runner.ts maps them to coded errors):
//   64 usage error          65 plan is not valid          66 plan cannot be read
//   69 libkrun/libkrunfw cannot be loaded                 70 a krun_* configuration call failed
//   71 krun_start_enter returned (the VM did not start)
//   72 the overlay root could not be mounted (plan.overlay)
// Once 'C' was written, the exit status is the guest's (or 71 with the JSON line).
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common/errno_names.h"
#include "common/json.h"
#include "common/krun_api.h"
#include "common/plan.h"
#include "runner/qemu_launch.h"

namespace {

using microvm::ErrnoName;
using microvm::JsonQuote;
using microvm::KrunFailure;

constexpr int kExitUsage = 64;
constexpr int kExitPlanInvalid = 65;
constexpr int kExitPlanUnreadable = 66;
constexpr int kExitUnavailable = 69;
constexpr int kExitConfigure = 70;
constexpr int kExitStart = 71;
constexpr int kExitMount = 72;
constexpr size_t kMaxPlanBytes = 1 << 20;

[[noreturn]] void Die(int status, const char* stage, const std::string& code, const std::string& message,
                      const KrunFailure* failure = nullptr) {
  std::string line = "{\"microvmRunnerError\":{\"stage\":";
  JsonQuote(stage, &line);
  line += ",\"code\":";
  JsonQuote(code, &line);
  line += ",\"message\":";
  JsonQuote(message, &line);
  if (failure != nullptr) {
    line += ",\"errno\":" + std::to_string(failure->rc) + ",\"syscall\":";
    JsonQuote(failure->syscall, &line);
  }
  line += "}}\n";
  ssize_t ignored = write(STDERR_FILENO, line.data(), line.size());
  (void)ignored;
  _exit(status);
}

[[noreturn]] void DieKrun(int status, const char* stage, const KrunFailure& f) {
  int err = -f.rc;
  std::string message = f.syscall + " failed: " + ErrnoName(err) + " (" + std::strerror(err) + ")";
  if (!f.detail.empty()) message += ": " + f.detail;
  Die(status, stage, ErrnoName(err), message, &f);
}

bool ParseFd(const char* text, int* fd) {
  char* end = nullptr;
  errno = 0;
  long v = std::strtol(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || v < 0 || v > 1 << 20) return false;
  *fd = static_cast<int>(v);
  return true;
}

bool ReadAll(int fd, std::string* out, std::string* error) {
  char buf[65536];
  while (true) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      *error = std::strerror(errno);
      return false;
    }
    if (n == 0) return true;
    out->append(buf, static_cast<size_t>(n));
    if (out->size() > kMaxPlanBytes) {
      *error = "plan larger than 1 MiB";
      return false;
    }
  }
}

bool WriteFile(const char* path, const std::string& text) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  close(fd);
  return ok;
}

// Mounts plan.overlay in a private mount namespace. Unprivileged: also a new user namespace that
// maps our uid/gid to 0, so files we own look root-owned to the guest (as in a container).
void MountOverlay(const microvm::OverlaySpec& o) {
  uid_t uid = geteuid();
  gid_t gid = getegid();
  int flags = CLONE_NEWNS | (uid == 0 ? 0 : CLONE_NEWUSER);
  if (unshare(flags) != 0) {
    Die(kExitMount, "mount", ErrnoName(errno),
        std::string("unshare(") + (uid == 0 ? "CLONE_NEWNS" : "CLONE_NEWUSER|CLONE_NEWNS") +
            ") failed: " + std::strerror(errno) +
            (uid == 0 ? "" : "; are unprivileged user namespaces disabled (kernel.unprivileged_userns_clone)?"));
  }
  if (uid != 0) {
    WriteFile("/proc/self/setgroups", "deny");
    if (!WriteFile("/proc/self/uid_map", "0 " + std::to_string(uid) + " 1\n") ||
        !WriteFile("/proc/self/gid_map", "0 " + std::to_string(gid) + " 1\n")) {
      Die(kExitMount, "mount", ErrnoName(errno),
          std::string("writing the user namespace id maps failed: ") + std::strerror(errno));
    }
  }
  // Keep our mounts out of the parent namespace.
  if (mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    Die(kExitMount, "mount", ErrnoName(errno), std::string("making / private failed: ") + std::strerror(errno));
  }
  std::string data = "lowerdir=" + o.lower + ",upperdir=" + o.upper + ",workdir=" + o.work;
  if (uid != 0) data += ",userxattr";
  if (mount("overlay", o.merged.c_str(), "overlay", 0, data.c_str()) != 0) {
    int err = errno;
    // Older kernels (< 5.11) lack userxattr; try once without it.
    if (uid != 0 && err == EINVAL) {
      data = "lowerdir=" + o.lower + ",upperdir=" + o.upper + ",workdir=" + o.work;
      if (mount("overlay", o.merged.c_str(), "overlay", 0, data.c_str()) == 0) return;
      err = errno;
    }
    Die(kExitMount, "mount", ErrnoName(err),
        "mounting the overlay root on " + o.merged + " failed: " + std::strerror(err));
  }
}

}  // namespace

int main(int argc, char** argv) {
  // The QEMU backend's modes (native/runner/qemu_launch.cc).
  if (argc == 4 && std::strcmp(argv[1], "--relay-connect") == 0) return microvm::RelayConnect(argv[2], argv[3]);
  if (argc >= 2 && std::strcmp(argv[1], "--log-sink") == 0) return microvm::LogSink(argc, argv);
  if (argc >= 5 && std::strcmp(argv[1], "--listen-unix") == 0 && std::strcmp(argv[3], "--") == 0)
    return microvm::ListenExec(argv[2], argv + 4);
  if (argc >= 3 && std::strcmp(argv[1], "--qemu-plan-fd") == 0) {
    int fd = -1;
    if (!ParseFd(argv[2], &fd)) Die(kExitUsage, "usage", "ERR_MICROVM_RUNNER_USAGE", "bad --qemu-plan-fd");
    return microvm::QemuLaunch(fd, argc >= 4 && std::strcmp(argv[3], "--die-with-parent") == 0);
  }
  std::string plan_path;
  int plan_fd = -1;
  int ready_fd = -1;
  bool die_with_parent = false;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--plan" && i + 1 < argc) {
      plan_path = argv[++i];
    } else if (a == "--plan-fd" && i + 1 < argc) {
      if (!ParseFd(argv[++i], &plan_fd)) Die(kExitUsage, "usage", "ERR_MICROVM_RUNNER_USAGE", "bad --plan-fd");
    } else if (a == "--ready-fd" && i + 1 < argc) {
      if (!ParseFd(argv[++i], &ready_fd)) Die(kExitUsage, "usage", "ERR_MICROVM_RUNNER_USAGE", "bad --ready-fd");
    } else if (a == "--die-with-parent") {
      die_with_parent = true;
    } else if (a == "--version") {
      std::printf("microvm-runner plan-version 1\n");
      return 0;
    } else {
      Die(kExitUsage, "usage", "ERR_MICROVM_RUNNER_USAGE",
          "usage: microvm-runner (--plan PATH | --plan-fd N) [--ready-fd N] [--die-with-parent]; "
          "unexpected argument: " +
              a);
    }
  }
  if (plan_path.empty() == (plan_fd < 0)) {
    Die(kExitUsage, "usage", "ERR_MICROVM_RUNNER_USAGE", "exactly one of --plan and --plan-fd is required");
  }
  if (die_with_parent) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1) _exit(kExitUsage);  // the parent is already gone
  }
  if (ready_fd >= 0) fcntl(ready_fd, F_SETFD, FD_CLOEXEC);

  // 1. Read the plan.
  std::string text, error;
  int fd = plan_fd;
  if (!plan_path.empty()) {
    fd = open(plan_path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      Die(kExitPlanUnreadable, "plan", "ERR_MICROVM_PLAN_UNREADABLE",
          "cannot open plan " + plan_path + ": " + std::strerror(errno));
    }
  }
  if (!ReadAll(fd, &text, &error)) {
    Die(kExitPlanUnreadable, "plan", "ERR_MICROVM_PLAN_UNREADABLE", "cannot read plan: " + error);
  }
  close(fd);

  // 2. Parse it.
  microvm::LaunchPlan plan;
  if (!microvm::ParsePlanText(text, &plan, &error)) {
    Die(kExitPlanInvalid, "plan", "ERR_MICROVM_PLAN_INVALID", error);
  }

  // 3. The root: an overlay of the shared image (read-only lower) and this VM's layer.
  if (plan.has_overlay) MountOverlay(plan.overlay);

  // 4. Firmware first, so libkrun's dlopen("libkrunfw.so.5") finds this copy by soname.
  if (!plan.firmware_path.empty() && !microvm::PreloadFirmware(plan.firmware_path, &error)) {
    Die(kExitUnavailable, "load", "ERR_MICROVM_LIBKRUNFW_LOAD", error);
  }
  const microvm::KrunApi* api = microvm::LoadKrunApi(plan.libkrun_path, &error);
  if (api == nullptr) Die(kExitUnavailable, "load", "ERR_MICROVM_LIBKRUN_LOAD", error);

  // 5. Create and configure.
  KrunFailure failure;
  uint32_t ctx = 0;
  if (!microvm::KrunCreateCtx(*api, &ctx, &failure)) DieKrun(kExitConfigure, "configure", failure);
  if (!microvm::ApplyPlan(*api, ctx, plan, &failure, /*apply_log_level=*/true))
    DieKrun(kExitConfigure, "configure", failure);

  // 6. Tell the parent, then hand the process to libkrun.
  if (ready_fd >= 0) {
    const char c = 'C';
    ssize_t n;
    do {
      n = write(ready_fd, &c, 1);
    } while (n < 0 && errno == EINTR);
    close(ready_fd);
  }
  int32_t rc = api->start_enter(ctx);
  failure.syscall = "krun_start_enter";
  failure.rc = rc < 0 ? rc : -EIO;
  failure.detail.clear();
  DieKrun(kExitStart, "start", failure);
}
