/**
 * What both backends put in the guest's `/.krun_config.json`: the command, environment and working
 * directory (libkrun's built-in init and our microvm-guest-init both read it), plus the virtio-fs
 * shares our init mounts.
 */
import type { BackendPrepareInput } from './types';
import { CONFIG_KEY } from '../guest/protocol';

/** Default PATH for the guest when the image sets none. */
export const DEFAULT_GUEST_PATH = 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/** The guest's Cmd/Env/WorkingDir, merged from the image config and the run options. */
export function guestConfig(input: BackendPrepareInput): {
  Cmd: string[];
  Env: string[];
  WorkingDir: string;
  MicrovmMounts?: { tag: string; target: string; readOnly: boolean }[];
  MicrovmUser?: string;
} {
  const cmd = input.initOverride ?? [...input.image.entrypoint, ...input.image.cmd];
  if (cmd.length === 0) {
    throw Object.assign(new TypeError('Nothing to run: the image has no Entrypoint or Cmd; pass initOverride'), {
      code: 'ERR_MICROVM_NO_COMMAND',
    });
  }
  const env = new Map<string, string>();
  for (const e of [DEFAULT_GUEST_PATH, ...input.image.env, ...input.env]) {
    const i = e.indexOf('=');
    env.set(e.slice(0, i), e);
  }
  const config: ReturnType<typeof guestConfig> = {
    [CONFIG_KEY.cmd]: cmd,
    [CONFIG_KEY.env]: [...env.values()],
    [CONFIG_KEY.workingDir]: input.workdir ?? (input.image.workingDir || '/'),
  };
  // Read by microvm-guest-init (QEMU backend) for the agent's exec.
  if (input.image.user) config[CONFIG_KEY.user] = input.image.user;
  // Read by microvm-guest-init (QEMU backend); libkrun's own init ignores it (mount the tags yourself).
  if (input.mounts?.length)
    config[CONFIG_KEY.mounts] = input.mounts.map((m) => ({ tag: m.tag, target: m.guestPath, readOnly: m.readOnly }));
  return config;
}
