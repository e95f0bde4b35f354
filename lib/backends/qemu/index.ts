/**
 * The QEMU backend: boots the libkrunfw kernel (the one libkrun runs) under QEMU's `microvm`
 * machine, on the same virtio-fs root libkrun would serve, with KVM when /dev/kvm is usable and
 * TCG (software emulation) otherwise. So `run()` works on any Linux host, KVM or not.
 *
 * Processes: Node -> `unshare` (a private mount namespace; plus a user namespace when not root)
 * -> `setpriv --pdeathsig SIGKILL` -> `sh` launcher: mounts the overlay root (when cloned that
 * way), starts virtiofsd on it (also with a parent-death signal) and execs QEMU. QEMU and virtiofsd
 * therefore die with the Node process, even on `kill -9`, and share one process group for stop().
 *
 * The guest runs `microvm-guest-init` (native/guest_init.cc) as PID 1, which reads
 * /.krun_config.json like libkrun's init and reports the command's exit status on the
 * virtio-serial port "microvm.exit"; the backend then stops QEMU (a guest poweroff hangs with this
 * kernel) and `vm.wait()` returns that status.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MicrovmError } from '../../errors';
import { addonPath } from '../../native';
import { resolveFirmware, type ResolveFirmwareOptions } from '../../resolve/firmware';
import { rootfsContext } from '../../rootfs/hooks';
import { ATTR, SPAN } from '../../telemetry/attributes';
import { inSpan } from '../../telemetry/tracer';
import { guestConfig } from '../libkrun';
import type { Backend, BackendHandle, BackendPrepareInput, BackendStartInput } from '../types';
import { pvhKernelFor } from './kernel';

/** Where the guest init is placed in the VM's rootfs. */
export const GUEST_INIT_PATH = '/.microvm/init';

/** Options of {@link qemuBackend}. */
export interface QemuBackendOptions {
  /** qemu-system-x86_64 to use. Default: found on PATH. */
  qemuPath?: string;
  /** virtiofsd to use. Default: /usr/libexec/virtiofsd, /usr/lib/qemu/virtiofsd, then PATH. */
  virtiofsdPath?: string;
  /** 'kvm', 'tcg', or 'auto' (kvm when /dev/kvm opens read-write). Default 'auto'. */
  accel?: 'auto' | 'kvm' | 'tcg';
  firmware?: ResolveFirmwareOptions;
  /** Where bootable kernels are cached. Default: `<dataDir>/kernels`. */
  kernelCacheDir?: string;
  /** Seconds QEMU may take to come up before start() fails. Default 30. */
  startTimeoutSeconds?: number;
  /**
   * QEMU dies with this Node process (parent-death signal), even on kill -9. Default true; false
   * lets the VM outlive it (`microvm run --detach`); virtiofsd always dies with QEMU.
   */
  dieWithParent?: boolean;
}

function onPath(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(':')) {
    const file = path.join(dir, name);
    try {
      fs.accessSync(file, fs.constants.X_OK);
      return file;
    } catch {
      /* next */
    }
  }
  return undefined;
}

/** Whether /dev/kvm opens read-write. */
export function kvmUsable(): boolean {
  try {
    fs.closeSync(fs.openSync('/dev/kvm', fs.constants.O_RDWR));
    return true;
  } catch {
    return false;
  }
}

/** Host TSC frequency in kHz (the microvm guest cannot calibrate it under TCG without a hint). */
export function hostTscKhz(): number | undefined {
  try {
    const m = /cpu MHz\s*:\s*([\d.]+)/.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'));
    return m ? Math.round(Number(m[1]) * 1000) : undefined;
  } catch {
    return undefined;
  }
}

/** The guest init binary: beside the loaded addon, else in this package's build. */
export function guestInitPath(): string {
  const candidates = [path.join(path.dirname(addonPath() ?? ''), 'microvm-guest-init'), path.join(__dirname, '..', '..', '..', 'build', 'Release', 'microvm-guest-init')];
  const found = candidates.find((c) => fs.existsSync(c));
  if (!found) throw new MicrovmError('ERR_MICROVM_GUEST_INIT_NOT_FOUND', `microvm-guest-init was not found (looked in ${candidates.join(', ')}); build it with \`npm run build:native\``);
  return found;
}

/** What the QEMU backend needs on the host. */
export interface QemuRuntime {
  qemuPath: string;
  virtiofsdPath: string;
  accel: 'kvm' | 'tcg';
  guestInit: string;
}

/** Finds QEMU, virtiofsd and the guest init. Errors name the package to install. */
export function resolveQemuRuntime(options: QemuBackendOptions = {}): QemuRuntime {
  const qemuPath = options.qemuPath ?? onPath('qemu-system-x86_64');
  if (!qemuPath || !fs.existsSync(qemuPath)) {
    throw new MicrovmError('ERR_MICROVM_QEMU_NOT_FOUND', 'qemu-system-x86_64 was not found. Install it: `apt-get install qemu-system-x86` (Debian/Ubuntu) or `dnf install qemu-system-x86-core` (Fedora).');
  }
  const virtiofsdPath = options.virtiofsdPath ?? ['/usr/libexec/virtiofsd', '/usr/lib/qemu/virtiofsd'].find((p) => fs.existsSync(p)) ?? onPath('virtiofsd');
  if (!virtiofsdPath || !fs.existsSync(virtiofsdPath)) {
    throw new MicrovmError('ERR_MICROVM_VIRTIOFSD_NOT_FOUND', 'virtiofsd was not found. Debian 12 ships it in qemu-system-common (/usr/lib/qemu/virtiofsd); newer distributions: `apt-get install virtiofsd` / `dnf install virtiofsd`.');
  }
  for (const tool of ['unshare', 'setpriv', 'mount']) {
    if (!onPath(tool)) throw new MicrovmError('ERR_MICROVM_QEMU_NOT_FOUND', `${tool} (util-linux) was not found; install util-linux and mount.`);
  }
  const accel = options.accel === 'kvm' || options.accel === 'tcg' ? options.accel : kvmUsable() ? 'kvm' : 'tcg';
  return { qemuPath, virtiofsdPath, accel, guestInit: guestInitPath() };
}

// The launcher run by `sh -c` inside the new namespace(s). Parameters arrive as environment
// variables and QEMU's argv as "$@", so no path is ever spliced into shell code.
const LAUNCHER = `set -eu
if [ -n "\${MVM_OVERLAY_LOWER:-}" ]; then
  opts="lowerdir=$MVM_OVERLAY_LOWER,upperdir=$MVM_OVERLAY_UPPER,workdir=$MVM_OVERLAY_WORK"
  if [ -n "\${MVM_USERNS:-}" ]; then
    mount -t overlay overlay -o "$opts,userxattr" "$MVM_ROOT" 2>/dev/null || mount -t overlay overlay -o "$opts" "$MVM_ROOT"
  else
    mount -t overlay overlay -o "$opts" "$MVM_ROOT"
  fi
fi
setpriv --pdeathsig SIGKILL -- "$MVM_VIRTIOFSD" --socket-path="$MVM_FS_SOCK" -o source="$MVM_ROOT" -o cache=auto &
# Extra shares: MVM_SHARE_<n>_{SRC,SOCK,RO,MNT}. Read-only ones are served from a read-only bind
# mount in this namespace (kernel-enforced; this virtiofsd has no read-only option).
n=0
while [ "$n" -lt "\${MVM_SHARES:-0}" ]; do
  eval "src=\\\${MVM_SHARE_\${n}_SRC} sock=\\\${MVM_SHARE_\${n}_SOCK} ro=\\\${MVM_SHARE_\${n}_RO} mnt=\\\${MVM_SHARE_\${n}_MNT}"
  if [ "$ro" = 1 ]; then
    mount --bind "$src" "$mnt"
    mount -o remount,bind,ro "$mnt"
    src=$mnt
  fi
  setpriv --pdeathsig SIGKILL -- "$MVM_VIRTIOFSD" --socket-path="$sock" -o source="$src" -o cache=auto &
  n=$((n + 1))
done
for sock in "$MVM_FS_SOCK" \${MVM_SHARE_SOCKS:-}; do
  i=0
  while [ ! -S "$sock" ]; do
    i=$((i + 1))
    if [ "$i" -gt 1000 ]; then echo "microvm: virtiofsd did not create $sock" >&2; exit 70; fi
    sleep 0.01
  done
done
exec "$@"
`;

/** Creates the QEMU backend. */
export function qemuBackend(options: QemuBackendOptions = {}): Backend {
  return {
    name: 'qemu',
    supportsOverlay: true,
    async prepareRootfs(input: BackendPrepareInput): Promise<void> {
      const ctx = rootfsContext(input.vmId, input.rootfs);
      ctx.writeFile('/.krun_config.json', `${JSON.stringify(guestConfig(input))}\n`, { mode: 0o644 });
      ctx.writeFile(GUEST_INIT_PATH, fs.readFileSync(guestInitPath()), { mode: 0o755, uid: 0, gid: 0, parents: { mode: 0o755 } });
    },
    async start(input: BackendStartInput): Promise<BackendHandle> {
      return inSpan(input.scope, SPAN.BACKEND_START, { [ATTR.BACKEND]: 'qemu' }, async (span, scope) => {
        const rt = await inSpan(scope, SPAN.BACKEND_RESOLVE_RUNTIME, undefined, (s) => {
          const r = resolveQemuRuntime(options);
          s.setAttribute(ATTR.RUNTIME_RUNNER_PATH, r.qemuPath);
          s.setAttribute('microvm.qemu.accel', r.accel);
          return r;
        });
        const kernel = await inSpan(scope, SPAN.BACKEND_RESOLVE_FIRMWARE, undefined, async (s) => {
          const fw = await resolveFirmware(options.firmware);
          s.setAttribute(ATTR.FIRMWARE_PATH, fw.path);
          s.setAttribute(ATTR.FIRMWARE_ABI, fw.abiVersion);
          return pvhKernelFor(fw, options.kernelCacheDir ?? path.join(input.dataDir, '..', '..', 'kernels'));
        });
        if (input.network) throw new MicrovmError('ERR_MICROVM_QEMU_NETWORK', 'The QEMU backend uses QEMU user networking; network providers are not supported');
        input.signal?.throwIfAborted();

        const fsSock = path.join(input.dataDir, 'virtiofs.sock');
        const exitFile = path.join(input.dataDir, 'exit-status');
        for (const f of [fsSock, exitFile, input.consoleLogPath]) fs.rmSync(f, { force: true });
        const cpus = rt.accel === 'tcg' ? 1 : input.cpus; // this kernel hangs with smp > 1 under TCG
        const khz = hostTscKhz();
        const cmdline = [`console=hvc0`, 'rootfstype=virtiofs', 'root=root', 'rw', `init=${GUEST_INIT_PATH}`, 'panic=-1', 'quiet', 'loglevel=3'];
        if (khz) cmdline.push(`tsc_early_khz=${khz}`);
        const hostfwd = input.ports.map((p) => `,hostfwd=tcp:127.0.0.1:${p.host}-:${p.guest}`).join('');
        const qemuArgs = [
          rt.qemuPath,
          // pic=on: with pic=off the PIT tick never reaches the guest, the kernel disables its APIC
          // timer ("verification failure") and every sleep in the guest hangs under TCG.
          '-M',
          'microvm,x-option-roms=off,pit=on,pic=on,rtc=on,isa-serial=off,acpi=off,memory-backend=mem',
          '-global', 'virtio-mmio.force-legacy=false',
          '-accel', rt.accel,
          '-cpu', rt.accel === 'kvm' ? 'host' : 'max',
          '-smp', String(cpus),
          '-m', `${input.memoryMiB}M`,
          '-object', `memory-backend-memfd,id=mem,size=${input.memoryMiB}M,share=on`,
          '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
          '-kernel', kernel,
          '-append', cmdline.join(' '),
          '-device', 'virtio-serial-device',
          '-chardev', `file,id=con,path=${input.consoleLogPath}`,
          '-device', 'virtconsole,chardev=con',
          '-chardev', `file,id=exit,path=${exitFile}`,
          '-device', 'virtserialport,chardev=exit,name=microvm.exit',
          '-chardev', `socket,id=fs,path=${fsSock}`,
          '-device', 'vhost-user-fs-device,chardev=fs,tag=root',
          '-netdev', `user,id=n0${hostfwd}`,
          '-device', 'virtio-net-device,netdev=n0',
          '-device', 'virtio-rng-device',
        ];
        input.virtiofs.forEach((share, n) => {
          qemuArgs.push('-chardev', `socket,id=fs${n + 1},path=${path.join(input.dataDir, `share-${n}.sock`)}`);
          qemuArgs.push('-device', `vhost-user-fs-device,chardev=fs${n + 1},tag=${share.tag}`);
        });
        const root = process.getuid?.() === 0;
        const env: NodeJS.ProcessEnv = {
          PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin',
          MVM_ROOT: input.rootfs.rootPath,
          MVM_FS_SOCK: fsSock,
          MVM_VIRTIOFSD: rt.virtiofsdPath,
        };
        env.MVM_SHARES = String(input.virtiofs.length);
        const socks: string[] = [];
        input.virtiofs.forEach((share, n) => {
          const sock = path.join(input.dataDir, `share-${n}.sock`);
          const mnt = path.join(input.dataDir, 'shares', String(n));
          fs.rmSync(sock, { force: true });
          fs.mkdirSync(mnt, { recursive: true });
          env[`MVM_SHARE_${n}_SRC`] = share.hostPath;
          env[`MVM_SHARE_${n}_SOCK`] = sock;
          env[`MVM_SHARE_${n}_RO`] = share.readOnly ? '1' : '0';
          env[`MVM_SHARE_${n}_MNT`] = mnt;
          socks.push(sock);
        });
        // Socket paths are ours (data dir), without spaces: safe to split in the launcher.
        if (socks.some((x) => /\s/.test(x))) throw new MicrovmError('ERR_MICROVM_QEMU_VIRTIOFS', 'The data dir path must not contain white space');
        env.MVM_SHARE_SOCKS = socks.join(' ');
        if (input.rootfs.overlay) {
          env.MVM_OVERLAY_LOWER = input.rootfs.overlay.lower;
          env.MVM_OVERLAY_UPPER = input.rootfs.overlay.upper;
          env.MVM_OVERLAY_WORK = input.rootfs.overlay.work;
          if (!root) env.MVM_USERNS = '1';
        }
        const unshareArgs = root ? ['-m', '--propagation', 'private'] : ['-U', '-r', '-m', '--propagation', 'private'];
        const logFd = fs.openSync(input.logPath, 'a', 0o640);
        const tie = options.dieWithParent === false ? [] : ['setpriv', '--pdeathsig', 'SIGKILL', '--'];
        const child = spawn('unshare', [...unshareArgs, '--', ...tie, 'sh', '-c', LAUNCHER, 'microvm-launcher', ...qemuArgs], {
          stdio: ['ignore', logFd, logFd],
          detached: true,
          env,
        });
        fs.closeSync(logFd);
        let guestCode: number | undefined;
        const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
          child.once('exit', (code, signal) => resolve(guestCode !== undefined ? { code: guestCode, signal: null } : { code, signal }));
          child.once('error', () => resolve({ code: null, signal: null }));
        });
        const kill = (sig: NodeJS.Signals): boolean => {
          try {
            process.kill(-(child.pid as number), sig);
            return true;
          } catch {
            return false;
          }
        };

        // Up = QEMU opened its chardev files (it parsed its arguments and built the machine).
        const deadline = Date.now() + (options.startTimeoutSeconds ?? 30) * 1000;
        let running = true;
        exited.then(() => (running = false)).catch(() => undefined);
        while (running && !fs.existsSync(exitFile)) {
          if (input.signal?.aborted || Date.now() > deadline) break;
          await new Promise((r) => setTimeout(r, 10));
        }
        if (!running || !fs.existsSync(exitFile)) {
          kill('SIGKILL');
          const status = await exited;
          input.signal?.throwIfAborted();
          let log = '';
          try {
            log = fs.readFileSync(input.logPath, 'utf8').slice(-4000);
          } catch {
            /* none */
          }
          throw Object.assign(new MicrovmError('ERR_MICROVM_QEMU_START', `QEMU did not start (${status.signal ?? `exit ${String(status.code)}`}):\n${log.trim()}`), { exitCode: status.code });
        }

        // The guest's exit status arrives on the microvm.exit port: then stop QEMU.
        const poll = setInterval(() => {
          try {
            const m = /EXIT (\d+)/.exec(fs.readFileSync(exitFile, 'utf8'));
            if (m) {
              guestCode = Number(m[1]);
              clearInterval(poll);
              kill('SIGTERM');
            }
          } catch {
            /* not yet */
          }
        }, 20);
        poll.unref();
        exited.then(() => clearInterval(poll)).catch(() => undefined);
        // Tied to this process: not unref'd, so this process stays alive while the VM runs (stop() or
        // the guest's exit ends it). Untied: let this process exit whenever it wants.
        if (options.dieWithParent === false) {
          child.unref();
          poll.unref();
        }
        span.setAttribute(ATTR.VM_PID, child.pid as number);
        // By now the launcher has exec'd QEMU: /proc/PID/exe is QEMU (for the PID-reuse guard).
        return { pid: child.pid as number, executable: fs.realpathSync(rt.qemuPath), exited, kill };
      });
    },
  };
}

