{
  # Four targets from the source lists native/*.sources (shared with CMakeLists.txt): the N-API
  # addon, the runner executable, the file-server guard, and the QEMU backend's guest init. None links libkrun or libkrunfw.
  "target_defaults": {
    "cflags!": ["-fno-exceptions"],
    "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
    "cflags": ["-fvisibility=hidden", "-fstack-protector-strong", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    "cflags_cc": ["-std=c++17", "-fexceptions", "-fvisibility=hidden", "-fstack-protector-strong", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    "defines": ["_FORTIFY_SOURCE=2"],
    "libraries": ["-ldl"]
  },
  "targets": [
    {
      "target_name": "microvm",
      "sources": ["<!@(cat native/addon.sources)"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"]
    },
    {
      "target_name": "microvm-runner",
      "type": "executable",
      "sources": ["<!@(cat native/runner.sources)"],
      # The file-server guard (native/fs_guard.cc, the only default-visibility symbols) is exported
      # (ld does so anyway for symbols libc also defines; -rdynamic says it) so libkrun, loaded
      # later, calls it instead of libc's.
      "ldflags": ["-Wl,-z,relro,-z,now", "-pie", "-rdynamic"],
      # The egress filter (native/net_guard.cc) is linked in too: libkrun's TSI makes the guest's
      # connections with the runner's connect()/sendto(). Without a policy it passes all through.
      "defines": ["MICROVM_NETGUARD_LINKED"],
      "cflags": ["-fPIE"],
      "cflags_cc": ["-fPIE"]
    },
    {
      # LD_PRELOADed into virtiofsd by the QEMU backend (see native/fs_guard.cc).
      "target_name": "microvm-fsguard",
      "type": "shared_library",
      "product_prefix": "",
      "product_extension": "so",
      "sources": ["native/fs_guard.cc"]
    },
    {
      # LD_PRELOADed into QEMU when an egress policy needs it (see native/net_guard.cc).
      "target_name": "microvm-netguard",
      "type": "shared_library",
      "product_prefix": "",
      "product_extension": "so",
      "sources": ["native/net_guard.cc"]
    },
    {
      # PID 1 of VMs booted by the QEMU backend: static, so it runs in any image.
      "target_name": "microvm-guest-init",
      "type": "executable",
      "sources": ["<!@(cat native/guest-init.sources)"],
      "ldflags": ["-static"],
      "libraries!": ["-ldl"]
    }
  ]
}
