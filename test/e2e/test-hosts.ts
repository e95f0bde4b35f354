/**
 * Test hosts for the egress tests: a network namespace made by the test run, joined to the host by
 * a veth pair, with services on its side; never any outside address. Needs root and iproute2.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { qemuSkipReason } from '../helpers';

/** Why the real-traffic tests cannot run here (undefined: they can). */
export function netnsSkipReason(): string | undefined {
  const q = qemuSkipReason();
  if (q) return q;
  if (process.getuid?.() !== 0) return 'not root (needed to create a network namespace for the test hosts)';
  try {
    execFileSync('ip', ['-V'], { stdio: 'ignore' });
  } catch {
    return 'no ip command (iproute2)';
  }
  return undefined;
}

export interface TestHosts {
  /** The host's side of the veth. */
  hostIp: string;
  /** The far side's addresses, in order. */
  far: string[];
  stop(): void;
}

/**
 * Makes the namespace (`tag` + pid, so parallel test files do not meet) with `farCount` addresses
 * on its side of a 10.`octet`.x.0/29, runs `server` (a Node script) there, and waits until
 * `probePort` answers on the last far address.
 */
export async function makeTestHosts(opts: {
  tag: string;
  octet: number;
  farCount: 1 | 2;
  server: string;
  probePort: number;
  dir: string;
}): Promise<TestHosts> {
  const ns = `${opts.tag}${process.pid}`;
  const hostIf = `${opts.tag}h${process.pid}`.slice(0, 15);
  const nsIf = `${opts.tag}n${process.pid}`.slice(0, 15);
  const net3 = 16 + ((process.pid + opts.octet) % 200);
  const hostIp = `10.${opts.octet}.${net3}.1`;
  const far = Array.from({ length: opts.farCount }, (_, i) => `10.${opts.octet}.${net3}.${i + 2}`);
  const ip = (...args: string[]): void => void execFileSync('ip', args, { stdio: 'pipe' });
  ip('netns', 'add', ns);
  ip('link', 'add', hostIf, 'type', 'veth', 'peer', 'name', nsIf);
  ip('link', 'set', nsIf, 'netns', ns);
  ip('addr', 'add', `${hostIp}/29`, 'dev', hostIf);
  ip('link', 'set', hostIf, 'up');
  for (const a of far) ip('-n', ns, 'addr', 'add', `${a}/29`, 'dev', nsIf);
  ip('-n', ns, 'link', 'set', nsIf, 'up');
  ip('-n', ns, 'link', 'set', 'lo', 'up');
  const script = path.join(opts.dir, `${opts.tag}-server.js`);
  fs.writeFileSync(script, opts.server);
  const server: ChildProcess = spawn('ip', ['netns', 'exec', ns, process.execPath, script], { stdio: 'ignore' });
  for (let i = 0; i < 100; i++) {
    const ok = await new Promise<boolean>((resolve) => {
      const c = net.connect({ host: far[far.length - 1], port: opts.probePort }, () => (c.destroy(), resolve(true)));
      c.on('error', () => resolve(false));
    });
    if (ok) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    hostIp,
    far,
    stop(): void {
      server.kill('SIGKILL');
      for (const args of [
        ['netns', 'del', ns],
        ['link', 'del', hostIf],
      ])
        try {
          execFileSync('ip', args, { stdio: 'ignore' });
        } catch {
          // already gone (the veth goes with the namespace)
        }
    },
  };
}

/**
 * A guest shell command: an HTTP GET to host:port with busybox nc, printing the answer's last line
 * and nc's status ("BODY exit=0"). nc's stdin stays open `holdSeconds` (busybox nc ends at its
 * stdin's end, which can come before a relayed answer).
 */
export function guestHttpGet(host: string, port: number, holdSeconds = 2): string {
  return `(printf 'GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n'; sleep ${holdSeconds}) | timeout 3 nc ${host} ${port} > /tmp/got 2>/dev/null; st=$?; printf '%s exit=%s\\n' "$(tail -n 1 /tmp/got)" $st`;
}
