/**
 * The egress allow-list's relay (lib/network/egress.ts): ONE process per VM, started beside QEMU
 * (and dying with it), listening on a unix socket in the VM's directory:
 *
 *   node relay.js (SOCKET | --fd N) RULES LOG
 *
 * For each guest connection to an allowed name's virtual address and port, QEMU starts
 * `microvm-runner --relay-connect SOCKET N` (native/runner/runner.cc), which says "N\n" — the index of the
 * rule in RULES, a JSON list of `{host, port, address}` — and then only copies bytes. The relay
 * connects to that rule's address (or host, resolved on the host) at its port, and nowhere else,
 * within 10 s, copies both ways until both sides are done, and appends one JSON line to LOG (0600)
 * per connection: {time, host, port, address, ok, error?, bytesIn?, bytesOut?, ms?, closed?}. What
 * the guest sends is never parsed; the log holds no payload.
 *
 * Bounded per VM: at most MICROVM_RELAY_MAX_CONNECTIONS (64) connections at once — beyond that
 * each is refused and logged —, and a connection that moved no byte either way for
 * MICROVM_RELAY_IDLE_MS (300000) is closed and logged (`closed: "idle"`). A guest holding many
 * connections costs the host one relay and one small copier process per open connection.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';

const CONNECT_TIMEOUT_MS = 10_000;
/** How long the copier has to say which rule it serves. */
const HELLO_TIMEOUT_MS = 5_000;

interface Rule {
  host: string;
  port: number;
  address: string | null;
}

function intEnv(name: string, fallback: number, min: number, max: number): number {
  const text = process.env[name];
  const n = text === undefined ? fallback : Number(text);
  return Number.isInteger(n) && n >= min && n <= max ? n : fallback;
}

function readRules(file: string): Rule[] {
  const list = JSON.parse(fs.readFileSync(file, 'utf8')) as unknown;
  if (!Array.isArray(list) || list.length === 0 || list.length > 1024) throw new Error('bad rules');
  return list.map((r: Partial<Rule>) => {
    if (
      typeof r.host !== 'string' ||
      !Number.isInteger(r.port) ||
      (r.address !== null && typeof r.address !== 'string')
    )
      throw new Error('bad rule');
    return { host: r.host, port: r.port as number, address: r.address ?? null };
  });
}

function main(argv: string[]): void {
  // `--fd N`: the launcher made the listening socket (native/runner/qemu_launch.cc); else a path.
  const listenFd = argv[0] === '--fd' ? Number(argv[1]) : undefined;
  const [socketPath, rulesFile, log] = listenFd === undefined ? argv : ['', argv[2], argv[3]];
  if (
    (listenFd === undefined && !socketPath) ||
    (listenFd !== undefined && !Number.isInteger(listenFd)) ||
    !rulesFile ||
    !log
  ) {
    process.stderr.write('usage: relay.js (SOCKET | --fd N) RULES LOG\n');
    process.exit(2);
  }
  const rules = readRules(rulesFile);
  const maxOpen = intEnv('MICROVM_RELAY_MAX_CONNECTIONS', 64, 1, 100_000);
  const idleMs = intEnv('MICROVM_RELAY_IDLE_MS', 300_000, 50, 86_400_000);
  let open = 0;
  const append = (line: Record<string, unknown>): void => {
    try {
      fs.appendFileSync(log, `${JSON.stringify(line)}\n`, { mode: 0o600 });
    } catch {
      // the VM's directory is gone: nobody to tell
    }
  };

  const serve = (guest: net.Socket, rule: Rule): void => {
    const started = Date.now();
    const base = { time: new Date(started).toISOString(), host: rule.host, port: rule.port, address: rule.address };
    if (open >= maxOpen) {
      append({ ...base, ok: false, error: `refused: ${maxOpen} connections open` });
      guest.destroy();
      return;
    }
    open++;
    let written = false;
    const record = (entry: Record<string, unknown>): void => {
      if (written) return;
      written = true;
      open--;
      append({ ...base, ...entry });
    };
    const upstream = net.connect({ host: rule.address ?? rule.host, port: rule.port });
    const timer = setTimeout(
      () => upstream.destroy(new Error(`no connection within ${CONNECT_TIMEOUT_MS} ms`)),
      CONNECT_TIMEOUT_MS,
    );
    let bytesIn = 0;
    let bytesOut = 0;
    let closed: string | undefined;
    upstream.once('connect', () => {
      clearTimeout(timer);
      guest.on('data', (b: Buffer) => (bytesOut += b.length));
      upstream.on('data', (b: Buffer) => (bytesIn += b.length));
      guest.pipe(upstream);
      upstream.pipe(guest);
      guest.resume();
      // Both directions pass through the guest's socket: no byte on it for idleMs is idle both ways.
      guest.setTimeout(idleMs, () => {
        closed = 'idle';
        upstream.destroy();
        guest.destroy();
      });
    });
    upstream.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      record({ ok: false, error: (err.code ?? err.message).slice(0, 60) });
      guest.destroy();
    });
    guest.once('error', () => upstream.destroy());
    upstream.once('close', () => {
      clearTimeout(timer);
      record({ ok: true, bytesIn, bytesOut, ms: Date.now() - started, ...(closed ? { closed } : {}) });
      guest.end();
    });
    guest.once('close', () => upstream.destroy());
  };

  const server = net.createServer({ pauseOnConnect: true }, (guest) => {
    guest.on('error', () => undefined);
    let head = Buffer.alloc(0);
    const hello = setTimeout(() => guest.destroy(), HELLO_TIMEOUT_MS);
    const onData = (b: Buffer): void => {
      head = Buffer.concat([head, b]);
      const nl = head.indexOf(0x0a);
      if (nl < 0) {
        if (head.length > 9) guest.destroy();
        return;
      }
      clearTimeout(hello);
      guest.off('data', onData);
      guest.pause();
      const index = /^\d{1,8}$/.test(head.subarray(0, nl).toString('latin1')) ? Number(head.subarray(0, nl)) : -1;
      const rule = rules[index];
      if (!rule) {
        guest.destroy();
        return;
      }
      if (nl + 1 < head.length) guest.unshift(head.subarray(nl + 1));
      serve(guest, rule);
    };
    guest.on('data', onData);
    guest.once('close', () => clearTimeout(hello));
    guest.resume();
  });
  if (listenFd !== undefined) server.listen({ fd: listenFd });
  else {
    fs.rmSync(socketPath, { force: true });
    const mask = process.umask(0o177); // the socket: this user's only
    server.listen(socketPath, () => process.umask(mask));
  }
  server.on('error', (err) => {
    process.stderr.write(`microvm relay: ${err.message}\n`);
    process.exit(1);
  });
}

main(process.argv.slice(2));
