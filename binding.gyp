{
  # Five targets, one per folder's deployment (docs/native.md): the N-API addon, the runner
  # (libkrun's and QEMU's launcher), the two preload libraries, and the guest init. Sources and
  # hardening flags come from the lists native/*.sources and native/hardening.* that CMakeLists.txt
  # reads too; test/native-builds.test.ts builds both ways and compares. None links libkrun or libkrunfw.
  "target_defaults": {
    "cflags!": ["-fno-exceptions"],
    "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
    "cflags": ["-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter", "<!@(grep -v '^#' native/hardening.cflags)"],
    "cflags_cc": ["-std=c++17", "-fexceptions", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter", "<!@(grep -v '^#' native/hardening.cflags)"],
    "ldflags": ["<!@(grep -v '^#' native/hardening.ldflags)"],
    "include_dirs": ["native"],
    "libraries": ["-ldl"]
  },
  "targets": [
    {
      "target_name": "microvm",
      "sources": ["<!@(grep -v '^#' native/addon.sources)"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"]
    },
    {
      "target_name": "microvm-runner",
      "type": "executable",
      "sources": ["<!@(grep -v '^#' native/runner.sources)"],
      # The file-server guard (native/preload/fs_guard.cc, the only default-visibility symbols) is
      # exported (ld does so anyway for symbols libc also defines; -rdynamic says it) so libkrun,
      # loaded later, calls it instead of libc's.
      "ldflags": ["-pie", "-rdynamic"],
      # The egress filter (native/preload/net_guard.cc) is linked in too: libkrun's TSI makes the
      # guest's connections with the runner's connect()/sendto(). Without a policy it passes all through.
      "defines": ["MICROVM_NETGUARD_LINKED"],
      "cflags": ["-fPIE"],
      "cflags_cc": ["-fPIE"]
    },
    {
      # LD_PRELOADed into virtiofsd by the QEMU backend (see native/preload/fs_guard.cc).
      "target_name": "microvm-fsguard",
      "type": "shared_library",
      "product_prefix": "",
      "product_extension": "so",
      "sources": ["<!@(grep -v '^#' native/fsguard.sources)"]
    },
    {
      # LD_PRELOADed into QEMU when an egress policy needs it (see native/preload/net_guard.cc).
      "target_name": "microvm-netguard",
      "type": "shared_library",
      "product_prefix": "",
      "product_extension": "so",
      "sources": ["<!@(grep -v '^#' native/netguard.sources)"]
    },
    {
      # PID 1 of VMs booted by the QEMU backend: static, so it runs in any image.
      "target_name": "microvm-guest-init",
      "type": "executable",
      "sources": ["<!@(grep -v '^#' native/guest-init.sources)"],
      "ldflags": ["-static"],
      "libraries!": ["-ldl"]
    }
  ]
}
