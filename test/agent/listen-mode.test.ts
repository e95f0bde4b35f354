/**
 * microvm-guest-init's libkrun mode (`--agent-listen=SPEC -- CMD...`), run on this host: the real
 * binary starts the real agent on a listening unix socket (what the libkrun double's guest gets in
 * place of vsock) and becomes CMD. Commands run here are harmless shell one-liners.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { AgentClient } from '../../lib/agent/client';
import { execBuffered } from '../../lib/agent/exec';
import { guestInitPath } from '../../lib/backends/guest-init';
import { scratch } from '../helpers';

let s: ReturnType<typeof scratch>;
const children: ChildProcess[] = [];
beforeEach(() => {
  s = scratch('microvm-listen-');
});
afterEach(() => {
  for (const c of children.splice(0)) c.kill('SIGKILL');
  // The agent and its supervisor outlive the command (in a VM they end with it): end them here.
  for (const pid of fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    try {
      if (fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(s.dir)) process.kill(Number(pid), 'SIGKILL');
    } catch {
      // gone already
    }
  }
  s.cleanup();
});

/**
 * Runs the init until it exits. Its output goes to files: the agent it starts keeps a copy of
 * stdout and stderr (the console, in a VM), so pipes would stay open after the init is gone.
 */
async function init(...args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  const out = path.join(s.dir, `out-${args.length}-${Date.now()}`);
  const fds = [fs.openSync(`${out}.1`, 'w'), fs.openSync(`${out}.2`, 'w')];
  const child = spawn(guestInitPath(), args, {
    stdio: ['ignore', fds[0], fds[1]],
    cwd: s.dir,
    env: { PATH: process.env.PATH },
  });
  children.push(child);
  fds.forEach((fd) => fs.closeSync(fd));
  const timer = setTimeout(() => child.kill('SIGKILL'), 10_000).unref();
  const status = await new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  clearTimeout(timer);
  return { status, stdout: fs.readFileSync(`${out}.1`, 'utf8'), stderr: fs.readFileSync(`${out}.2`, 'utf8') };
}

describe('guest init, libkrun mode', () => {
  test.each([
    ['vsock:0', 'bad agent port'],
    ['vsock:4294967295', 'bad agent port'],
    ['vsock:12ab', 'bad agent port'],
    ['tcp:80', 'bad agent listen address'],
    [`unix:/${'x'.repeat(120)}`, 'bad agent socket path'],
  ])('%s: said on stderr; the command still runs and its exit code passes through', async (spec, said) => {
    const r = await init(`--agent-listen=${spec}`, '--', '/bin/sh', '-c', 'echo ran; exit 3');
    expect(r.status).toBe(3);
    expect(r.stdout).toBe('ran\n');
    expect(r.stderr).toContain(said);
  });

  test('no "--": 125 with a usage line; a command that is not there: 127', async () => {
    const usage = await init(`--agent-listen=unix:${path.join(s.dir, 'a.sock')}`, '/bin/true');
    expect(usage.status).toBe(125);
    expect(usage.stderr).toContain('usage:');
    const missing = await init(`--agent-listen=unix:${path.join(s.dir, 'b.sock')}`, '--', '/no/such/command');
    expect(missing.status).toBe(127);
    expect(missing.stderr).toContain('cannot execute /no/such/command');
  });

  test('one host at a time: a host that goes away mid-exec has its processes ended; the next one is greeted', async () => {
    const sock = path.join(s.dir, 'c.sock');
    const cmd = init(`--agent-listen=unix:${sock}`, '--', '/bin/sh', '-c', 'exec sleep 30');
    const first = await AgentClient.connect(sock, { timeoutMs: 5000, acceptsLate: true });
    expect(fs.statSync(sock).mode & 0o777).toBe(0o600);
    const marker = path.join(s.dir, 'ran');
    const proc = first.spawn(['/bin/sh', '-c', `echo $$ > ${marker}; exec sleep 300`]);
    for (let i = 0; i < 100 && !fs.existsSync(marker); i++) await new Promise((r) => setTimeout(r, 20));
    const pid = Number(fs.readFileSync(marker, 'utf8'));
    expect(fs.existsSync(`/proc/${pid}`)).toBe(true);
    proc.exited.catch(() => undefined);
    first.close();
    const second = await AgentClient.connect(sock, { timeoutMs: 5000, acceptsLate: true });
    expect(second.hello.pid).toBe(first.hello.pid); // the same agent, reset for the new host
    for (let i = 0; i < 100 && fs.existsSync(`/proc/${pid}`) && !isZombie(pid); i++)
      await new Promise((r) => setTimeout(r, 20));
    expect(fs.existsSync(`/proc/${pid}`) && !isZombie(pid)).toBe(false);
    expect(await execBuffered(second, ['echo', 'again'], {})).toMatchObject({ stdout: 'again\n', exitCode: 0 });
    second.close();
    cmd.catch(() => undefined); // ended in afterEach with the agent (its files go with the scratch dir)
  });
});

function isZombie(pid: number): boolean {
  try {
    return /^State:\s+Z/m.test(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  } catch {
    return false;
  }
}
