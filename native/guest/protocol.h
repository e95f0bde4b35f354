// The host <-> guest protocol of our guest init, for the C++ side: the same values as
// lib/guest/protocol.ts (test/guest-protocol.test.ts checks that the two agree). Described in
// docs/guest-protocol.md.
#pragma once

namespace microvm::guest {

constexpr char kInitPath[] = "/.microvm/init";
constexpr char kConfigPath[] = "/.krun_config.json";

constexpr char kConfigCmd[] = "Cmd";
constexpr char kConfigEnv[] = "Env";
constexpr char kConfigWorkingDir[] = "WorkingDir";
constexpr char kConfigMounts[] = "MicrovmMounts";
constexpr char kConfigPorts[] = "MicrovmPorts";
constexpr char kConfigHosts[] = "MicrovmHosts";
constexpr char kConfigUser[] = "MicrovmUser";

constexpr char kArgIdle[] = "--idle";
constexpr char kArgAgentListen[] = "--agent-listen=";

constexpr char kPortExit[] = "microvm.exit";
constexpr char kPortStdout[] = "microvm.stdout";
constexpr char kPortStderr[] = "microvm.stderr";
constexpr char kPortLogTimes[] = "microvm.logtimes";
constexpr char kPortAgent[] = "microvm.agent";

constexpr char kLineUp[] = "UP";
constexpr char kLineMilestone[] = "T";
constexpr char kLineExit[] = "EXIT";

constexpr int kAgentVsockPort = 19798;

constexpr char kConsolePrefix[] = "microvm-init: ";
constexpr char kPhraseCannotListen[] = "cannot listen for the host on";
constexpr char kPhraseBadAgent[] = "bad agent";
constexpr char kPhraseCannotStartAgent[] = "cannot start the agent";

}  // namespace microvm::guest
