/**
 * The egress allow-list's relay (lib/network/egress.ts): QEMU starts one per guest connection to an
 * allowed host's virtual address and port, with that connection as its stdin and stdout:
 *
 *   node relay.js HOST PORT ADDRESS|- LOG
 *
 * It connects to ADDRESS (or HOST, resolved on the host) at PORT, and nowhere else, within 10 s,
 * copies both ways until both sides are done, and appends one JSON line to LOG (0600) per
 * connection: {time, host, port, address, ok, error?, bytesIn?, bytesOut?}. What the guest sends is
 * never parsed; the log holds no payload.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';

const CONNECT_TIMEOUT_MS = 10_000;

function main(argv: string[]): void {
  const [host, portText, addressArg, log] = argv;
  const port = Number(portText);
  if (!host || !log || !Number.isInteger(port) || port < 1 || port > 65535) {
    process.stderr.write('usage: relay.js HOST PORT ADDRESS|- LOG\n');
    process.exit(2);
  }
  const address = addressArg && addressArg !== '-' ? addressArg : undefined;
  const started = Date.now();
  let written = false;
  const record = (entry: Record<string, unknown>): void => {
    if (written) return;
    written = true;
    const line = `${JSON.stringify({ time: new Date(started).toISOString(), host, port, address: address ?? null, ...entry })}\n`;
    try {
      fs.appendFileSync(log, line, { mode: 0o600 });
    } catch {
      // the VM's directory is gone: nobody to tell
    }
  };
  const guest = new net.Socket({ fd: 0, readable: true, writable: true });
  const upstream = net.connect({ host: address ?? host, port });
  const timer = setTimeout(
    () => upstream.destroy(new Error(`no connection within ${CONNECT_TIMEOUT_MS} ms`)),
    CONNECT_TIMEOUT_MS,
  );
  let bytesIn = 0;
  let bytesOut = 0;
  upstream.once('connect', () => {
    clearTimeout(timer);
    guest.on('data', (b: Buffer) => (bytesOut += b.length));
    upstream.on('data', (b: Buffer) => (bytesIn += b.length));
    guest.pipe(upstream);
    upstream.pipe(guest);
  });
  upstream.once('error', (err: NodeJS.ErrnoException) => {
    clearTimeout(timer);
    record({ ok: false, error: err.code ?? err.message });
    guest.destroy();
    process.exitCode = 1;
  });
  guest.once('error', () => upstream.destroy());
  upstream.once('close', () => {
    record({ ok: true, bytesIn, bytesOut, ms: Date.now() - started });
    guest.end();
  });
  guest.once('close', () => upstream.destroy());
}

main(process.argv.slice(2));
