/**
 * An SSH client for the guest, on ssh2: key authentication, host-key pinning or trust on first use
 * (a known-hosts file in the VM's data dir), exec with exit codes and signals, streaming exec,
 * file copy (SFTP when the server offers it, else `cat` over exec), one reused connection, and
 * AbortSignal support. Keys never appear in errors, logs or spans.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { Duplex, type Readable, type Writable } from 'node:stream';
import type { Client, ConnectConfig, SFTPWrapper } from 'ssh2';

/**
 * A running remote command (what {@link SshClient.spawn} returns): a Duplex whose writable side is
 * the command's stdin and readable side its stdout, plus `stderr`. Events: 'close' (code, signal).
 * Declared here rather than as ssh2's ClientChannel so the published types need no @types/ssh2.
 */
export type ExecChannel = Duplex & { readonly stderr: Readable };
import { MicrovmError } from '../errors';
import { ssh2 } from './lazy';
import * as v from '../validate';

/** How the server's host key is checked. */
export type HostKeyPolicy =
  | { expected: string } // an OpenSSH public key line ("ssh-ed25519 AAAA...")
  | { knownHostsFile: string } // trust on first use, then pin
  | { insecureAcceptAny: true };

/** Options of {@link SshClient.connect}. */
export interface SshConnectOptions {
  host: string;
  port: number;
  username: string;
  /** OpenSSH or PEM private key text. */
  privateKey: string;
  hostKey: HostKeyPolicy;
  /** Handshake timeout in ms (10000). */
  readyTimeoutMs?: number;
  /**
   * Give up early when the server's "SSH-" identification line does not arrive within this many
   * ms. Behind a user-mode NAT (QEMU) a TCP connect succeeds before the guest is up, and such a
   * connection only fails at `readyTimeoutMs`; this lets a readiness probe fail fast instead.
   */
  bannerTimeoutMs?: number;
  signal?: AbortSignal;
}

/**
 * Connects, waits for the server's identification line, and returns a stream that replays what was
 * read and then passes the socket through (for ssh2's `sock` option).
 */
function connectWithBanner(host: string, port: number, timeoutMs: number, signal?: AbortSignal): Promise<Duplex> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port });
    socket.setNoDelay(true);
    let head = Buffer.alloc(0);
    let done = false;
    const fail = (err: Error): void => {
      if (done) return;
      done = true;
      signal?.removeEventListener('abort', onAbort);
      clearTimeout(timer);
      socket.destroy();
      reject(err);
    };
    const timer = setTimeout(
      () =>
        fail(
          Object.assign(new Error(`no SSH identification from ${host}:${port} within ${timeoutMs} ms`), {
            level: 'client-banner',
          }),
        ),
      timeoutMs,
    );
    const onAbort = (): void =>
      fail(
        signal?.reason instanceof Error ? signal.reason : new DOMException('The operation was aborted', 'AbortError'),
      );
    signal?.addEventListener('abort', onAbort, { once: true });
    socket.on('error', fail);
    socket.on('close', () => fail(new Error('connection closed before the SSH identification')));
    const onData = (chunk: Buffer): void => {
      head = Buffer.concat([head, chunk]);
      if (!head.includes(0x0a)) {
        if (head.length > 8192) fail(new Error('no SSH identification line in the first 8 KiB'));
        return;
      }
      done = true;
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      socket.removeListener('data', onData);
      socket.removeAllListeners('close');
      socket.removeListener('error', fail);
      socket.pause();
      const stream = new Duplex({
        read() {
          socket.resume();
        },
        write(c: Buffer, _enc, cb) {
          socket.write(c, cb);
        },
        final(cb) {
          socket.end();
          cb();
        },
        destroy(err, cb) {
          socket.destroy(err ?? undefined);
          cb(err);
        },
      });
      stream.push(head);
      socket.on('data', (c: Buffer) => {
        if (!stream.push(c)) socket.pause();
      });
      socket.on('end', () => stream.push(null));
      socket.on('error', (e) => stream.destroy(e));
      socket.on('close', () => stream.destroy());
      resolve(stream);
    };
    socket.on('data', onData);
  });
}

/** Result of {@link SshClient.exec}. */
export interface ExecResult {
  stdout: string;
  stderr: string;
  /** Exit code, or null when the command was killed by a signal. */
  exitCode: number | null;
  /** Signal name ("SIGTERM") when killed by one. */
  signal: string | null;
}

/** Options of {@link SshClient.exec}. */
export interface ExecOptions {
  signal?: AbortSignal;
  /** Written to the command's stdin, then closed. */
  stdin?: string | Buffer;
  /** Environment (many servers only accept a few variables; prefer `env K=V cmd`). */
  env?: Record<string, string>;
}

function keyBlob(line: string): Buffer {
  const parsed = ssh2().utils.parseKey(line);
  if (parsed instanceof Error || Array.isArray(parsed))
    throw v.typeError(`Expected one OpenSSH public key line for hostKey.expected`);
  return parsed.getPublicSSH();
}

function classify(err: Error & { level?: string }, hostKeyRejected: string | undefined, target: string): MicrovmError {
  if (hostKeyRejected)
    return new MicrovmError('ERR_MICROVM_SSH_HOSTKEY', `The host key of ${target} does not match: ${hostKeyRejected}`, {
      cause: err,
    });
  if (err.level === 'client-authentication')
    return new MicrovmError('ERR_MICROVM_SSH_AUTH', `SSH authentication to ${target} was refused`, { cause: err });
  if (err.level === 'client-timeout')
    return new MicrovmError('ERR_MICROVM_SSH_CONNECT', `SSH handshake with ${target} timed out`, { cause: err });
  return new MicrovmError('ERR_MICROVM_SSH_CONNECT', `SSH connection to ${target} failed: ${err.message}`, {
    cause: err,
  });
}

/** A connected SSH client. */
export class SshClient {
  readonly #conn: Client;
  readonly #target: string;
  #sftp: Promise<SFTPWrapper | undefined> | undefined;
  #closed = false;

  private constructor(conn: Client, target: string) {
    this.#conn = conn;
    this.#target = target;
    conn.on('close', () => {
      this.#closed = true;
    });
    conn.on('error', () => {
      /* reported to the pending operation */
    });
  }

  /** Connects and authenticates. Rejects with ERR_MICROVM_SSH_HOSTKEY / _AUTH / _CONNECT. */
  static connect(options: SshConnectOptions): Promise<SshClient> {
    const o = v.object('options', options);
    v.knownKeys('options', o, [
      'host',
      'port',
      'username',
      'privateKey',
      'hostKey',
      'readyTimeoutMs',
      'bannerTimeoutMs',
      'signal',
    ]);
    const bannerTimeoutMs =
      o.bannerTimeoutMs === undefined ? undefined : v.integer('bannerTimeoutMs', o.bannerTimeoutMs, 1, 600000);
    const host = v.string('host', o.host);
    const port = v.integer('port', o.port, 1, 65535);
    const username = v.string('username', o.username);
    const privateKey = v.string('privateKey', o.privateKey);
    const policy = v.object('hostKey', o.hostKey) as HostKeyPolicy;
    const target = `${username}@${host}:${port}`;
    const signal = options.signal;
    signal?.throwIfAborted();
    const knownHostsName = port === 22 ? host : `[${host}]:${port}`;
    let rejected: string | undefined;

    const hostVerifier = (key: Buffer): boolean => {
      if ('insecureAcceptAny' in policy) return true;
      const parsed = ssh2().utils.parseKey(key);
      const line =
        parsed instanceof Error || Array.isArray(parsed) ? undefined : `${parsed.type} ${key.toString('base64')}`;
      if ('expected' in policy) {
        if (keyBlob(policy.expected).equals(key)) return true;
        rejected = `expected ${policy.expected.split(' ').slice(0, 2).join(' ').slice(0, 60)}…, got ${line?.slice(0, 60) ?? 'an unknown key type'}…`;
        return false;
      }
      const file = v.absolutePath('hostKey.knownHostsFile', policy.knownHostsFile);
      const lines = fs.existsSync(file) ? fs.readFileSync(file, 'utf8').split('\n') : [];
      for (const l of lines) {
        const [name, type, b64] = l.trim().split(/\s+/);
        if (name !== knownHostsName || !type || !b64) continue;
        if (Buffer.from(b64, 'base64').equals(key)) return true;
        rejected = `${file} pins another ${type} key for ${knownHostsName}`;
        return false;
      }
      if (!line) {
        rejected = 'unsupported host key type';
        return false;
      }
      fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
      fs.appendFileSync(file, `${knownHostsName} ${line}\n`, { mode: 0o600 });
      return true;
    };

    const sockPromise =
      bannerTimeoutMs === undefined
        ? Promise.resolve(undefined)
        : connectWithBanner(host, port, bannerTimeoutMs, signal);
    return sockPromise.then(
      (sock) =>
        new Promise<SshClient>((resolve, reject) => {
          const conn = new (ssh2().Client)();
          let settled = false;
          const onAbort = (): void => {
            if (settled) return;
            settled = true;
            conn.end();
            reject(
              signal?.reason instanceof Error
                ? signal.reason
                : new DOMException('The operation was aborted', 'AbortError'),
            );
          };
          signal?.addEventListener('abort', onAbort, { once: true });
          conn.once('ready', () => {
            signal?.removeEventListener('abort', onAbort);
            if (settled) return;
            settled = true;
            resolve(new SshClient(conn, target));
          });
          // 'on', not 'once': ssh2 can emit several errors for one failed connection.
          conn.on('error', (err: Error & { level?: string }) => {
            signal?.removeEventListener('abort', onAbort);
            if (settled) return;
            settled = true;
            conn.end();
            reject(classify(err, rejected, target));
          });
          conn.once('close', () => {
            if (settled) return;
            settled = true;
            signal?.removeEventListener('abort', onAbort);
            reject(classify(new Error('connection closed during the handshake'), rejected, target));
          });
          const config: ConnectConfig = {
            host,
            port,
            username,
            privateKey,
            readyTimeout:
              o.readyTimeoutMs === undefined ? 10000 : v.integer('readyTimeoutMs', o.readyTimeoutMs, 1, 600000),
            hostVerifier,
            keepaliveInterval: 0,
          };
          if (sock) config.sock = sock;
          conn.connect(config);
          // The handshake is a series of small request/response messages: Nagle + delayed ACKs would
          // add ~40 ms to several of them.
          conn.setNoDelay(true);
        }),
      (err: Error & { level?: string }) => {
        if (err.name === 'AbortError') throw err;
        throw classify(err, undefined, target);
      },
    );
  }

  /** Whether the connection is closed. */
  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Starts `command` and returns its channel: stdout/stdin on it, `.stderr`, and 'close'
   * (code, signal) — use 'close' rather than 'exit', which may fire before you listen.
   */
  spawn(command: string, options: { env?: Record<string, string>; signal?: AbortSignal } = {}): Promise<ExecChannel> {
    v.string('command', command);
    options.signal?.throwIfAborted();
    return new Promise((resolve, reject) => {
      this.#conn.exec(command, { env: options.env }, (err, stream) => {
        if (err)
          return reject(
            new MicrovmError('ERR_MICROVM_SSH_EXEC', `Cannot run a command on ${this.#target}: ${err.message}`, {
              cause: err,
            }),
          );
        if (options.signal) {
          const onAbort = (): void => {
            stream.signal('KILL');
            stream.close();
          };
          options.signal.addEventListener('abort', onAbort, { once: true });
          stream.once('close', () => options.signal?.removeEventListener('abort', onAbort));
        }
        resolve(stream);
      });
    });
  }

  /** Runs `command` to completion and collects its output. */
  async exec(command: string, options: ExecOptions = {}): Promise<ExecResult> {
    const o = v.object('options', options);
    v.knownKeys('options', o, ['signal', 'stdin', 'env']);
    const stream = await this.spawn(command, { env: options.env, signal: options.signal });
    return new Promise((resolve, reject) => {
      const out: Buffer[] = [];
      const err: Buffer[] = [];
      let exitCode: number | null = null;
      let sig: string | null = null;
      stream.on('data', (d: Buffer) => out.push(d));
      stream.stderr.on('data', (d: Buffer) => err.push(d));
      stream.on('exit', (code: number | null, signalName?: string) => {
        exitCode = typeof code === 'number' ? code : null;
        sig = signalName ?? null;
      });
      // A fast command's exit status can arrive before these listeners exist; ssh2 repeats it as
      // the arguments of 'close'.
      stream.on('close', (code?: number | null, signalName?: string) => {
        if (exitCode === null && sig === null) {
          exitCode = typeof code === 'number' ? code : null;
          sig = typeof signalName === 'string' ? signalName : null;
        }
        if (options.signal?.aborted) {
          reject(
            options.signal.reason instanceof Error
              ? options.signal.reason
              : new DOMException('The operation was aborted', 'AbortError'),
          );
          return;
        }
        resolve({
          stdout: Buffer.concat(out).toString('utf8'),
          stderr: Buffer.concat(err).toString('utf8'),
          exitCode,
          signal: sig,
        });
      });
      stream.on('error', reject);
      if (options.stdin !== undefined) stream.end(options.stdin);
      else stream.end();
    });
  }

  #sftpSession(): Promise<SFTPWrapper | undefined> {
    // Some servers never answer an unsupported subsystem request: give up after 5 s and use exec.
    this.#sftp ??= new Promise((resolve) => {
      const timer = setTimeout(() => resolve(undefined), 5000);
      this.#conn.sftp((err, sftp) => {
        clearTimeout(timer);
        resolve(err ? undefined : sftp);
      });
    });
    return this.#sftp;
  }

  /** Copies a host file into the guest (SFTP, else `cat >`). */
  async copyTo(localPath: string, remotePath: string, options: { mode?: number } = {}): Promise<void> {
    v.absolutePath('localPath', localPath);
    v.string('remotePath', remotePath);
    const mode =
      options.mode === undefined
        ? fs.statSync(localPath).mode & 0o777
        : v.integer('options.mode', options.mode, 0, 0o7777);
    const sftp = await this.#sftpSession();
    if (sftp) {
      await new Promise<void>((resolve, reject) =>
        sftp.fastPut(localPath, remotePath, { mode }, (e) => (e ? reject(e) : resolve())),
      );
      return;
    }
    const q = shellQuote(remotePath);
    const stream = await this.spawn(`cat > ${q} && chmod ${mode.toString(8)} ${q}`);
    await pipeThrough(fs.createReadStream(localPath), stream, stream);
  }

  /**
   * Copies a guest file to the host (SFTP, else `cat`). Written to a temporary name beside
   * `localPath` and renamed: a failed copy leaves nothing (and never a truncated `localPath`).
   */
  async copyFrom(remotePath: string, localPath: string): Promise<void> {
    v.string('remotePath', remotePath);
    v.absolutePath('localPath', localPath);
    const tmp = path.join(
      path.dirname(localPath),
      `.${path.basename(localPath)}.microvm-${randomBytes(6).toString('hex')}`,
    );
    try {
      const sftp = await this.#sftpSession();
      if (sftp) {
        await new Promise<void>((resolve, reject) => sftp.fastGet(remotePath, tmp, (e) => (e ? reject(e) : resolve())));
      } else {
        const stream = await this.spawn(`cat ${shellQuote(remotePath)}`);
        stream.end();
        await pipeThrough(stream, fs.createWriteStream(tmp, { flags: 'wx', mode: 0o600 }), stream);
      }
      fs.renameSync(tmp, localPath);
    } catch (err) {
      fs.rmSync(tmp, { force: true });
      if (err instanceof MicrovmError) throw err;
      throw new MicrovmError(
        'ERR_MICROVM_SSH_COPY',
        `Copying ${remotePath} from the guest failed: ${(err as Error).message}`,
        { cause: err },
      );
    }
  }

  /** Closes the connection. Idempotent. */
  close(): void {
    if (!this.#closed) this.#conn.end();
    this.#closed = true;
  }
}

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** Pipes `from` into `to`; resolves when `channel` closed with exit code 0. */
function pipeThrough(from: Readable, to: Writable, channel: ExecChannel): Promise<void> {
  return new Promise((resolve, reject) => {
    let code: number | null = null;
    const errs: Buffer[] = [];
    channel.stderr.on('data', (d: Buffer) => {
      if (errs.length < 64) errs.push(d);
    });
    channel.on('exit', (c: number | null) => {
      code = c;
    });
    channel.on('close', (c?: number | null) => {
      if (code === null && typeof c === 'number') code = c;
    });
    from.on('error', reject);
    to.on('error', reject);
    const done = (): void =>
      code === 0
        ? resolve()
        : reject(
            new MicrovmError(
              'ERR_MICROVM_SSH_COPY',
              `copy failed (exit ${String(code)}): ${Buffer.concat(errs).toString().trim()}`,
            ),
          );
    if (to === channel) {
      channel.resume(); // drain its stdout, or it never ends and never closes
      channel.stderr.resume();
      channel.on('close', done);
    } else to.on('finish', () => (code === null ? channel.once('close', done) : done()));
    from.pipe(to);
  });
}
