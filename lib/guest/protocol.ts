/**
 * The host <-> guest protocol of our guest init (native/guest/init.cc), in one place: where the init
 * lives, how it is started, the configuration it reads, the virtio-serial ports it uses, the lines it
 * writes to the host and the console phrases the host looks for. native/guest/protocol.h holds the
 * same values for the C++ side; test/guest-protocol.test.ts checks that the two agree.
 * docs/guest-protocol.md describes the protocol; the agent's own protocol is
 * docs/agent-protocol.md (lib/agent/protocol.ts).
 */

/** Where both backends put the guest init in the VM's root. */
export const GUEST_INIT_PATH = '/.microvm/init';

/** The configuration the init (and libkrun's init) reads, in the VM's root. */
export const GUEST_CONFIG_PATH = '/.krun_config.json';

/** Its keys: libkrun's (Cmd, Env, WorkingDir) and ours. */
export const CONFIG_KEY = {
  cmd: 'Cmd',
  env: 'Env',
  workingDir: 'WorkingDir',
  /** virtio-fs shares the init mounts: [{ tag, target, readOnly }]. */
  mounts: 'MicrovmMounts',
  /** The virtio ports the host provides, which the init waits for (QEMU). */
  ports: 'MicrovmPorts',
  /** [address, name] pairs the init adds to /etc/hosts (an egress allow-list's names). */
  hosts: 'MicrovmHosts',
  /** The image's User: the agent's exec runs as it unless a request names a user (QEMU). */
  user: 'MicrovmUser',
} as const;

/** The init's arguments. */
export const INIT_ARG = {
  /** `[GUEST_INIT_PATH, IDLE]` as the command: run nothing, serve the agent until stopped. */
  idle: '--idle',
  /** libkrun: `--agent-listen=vsock:PORT -- CMD...` (start the agent there, then become CMD). */
  agentListen: '--agent-listen=',
} as const;

/** The virtio-serial ports (QEMU backend). */
export const PORT = {
  /** The init's reports: "UP", milestones, "EXIT <code>". */
  exit: 'microvm.exit',
  stdout: 'microvm.stdout',
  stderr: 'microvm.stderr',
  /** When each chunk of the command's output arrived: "<1|2> <offset> <guest ns>" lines. */
  logTimes: 'microvm.logtimes',
  /** The guest agent's channel (docs/agent-protocol.md). */
  agent: 'microvm.agent',
} as const;

/** The lines the init writes on PORT.exit. */
export const EXIT_LINE = {
  /** The init runs (its mounts are done). */
  up: 'UP',
  /** `T <milestone> <guest CLOCK_MONOTONIC ns>`: a step of the boot, for the guest spans. */
  milestone: 'T',
  /** `EXIT <code>`: the command's exit status (125 setup failed, 126 not executable, 127 not found). */
  exit: 'EXIT',
} as const;

/** The vsock port the agent listens on under libkrun (libkrun bridges the VM's agent.sock to it). */
export const AGENT_VSOCK_PORT = 19798;

/** How the init's own lines on the console begin (the host looks for some of them). */
export const CONSOLE_PREFIX = 'microvm-init: ';

/** Console phrases that say the init could not start the agent (run() fails at once on them). */
export const AGENT_FAILURE_PHRASES = ['cannot listen for the host on', 'bad agent', 'cannot start the agent'] as const;

/** A command for the guest init that runs nothing: the VM serves its agent until stopped. */
export const IDLE_COMMAND: readonly string[] = [GUEST_INIT_PATH, INIT_ARG.idle];
