/**
 * Real SSH servers for the SSH tests: an ssh2 server in this process (commands run by a real
 * /bin/sh; no SFTP, so the client's `cat` fallback is exercised) and OpenSSH's sshd on a random
 * loopback port (with SFTP).
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { Server, utils } from 'ssh2';

export interface TestServer {
  name: string;
  port: number;
  user: string;
  /** The server's host public key line. */
  hostKey: string;
  close(): Promise<void>;
}

import { freePort } from '../../lib/network/free-port';

export { freePort };

/** An ssh2 server accepting `authorizedKey`; exec runs the command with /bin/sh. */
export async function startSsh2Server(authorizedKey: string, port?: number): Promise<TestServer> {
  // ssh2 writes 1 ed25519 key in 256 unreadably (see lib/ssh/keys.ts): use one it can read.
  let host = utils.generateKeyPairSync('ed25519');
  while (utils.parseKey(host.private) instanceof Error) host = utils.generateKeyPairSync('ed25519');
  const allowed = utils.parseKey(authorizedKey);
  if (allowed instanceof Error || Array.isArray(allowed)) throw new Error('bad key');
  const allowedBlob = allowed.getPublicSSH();
  const children = new Set<ChildProcess>();
  const server = new Server({ hostKeys: [host.private] }, (client) => {
    (client as unknown as { setNoDelay(on: boolean): void }).setNoDelay(true); // as OpenSSH and dropbear do
    client.on('error', () => undefined);
    client.on('authentication', (ctx) => {
      if (ctx.method === 'publickey' && ctx.key.data.equals(allowedBlob)) {
        if (!ctx.signature) return ctx.accept();
        const ok = allowed.verify(ctx.blob as Buffer, ctx.signature, ctx.hashAlgo);
        return ok === true ? ctx.accept() : ctx.reject();
      }
      ctx.reject(['publickey']);
    });
    client.on('session', (accept) => {
      const session = accept();
      session.on('sftp', (_accept, reject) => reject()); // no SFTP: clients must fall back
      session.on('exec', (acceptExec, _reject, info) => {
        const stream = acceptExec();
        const child = spawn('/bin/sh', ['-c', info.command], { stdio: 'pipe' });
        children.add(child);
        stream.pipe(child.stdin);
        child.stdout.pipe(stream, { end: false });
        child.stderr.pipe(stream.stderr, { end: false });
        stream.on('signal', () => child.kill('SIGKILL'));
        child.on('close', (code, signal) => {
          children.delete(child);
          if (signal) stream.exit(signal.replace(/^SIG/, ''), false, '');
          else stream.exit(code ?? 0);
          stream.end();
        });
      });
    });
  });
  const p = port ?? 0;
  await new Promise<void>((resolve) => server.listen(p, '127.0.0.1', () => resolve()));
  return {
    name: 'ssh2 server',
    port: (server.address() as net.AddressInfo).port,
    user: 'tester',
    hostKey: host.public.trim(),
    close: () =>
      new Promise((resolve) => {
        for (const c of children) c.kill('SIGKILL');
        server.close(() => resolve());
      }),
  };
}

/** OpenSSH sshd on a free loopback port, accepting `authorizedKey` for the current user. */
export async function startSshd(authorizedKey: string): Promise<TestServer> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'microvm-sshd-'));
  fs.chmodSync(dir, 0o755);
  execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'host_ed25519')]);
  fs.writeFileSync(path.join(dir, 'authorized_keys'), `${authorizedKey}\n`, { mode: 0o600 });
  fs.mkdirSync('/run/sshd', { recursive: true, mode: 0o755 });
  const port = await freePort();
  const config = [
    `Port ${port}`,
    'ListenAddress 127.0.0.1',
    `HostKey ${path.join(dir, 'host_ed25519')}`,
    `AuthorizedKeysFile ${path.join(dir, 'authorized_keys')}`,
    `PidFile ${path.join(dir, 'sshd.pid')}`,
    'UsePAM no',
    'StrictModes no',
    'PasswordAuthentication no',
    'KbdInteractiveAuthentication no',
    'PermitRootLogin prohibit-password',
    'Subsystem sftp /usr/lib/openssh/sftp-server',
    'LogLevel ERROR',
  ].join('\n');
  fs.writeFileSync(path.join(dir, 'sshd_config'), `${config}\n`);
  const child = spawn('/usr/sbin/sshd', ['-D', '-e', '-f', path.join(dir, 'sshd_config')], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  // Ready when the port accepts.
  for (let i = 0; ; i++) {
    const up = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => {
        s.destroy();
        resolve(true);
      });
      s.on('error', () => resolve(false));
    });
    if (up) break;
    if (i > 200 || child.exitCode !== null) throw new Error(`sshd did not start: ${stderr}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  return {
    name: 'OpenSSH sshd',
    port,
    user: os.userInfo().username,
    hostKey: fs.readFileSync(path.join(dir, 'host_ed25519.pub'), 'utf8').trim().split(' ').slice(0, 2).join(' '),
    close: async () => {
      child.kill('SIGTERM');
      await new Promise((r) => child.once('exit', r));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
