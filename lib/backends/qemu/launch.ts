/**
 * What one QEMU start is made of, computed without side effects: the guest kernel's command line,
 * QEMU's arguments, and the launch plan `microvm-runner --qemu-plan-fd` reads (native/runner/qemu_launch.cc:
 * namespaces, the overlay root, the file servers, the relay and the log sink, then QEMU). The backend
 * (index.ts) writes the files this names and starts the runner; tests read these functions alone.
 */
import * as path from 'node:path';
import { AGENT_SOCKET } from '../guest-init';
import { GUEST_INIT_PATH, PORT } from '../../guest/protocol';
import { OUTPUT_TIMES_FILE } from '../../log-times';
import { DEFAULT_LOG_MAX_BYTES, OUTPUT_STATUS_FILE } from '../../output-status';
import { guestForwards, relayRules } from '../../network/egress';
import { planEgress } from '../../network/policy';
import type { BackendStartInput } from '../types';
import { VM_FILE } from '../../vm-dir';

/** What a start needs from the host, resolved by the backend. */
export interface LaunchHost {
  qemuPath: string;
  virtiofsdPath: string;
  /** microvm-fsguard.so (preloaded into every virtiofsd). */
  fsGuard: string;
  /** microvm-runner: the launcher itself and the relay's per-connection copier. */
  runnerPath: string;
  /** The PVH ELF of the firmware's kernel. */
  kernel: string;
  accel: 'kvm' | 'tcg';
  /** The host TSC's kHz, for the guest's early TSC (a TCG guest cannot calibrate it). */
  tscKhz?: number;
  /** Appended to QEMU's arguments (qemuBackend({ extraArgs })). */
  extraArgs?: readonly string[];
  /** The egress filter when the policy needs one (its library, and the policy file written). */
  netGuard?: { library: string; policy: string };
  /** The relay: Node and relay.js (lib/network/relay.ts). */
  relay: { node: string; script: string };
  /** The environment the launcher and its programs start from (PATH, test knobs). */
  env: Record<string, string>;
}

/** The VM directory's files a start uses. */
export function launchFiles(dataDir: string) {
  return {
    rootSocket: path.join(dataDir, 'virtiofs.sock'),
    qmpSocket: path.join(dataDir, 'qmp.sock'),
    controlSocket: path.join(dataDir, VM_FILE.control),
    agentSocket: path.join(dataDir, AGENT_SOCKET),
    exitFile: path.join(dataDir, 'exit-status'),
    timesFile: path.join(dataDir, OUTPUT_TIMES_FILE),
    statusFile: path.join(dataDir, OUTPUT_STATUS_FILE),
    relaySocket: path.join(dataDir, 'relay.sock'),
    relayRules: path.join(dataDir, 'relay-rules.json'),
    egressLog: path.join(dataDir, 'egress.log'),
    shareSocket: (n: number) => path.join(dataDir, `share-${n}.sock`),
    shareMount: (n: number) => path.join(dataDir, 'shares', String(n)),
    sinkSocket: (stream: string) => path.join(dataDir, `${stream}.sink`),
  };
}

/**
 * The guest kernel's command line. Under TCG, options that save boot time a real CPU would not
 * (measured from the kernel's own log; docs/architecture.md, "A TCG boot"): no Spectre/Meltdown
 * patching (nothing runs speculatively), the PIT as the timer (no APIC timer calibration), no
 * jitter-entropy self-test (RDRAND and virtio-rng seed the RNG), no idle loop devices, and lock
 * prefixes left as they are. Under KVM the kernel keeps its defaults.
 */
export function kernelCommandLine(accel: 'kvm' | 'tcg', tscKhz?: number): string[] {
  const cmdline = [
    'console=hvc0',
    'rootfstype=virtiofs',
    'root=root',
    'rw',
    `init=${GUEST_INIT_PATH}`,
    'panic=-1',
    // The init ends the VM after it reported the command's exit (a restart, which -no-reboot
    // turns into QEMU's exit): by a triple fault at once, not the slower methods that need ACPI.
    'reboot=t',
    'quiet',
    'loglevel=3',
  ];
  if (tscKhz) cmdline.push(`tsc_early_khz=${tscKhz}`);
  if (accel === 'tcg')
    cmdline.push(
      'mitigations=off',
      'nolapic_timer',
      'initcall_blacklist=jent_mod_init',
      'loop.max_loop=0',
      'noreplace-smp',
    );
  return cmdline;
}

/** One start: QEMU's argv, the launch plan, and what the backend writes beforehand. */
export interface QemuLaunch {
  qemuArgs: string[];
  plan: Record<string, unknown>;
  /** The allow-list's relay rules file to write (0600) first, when the policy has relayed names. */
  relayRules?: { path: string; text: string };
  /** Directories the plan mounts on (read-only share bind mounts). */
  mountPoints: string[];
}

/** QEMU's arguments and the launch plan for `input` on `host`. Pure: reads and writes nothing. */
export function qemuLaunch(input: BackendStartInput, host: LaunchHost): QemuLaunch {
  const f = launchFiles(input.dataDir);
  const egress = planEgress(input.egress);
  const relayed = egress.relayed;
  const allow = relayed?.length ? relayed : undefined; // names the relay serves, if any
  // An allow-list: nothing leaves (restrict=on) but connections to the allowed names' virtual
  // addresses and ports, each handed to the VM's relay (lib/network/egress.ts). Rules beyond
  // relayed names need the egress filter in QEMU instead of restricted mode.
  const restrict = egress.mode !== 'allow' && !host.netGuard;
  const hostfwd = input.ports.map((p) => `,hostfwd=tcp:127.0.0.1:${p.host}-:${p.guest}`).join('');
  const egressForwards = allow ? guestForwards(allow, { runner: host.runnerPath, socket: f.relaySocket }) : '';

  // Every output port goes to the VM's log sink, which bounds each file on the host and says when
  // output was cut or lost (lib/output-status.ts).
  const streams: { name: string; max: number; socket: string; file: string }[] = [];
  const logMax = input.logMaxBytes ?? DEFAULT_LOG_MAX_BYTES;
  const sinkPort = (name: string, file: string, max: number): string => {
    streams.push({ name, max, socket: f.sinkSocket(name), file });
    return `socket,id=${name},path=${f.sinkSocket(name)}`;
  };
  const port = (name: string, file: string, portName: string, max = logMax): string[] => [
    '-chardev',
    sinkPort(name, file, max),
    '-device',
    `virtserialport,chardev=${name},name=${portName}`,
  ];
  const qemuArgs = [
    host.qemuPath,
    // pic=on: with pic=off the PIT tick never reaches the guest, the kernel disables its APIC
    // timer ("verification failure") and every sleep in the guest hangs under TCG.
    '-M',
    'microvm,x-option-roms=off,pit=on,pic=on,rtc=on,isa-serial=off,acpi=off,memory-backend=mem',
    '-global',
    'virtio-mmio.force-legacy=false',
    '-accel',
    host.accel,
    '-cpu',
    // Under TCG: every feature QEMU emulates, except nested virtualization (svm/vmx): the guest
    // kernel's KVM would spend ~0.1 s of boot setting up something a TCG guest cannot use.
    host.accel === 'kvm' ? 'host' : 'max,-svm,-vmx',
    // Under TCG too: one host thread per vCPU (multi-threaded TCG); the kernel finds them in the
    // MP table the microvm machine writes (no ACPI needed).
    '-smp',
    String(input.cpus),
    '-m',
    `${input.memoryMiB}M`,
    '-object',
    `memory-backend-memfd,id=mem,size=${input.memoryMiB}M,share=on`,
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-no-reboot',
    '-qmp',
    `unix:${f.qmpSocket},server=on,wait=off`,
    // A second monitor for control from any process (lib/pause.ts): the first is the watcher's.
    '-qmp',
    `unix:${f.controlSocket},server=on,wait=off`,
    '-kernel',
    host.kernel,
    '-append',
    kernelCommandLine(host.accel, host.tscKhz).join(' '),
    '-device',
    'virtio-serial-device',
    '-chardev',
    sinkPort('console', input.consoleLogPath, logMax),
    '-device',
    'virtconsole,chardev=console',
    ...port('exit', f.exitFile, PORT.exit, 64 * 1024),
    ...port('stdout', input.stdoutPath, PORT.stdout),
    ...port('stderr', input.stderrPath, PORT.stderr),
    // When each chunk of the command's output arrived (the init relays it): for logs --since.
    ...(input.outputTimes === false ? [] : port('times', f.timesFile, PORT.logTimes, 16 * 2 ** 20)),
    // The guest agent's channel (native/guest/agent.cc): QEMU listens; one host client at a time.
    '-chardev',
    `socket,id=agent,path=${f.agentSocket},server=on,wait=off`,
    '-device',
    `virtserialport,chardev=agent,name=${PORT.agent}`,
    '-chardev',
    `socket,id=fs,path=${f.rootSocket}`,
    '-device',
    'vhost-user-fs-device,chardev=fs,tag=root',
    '-netdev',
    `user,id=n0${restrict ? ',restrict=on' : ''}${hostfwd}${egressForwards}`,
    '-device',
    'virtio-net-device,netdev=n0',
    '-device',
    'virtio-rng-device',
  ];
  input.virtiofs.forEach((share, n) => {
    qemuArgs.push('-chardev', `socket,id=fs${n + 1},path=${f.shareSocket(n)}`);
    qemuArgs.push('-device', `vhost-user-fs-device,chardev=fs${n + 1},tag=${share.tag}`);
  });
  qemuArgs.push(...(host.extraArgs ?? []));

  const overlay = input.rootfs.overlay;
  const plan: Record<string, unknown> = {
    version: 1,
    env: host.env,
    ...(overlay ? { overlay: { ...overlay, merged: input.rootfs.rootPath } } : {}),
    virtiofsd: host.virtiofsdPath,
    fsGuard: host.fsGuard,
    fileServers: [
      { source: input.rootfs.rootPath, socket: f.rootSocket, cache: 'always' },
      ...input.virtiofs.map((share, n) => ({
        source: share.hostPath,
        socket: f.shareSocket(n),
        cache: 'auto',
        ...(share.readOnly ? { readOnlyAt: f.shareMount(n) } : {}),
      })),
    ],
    ...(allow
      ? {
          relay: {
            node: host.relay.node,
            script: host.relay.script,
            socket: f.relaySocket,
            rules: f.relayRules,
            log: f.egressLog,
            env: ['MICROVM_RELAY_MAX_CONNECTIONS', 'MICROVM_RELAY_IDLE_MS']
              .filter((k) => host.env[k] !== undefined)
              .map((k) => `${k}=${host.env[k]}`),
          },
        }
      : {}),
    sink: { status: f.statusFile, streams },
    ...(host.netGuard ? { netGuard: host.netGuard } : {}),
    qemu: qemuArgs,
  };
  return {
    qemuArgs,
    plan,
    relayRules: allow ? { path: f.relayRules, text: relayRules(allow) } : undefined,
    mountPoints: input.virtiofs.flatMap((share, n) => (share.readOnly ? [f.shareMount(n)] : [])),
  };
}
