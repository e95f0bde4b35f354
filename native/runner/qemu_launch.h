// The QEMU backend's launcher and helpers, modes of the microvm-runner executable (runner.cc
// dispatches to them). Nothing here links libkrun.
//
//   microvm-runner --qemu-plan-fd N [--die-with-parent]
//       Reads a QEMU launch plan (JSON, written by lib/backends/qemu/launch.ts) from fd N, enters a
//       private mount namespace (and a user namespace mapping the caller to root when not root),
//       mounts the overlay root and the read-only share bind mounts, makes every socket QEMU will
//       connect to (virtiofsd's, the relay's, the log sink's), starts those helpers on them (each
//       dies with QEMU, but the sink: it ends when QEMU's exit closes its streams), and execs QEMU.
//       Nothing is waited for: each socket listens before QEMU starts. A failure before the exec
//       is one line "microvm: ..." on stderr and exit 70.
//   microvm-runner --relay-connect SOCKET RULE       (a guestfwd copier, see RelayConnect)
//   microvm-runner --log-sink STATUS [NAME MAXBYTES SOCKET FILE]...   (see LogSink)
//   microvm-runner --listen-unix PATH -- PROGRAM ARGS...   (see ListenExec)
#pragma once

namespace microvm {

// Exit status of the launcher when something before QEMU's exec failed.
constexpr int kLaunchFailed = 70;

int QemuLaunch(int plan_fd, bool die_with_parent);
int RelayConnect(const char* socket_path, const char* rule);
int LogSink(int argc, char** argv);
int ListenExec(const char* socket_path, char** program);

}  // namespace microvm
