/**
 * The host side of the agent channel against a FAKE GUEST AGENT (a TEST DOUBLE: a unix socket
 * server in this process speaking the guest's side of the protocol), for what a real guest does
 * not do: lie, flood, overrun its window, send hostile paths. The real agent is tested on real QEMU
 * boots in test/e2e/agent.test.ts.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { AgentClient } from '../../lib/agent/client';
import { execBuffered } from '../../lib/agent/exec';
import { copyOut, MAX_LISTING_NAME_BYTES, readFile } from '../../lib/agent/files';
import { attach, copyBetween } from '../../lib/cli/agent-commands';
import { FRAME, GUEST_PROTO, WINDOW } from '../../lib/agent/protocol';
import { MicroVM } from '../../lib/vm';
import { scratch } from '../helpers';
import { FakeGuest } from './fake-guest';

let s: ReturnType<typeof scratch>;
let server: net.Server;
let guests: FakeGuest[];
let sockPath: string;

beforeEach(async () => {
  s = scratch('microvm-agent-client-');
  sockPath = path.join(s.dir, 'agent.sock');
  guests = [];
  server = net.createServer((sock) => {
    const g = new FakeGuest(sock);
    guests.push(g);
    // Like the real agent: answer the host's hello with its nonce.
    void g.next(FRAME.HELLO).then((h) => {
      const { nonce } = JSON.parse(h.payload.toString()) as { nonce: string };
      g.send(FRAME.HELLO, 0, JSON.stringify({ proto: GUEST_PROTO, nonce, pid: 2, uptimeNs: 5e8, caps: ['exec'] }));
    });
  });
  await new Promise<void>((r) => server.listen(sockPath, r));
});
afterEach(async () => {
  for (const g of guests) g.sock.destroy();
  await new Promise((r) => server.close(r));
  s.cleanup();
});

async function connect(): Promise<[AgentClient, FakeGuest]> {
  const client = await AgentClient.connect(sockPath, { timeoutMs: 5000 });
  return [client, guests[guests.length - 1]];
}

describe('AgentClient against a fake guest agent (test double)', () => {
  test('hello: the nonce is checked; an unsolicited or stale hello does not count', async () => {
    server.removeAllListeners('connection');
    server.on('connection', (sock) => {
      const g = new FakeGuest(sock);
      guests.push(g);
      void g.next(FRAME.HELLO).then((h) => {
        const { nonce } = JSON.parse(h.payload.toString()) as { nonce: string };
        g.send(FRAME.HELLO, 0, JSON.stringify({ proto: GUEST_PROTO, nonce: '' })); // unsolicited
        g.send(FRAME.STDOUT, 4, 'left over from the last host');
        g.send(FRAME.HELLO, 0, JSON.stringify({ proto: GUEST_PROTO, nonce: 'stale' }));
        g.send(FRAME.HELLO, 0, JSON.stringify({ proto: GUEST_PROTO, nonce, pid: 9, uptimeNs: 123 }));
      });
    });
    const client = await AgentClient.connect(sockPath, { timeoutMs: 5000 });
    expect(client.hello).toEqual({ pid: 9, uptimeNs: 123, caps: [] });
    client.close();
  });

  test('an agent that (re)started after our hello went to its predecessor gets it again; the second answer is harmless', async () => {
    server.removeAllListeners('connection');
    server.on('connection', (sock) => {
      const g = new FakeGuest(sock);
      guests.push(g);
      void (async () => {
        await g.next(FRAME.HELLO); // the predecessor took it and died
        g.send(FRAME.HELLO, 0, JSON.stringify({ proto: GUEST_PROTO, nonce: '' })); // the new agent's own
        const again = await g.next(FRAME.HELLO);
        const { nonce } = JSON.parse(again.payload.toString()) as { nonce: string };
        g.send(FRAME.HELLO, 0, JSON.stringify({ proto: GUEST_PROTO, nonce, pid: 3, uptimeNs: 1 }));
        g.send(FRAME.HELLO, 0, JSON.stringify({ proto: GUEST_PROTO, nonce, pid: 3, uptimeNs: 2 })); // a duplicate
        const req = await g.next(FRAME.EXEC);
        g.send(FRAME.EXIT, req.stream, '{"code":0}');
      })();
    });
    const client = await AgentClient.connect(sockPath, { timeoutMs: 5000 });
    expect(client.hello.pid).toBe(3);
    await expect(execBuffered(client, ['true'])).resolves.toMatchObject({ exitCode: 0 });
    expect(client.closedReason).toBeUndefined();
    client.close();
  });

  test('no answer: ERR_MICROVM_AGENT_TIMEOUT; no socket: ERR_MICROVM_AGENT_UNAVAILABLE', async () => {
    server.removeAllListeners('connection');
    server.on('connection', (sock) => guests.push(new FakeGuest(sock)));
    await expect(AgentClient.connect(sockPath, { timeoutMs: 300 })).rejects.toMatchObject({
      code: 'ERR_MICROVM_AGENT_TIMEOUT',
    });
    await expect(AgentClient.connect(path.join(s.dir, 'none.sock'))).rejects.toMatchObject({
      code: 'ERR_MICROVM_AGENT_UNAVAILABLE',
    });
  });

  test('exec: argv and env go out as asked; stdout and stderr stay apart; the exit code comes back', async () => {
    const [client, g] = await connect();
    const result = execBuffered(client, ['echo', 'a b'], { env: { K: 'v' }, cwd: '/tmp', user: '1000' });
    const req = await g.next(FRAME.EXEC);
    expect(JSON.parse(req.payload.toString())).toMatchObject({
      argv: ['echo', 'a b'],
      env: ['K=v'],
      cwd: '/tmp',
      user: '1000',
      tty: null,
      stdin: false,
      window: WINDOW,
    });
    g.send(FRAME.STDOUT, req.stream, 'out');
    g.send(FRAME.STDERR, req.stream, 'err');
    g.send(FRAME.EXIT, req.stream, '{"code":3}');
    await expect(result).resolves.toEqual({ stdout: 'out', stderr: 'err', exitCode: 3, signal: null });
    const killed = execBuffered(client, 'sleep 9');
    const req2 = await g.next(FRAME.EXEC);
    expect(JSON.parse(req2.payload.toString()).argv).toEqual(['/bin/sh', '-c', 'sleep 9']);
    g.send(FRAME.EXIT, req2.stream, '{"signal":15}');
    await expect(killed).resolves.toMatchObject({ exitCode: null, signal: 'SIGTERM' });
    client.close();
  });

  test('output beyond the granted window ends the channel with ERR_MICROVM_AGENT_PROTOCOL', async () => {
    const [client, g] = await connect();
    const proc = client.spawn(['yes']);
    const req = await g.next(FRAME.EXEC);
    proc.stdout.pause(); // a reader that takes nothing: no grant
    const chunk = Buffer.alloc(65536, 0x79);
    for (let sent = 0; sent <= WINDOW; sent += chunk.length) g.send(FRAME.STDOUT, req.stream, chunk);
    await expect(proc.exited).rejects.toMatchObject({ code: 'ERR_MICROVM_AGENT_PROTOCOL' });
    expect(client.closedReason).toMatchObject({ code: 'ERR_MICROVM_AGENT_PROTOCOL' });
    expect(() => client.spawn(['true'])).toThrow(expect.objectContaining({ code: 'ERR_MICROVM_AGENT_PROTOCOL' }));
  });

  test('a slow reader: grants follow what it consumed, so a guest that respects them cannot run ahead', async () => {
    const [client, g] = await connect();
    const proc = client.spawn(['yes']);
    const req = await g.next(FRAME.EXEC);
    proc.stdout.pause();
    const chunk = Buffer.alloc(65536, 0x79);
    for (let i = 0; i < WINDOW / chunk.length; i++) g.send(FRAME.STDOUT, req.stream, chunk);
    await new Promise((r) => setTimeout(r, 100));
    // Paused above its high-water mark: at most what the stream buffered before it pushed back.
    const grantedWhilePaused = g.granted(req.stream);
    expect(grantedWhilePaused).toBeLessThan(WINDOW);
    let read = 0;
    proc.stdout.on('data', (d: Buffer) => (read += d.length));
    proc.stdout.resume();
    await new Promise((r) => setTimeout(r, 100));
    expect(read).toBe(WINDOW);
    expect(g.granted(req.stream)).toBe(WINDOW); // everything consumed was granted back
    g.send(FRAME.EXIT, req.stream, '{"code":0}');
    await expect(proc.exited).resolves.toEqual({ exitCode: 0, signal: null });
    client.close();
  });

  test('a frame for a stream that is not open, an unknown type, an oversized frame: protocol errors', async () => {
    for (const misdeed of [
      (g: FakeGuest) => g.send(FRAME.STDOUT, 77, 'x'),
      (g: FakeGuest) => g.send(42, 1, 'x'),
      (g: FakeGuest) => g.sock.write(Buffer.from([0, 0x10, 0, 0, FRAME.STDOUT, 0, 0, 0, 1])),
      (g: FakeGuest) => g.send(FRAME.HELLO, 0, JSON.stringify({ proto: GUEST_PROTO, nonce: '' })),
    ]) {
      const [client, g] = await connect();
      const proc = client.spawn(['true']);
      await g.next(FRAME.EXEC);
      misdeed(g);
      await expect(proc.exited).rejects.toMatchObject({ code: 'ERR_MICROVM_AGENT_PROTOCOL' });
    }
  });

  test('the channel closing (the VM died) fails what is in flight with ERR_MICROVM_AGENT_UNAVAILABLE', async () => {
    const [client, g] = await connect();
    const r = execBuffered(client, ['sleep', '100']);
    await g.next(FRAME.EXEC);
    g.sock.destroy();
    await expect(r).rejects.toMatchObject({ code: 'ERR_MICROVM_AGENT_UNAVAILABLE' });
  });

  test('timeout and abort kill the process group (SIGKILL to the guest) and reject with their reason', async () => {
    const [client, g] = await connect();
    const r = execBuffered(client, ['sleep', '100'], { timeoutMs: 50 });
    const req = await g.next(FRAME.EXEC);
    const sig = await g.next(FRAME.SIGNAL);
    expect([sig.stream, JSON.parse(sig.payload.toString())]).toEqual([req.stream, { signal: 9 }]);
    g.send(FRAME.EXIT, req.stream, '{"signal":9}');
    await expect(r).rejects.toMatchObject({ code: 'ERR_MICROVM_EXEC_TIMEOUT' });
    const ac = new AbortController();
    const r2 = execBuffered(client, ['sleep', '100'], { signal: ac.signal });
    const req2 = await g.next(FRAME.EXEC);
    ac.abort(new Error('caller gave up'));
    expect((await g.next(FRAME.SIGNAL)).stream).toBe(req2.stream);
    g.send(FRAME.EXIT, req2.stream, '{"signal":9}');
    await expect(r2).rejects.toThrow('caller gave up');
    client.close();
  });

  test('maxBuffer: more output than allowed kills the command with ERR_MICROVM_EXEC_MAX_BUFFER', async () => {
    const [client, g] = await connect();
    const r = execBuffered(client, ['yes'], { maxBuffer: 1000 });
    const req = await g.next(FRAME.EXEC);
    g.send(FRAME.STDOUT, req.stream, Buffer.alloc(1001));
    await g.next(FRAME.SIGNAL);
    g.send(FRAME.EXIT, req.stream, '{"signal":9}');
    await expect(r).rejects.toMatchObject({ code: 'ERR_MICROVM_EXEC_MAX_BUFFER' });
    client.close();
  });

  test('stdin is sent in frames within the guest grant and closed with EOF', async () => {
    const [client, g] = await connect();
    const proc = client.spawn(['cat'], { stdin: true });
    const req = await g.next(FRAME.EXEC);
    const big = Buffer.alloc(WINDOW + 1000, 0x61);
    proc.stdin?.end(big);
    await new Promise((r) => setTimeout(r, 100));
    const sent = () => g.frames.filter((f) => f.type === FRAME.DATA).reduce((n, f) => n + f.payload.length, 0);
    expect(sent()).toBe(WINDOW); // the rest waits for a grant
    expect(g.frames.some((f) => f.type === FRAME.EOF)).toBe(false);
    const grant = Buffer.alloc(4);
    grant.writeUInt32BE(4096, 0);
    g.send(FRAME.GRANT, req.stream, grant);
    await g.next(FRAME.EOF);
    expect(sent()).toBe(WINDOW + 1000);
    g.send(FRAME.EXIT, req.stream, '{"code":0}');
    await proc.exited;
    client.close();
  });
});

/** A directory outside the copy's destination that a guest's symlink points at. */
const OUTSIDE = fs.mkdtempSync(path.join(os.tmpdir(), 'microvm-outside-'));
afterAll(() => fs.rmSync(OUTSIDE, { recursive: true, force: true }));

describe('copyOut and readFile against a hostile fake guest (test double)', () => {
  /** Serves `list` with `entries` and every `get` with `content`. */
  function serveTree(g: FakeGuest, entries: object[], content = 'data'): void {
    const loop = async (): Promise<void> => {
      for (;;) {
        const f = await g.next(FRAME.OP);
        const op = JSON.parse(f.payload.toString()) as { op: string };
        if (op.op === 'list') for (const e of entries) g.send(FRAME.INFO, f.stream, JSON.stringify(e));
        if (op.op === 'get') {
          g.send(FRAME.INFO, f.stream, JSON.stringify({ p: '', t: 'f', m: 420, s: 4, u: 0, g: 0 }));
          g.send(FRAME.STDOUT, f.stream, content);
        }
        g.send(FRAME.EXIT, f.stream, '{"code":0}');
      }
    };
    void loop().catch(() => undefined);
  }
  const dir = { p: '', t: 'd', m: 0o755, s: 0, u: 0, g: 0 };
  const file = (p: string) => ({ p, t: 'f', m: 0o644, s: 4, u: 0, g: 0 });

  test('a well-formed tree arrives, modes and links as described', async () => {
    const [client, g] = await connect();
    serveTree(g, [
      dir,
      { ...dir, p: 'sub', m: 0o700 },
      file('sub/a'),
      { p: 'ln', t: 'l', m: 0o777, s: 1, u: 0, g: 0, l: '/etc/passwd' },
    ]);
    const dest = path.join(s.dir, 'out');
    await copyOut(client, '/srv', dest);
    expect(fs.readFileSync(path.join(dest, 'sub/a'), 'utf8')).toBe('data');
    expect(fs.statSync(path.join(dest, 'sub')).mode & 0o777).toBe(0o700);
    expect(fs.readlinkSync(path.join(dest, 'ln'))).toBe('/etc/passwd');
    client.close();
  });

  test.each([
    ['a name with ..', [dir, file('../escape')]],
    [
      'a file under a symlink it made',
      [dir, { p: 'ln', t: 'l', m: 0o777, s: 1, u: 0, g: 0, l: OUTSIDE }, file('ln/written-through-a-link')],
    ],
    ['the same name twice', [dir, file('a'), file('a')]],
    ['an absolute name', [dir, file('/etc/x')]],
    ['an entry before its directory', [dir, file('nodir/a')]],
    ['a NUL in a name', [dir, file('a\u0000b')]],
  ])('%s: ERR_MICROVM_COPY, and nothing is left on the host', async (_what, entries) => {
    const [client, g] = await connect();
    serveTree(g, entries);
    const dest = path.join(s.dir, 'out');
    await expect(copyOut(client, '/srv', dest)).rejects.toMatchObject({ code: 'ERR_MICROVM_COPY' });
    expect(fs.readdirSync(s.dir).sort()).toEqual(['agent.sock']);
    expect(fs.readdirSync(OUTSIDE)).toEqual([]); // nothing written through the guest's link
    client.close();
  });

  test('set-ID bits from the guest are dropped (kept only for root with keepSetId); mid-transfer only a private 0700 directory is there', async () => {
    const [client, g] = await connect();
    let release: () => void = () => undefined;
    const held = new Promise<void>((r) => (release = r));
    let asked: () => void = () => undefined;
    const getAsked = new Promise<void>((r) => (asked = r));
    const suid = { p: '', t: 'f', m: 0o4755, s: 4, u: 0, g: 0 };
    void (async () => {
      for (;;) {
        const f = await g.next(FRAME.OP);
        const op = JSON.parse(f.payload.toString()) as { op: string };
        if (op.op === 'list') g.send(FRAME.INFO, f.stream, JSON.stringify(suid));
        if (op.op === 'get') {
          g.send(FRAME.INFO, f.stream, JSON.stringify(suid));
          g.send(FRAME.STDOUT, f.stream, 'data');
          asked();
          await held;
        }
        g.send(FRAME.EXIT, f.stream, '{"code":0}');
      }
    })().catch(() => undefined);
    const out = path.join(s.dir, 'out');
    fs.mkdirSync(out);
    const copying = copyOut(client, '/bin/tool', path.join(out, 'tool'));
    await getAsked;
    // The file being written is inside a directory no one else may enter; nothing else is there yet.
    const inside = fs.readdirSync(out);
    expect(inside).toEqual([expect.stringMatching(/^\.microvm-copy-[0-9a-f]{12}$/)]);
    expect(fs.statSync(path.join(out, inside[0])).mode & 0o777).toBe(0o700);
    release();
    await copying;
    expect(fs.readdirSync(out)).toEqual(['tool']);
    expect(fs.statSync(path.join(out, 'tool')).mode & 0o7777).toBe(0o755);
    const root = process.getuid?.() === 0;
    await copyOut(client, '/bin/tool', path.join(out, 'kept'), { keepSetId: true });
    expect(fs.statSync(path.join(out, 'kept')).mode & 0o7777).toBe(root ? 0o4755 : 0o755);
    client.close();
  });

  test('more entries or bytes than the limits: ERR_MICROVM_COPY, the channel stays usable', async () => {
    const [client, g] = await connect();
    serveTree(g, [dir, file('a'), file('b'), file('c')]);
    await expect(copyOut(client, '/srv', path.join(s.dir, 'o1'), { maxEntries: 2 })).rejects.toThrow(/more than 2/);
    await expect(copyOut(client, '/srv', path.join(s.dir, 'o2'), { maxBytes: 6 })).rejects.toThrow(/maxBytes/);
    await expect(readFile(client, '/srv/a', 3)).rejects.toMatchObject({ code: 'ERR_MICROVM_COPY' });
    expect(client.closedReason).toBeUndefined();
    expect(fs.readdirSync(s.dir).sort()).toEqual(['agent.sock']);
    client.close();
  });
});

describe('MicroVM file operations against a stalling fake guest agent (test double)', () => {
  test('a signal walks away from a transfer the guest never answers; the next call reconnects', async () => {
    const [client, g] = await connect();
    const vm = new MicroVM(
      {
        id: 'id',
        name: 'stall',
        backend: 'fake',
        dataDir: s.dir,
        rootfsPath: '/r',
        cloneStrategy: 'copy',
        ports: [],
        consoleLogPath: '/dev/null',
        logPath: '/dev/null',
      },
      { pid: 1, executable: '/x', exited: new Promise(() => undefined), kill: () => true },
    );
    vm.attachAgent(sockPath, client);
    const ac = new AbortController();
    const reading = vm.readFile('/etc/hostname', { signal: ac.signal });
    await g.next(FRAME.OP); // asked, and never answered
    ac.abort(new Error('gave up waiting'));
    await expect(reading).rejects.toThrow('gave up waiting');
    expect(client.closedReason).toBeDefined();
    // A new lease connects again (a second fake guest connection) and works.
    const again = vm.readFile('/etc/hostname');
    await waitFor(() => guests.length === 2);
    const g2 = guests[1];
    const op = await g2.next(FRAME.OP);
    g2.send(FRAME.STDOUT, op.stream, 'name\n');
    g2.send(FRAME.EXIT, op.stream, '{"code":0}');
    await expect(again).resolves.toEqual(Buffer.from('name\n'));
    await expect(vm.readFile('/x', { signal: 'no' as never })).rejects.toThrow(
      'Expected an AbortSignal for options.signal',
    );
  });
});

async function waitFor(cond: () => boolean): Promise<void> {
  while (!cond()) await new Promise((r) => setTimeout(r, 10));
}

describe('a hostile agent cannot make a host wait forever or allocate without bound (test double)', () => {
  /** Sends INFO frames of `entries` on `stream` within the host's grants, as a well-behaved sender would. */
  async function sendWithinGrants(g: FakeGuest, stream: number, payloads: Buffer[]): Promise<void> {
    let sent = 0;
    for (const p of payloads) {
      while (sent + p.length > WINDOW + g.granted(stream)) {
        await new Promise((r) => setTimeout(r, 1));
        if (g.sock.destroyed) return;
      }
      g.send(FRAME.INFO, stream, p);
      sent += p.length;
    }
  }

  test('a listing entry with a path over 4096 characters is refused before it is kept', async () => {
    const [client, g] = await connect();
    const copying = copyOut(client, '/srv', path.join(s.dir, 'out'));
    const op = await g.next(FRAME.OP);
    g.send(FRAME.INFO, op.stream, JSON.stringify({ p: '', t: 'd', m: 0o755, s: 0, u: 0, g: 0 }));
    g.send(FRAME.INFO, op.stream, JSON.stringify({ p: 'x'.repeat(60_000), t: 'f', m: 0o644, s: 0, u: 0, g: 0 }));
    await expect(copying).rejects.toMatchObject({ code: 'ERR_MICROVM_COPY', message: expect.stringContaining('4096') });
    client.close();
  });

  test('a listing whose names add up past the budget is refused (ERR_MICROVM_COPY), however it is paced', async () => {
    const [client, g] = await connect();
    const copying = copyOut(client, '/srv', path.join(s.dir, 'out'));
    const op = await g.next(FRAME.OP);
    const entry = (i: number): Buffer =>
      Buffer.from(
        JSON.stringify({ p: `${String(i).padStart(8, '0')}${'n'.repeat(4000)}`, t: 'f', m: 0o644, s: 0, u: 0, g: 0 }),
      );
    const count = Math.ceil(MAX_LISTING_NAME_BYTES / 4008) + 10;
    const root = Buffer.from(JSON.stringify({ p: '', t: 'd', m: 0o755, s: 0, u: 0, g: 0 }));
    void sendWithinGrants(g, op.stream, [root, ...Array.from({ length: count }, (_, i) => entry(i))]).then(() =>
      g.send(FRAME.EXIT, op.stream, '{"code":0}'),
    );
    await expect(copying).rejects.toMatchObject({
      code: 'ERR_MICROVM_COPY',
      message: expect.stringContaining('names'),
    });
    expect(fs.readdirSync(s.dir).sort()).toEqual(['agent.sock']);
    client.close();
  });

  test('exec with timeoutMs against an agent that ignores the kill and never reports an exit: the timeout error all the same', async () => {
    const [client, g] = await connect();
    const r = execBuffered(client, ['sleep', '100'], { timeoutMs: 50 });
    await g.next(FRAME.EXEC);
    await g.next(FRAME.SIGNAL); // ignored: no EXIT ever comes
    await expect(r).rejects.toMatchObject({ code: 'ERR_MICROVM_EXEC_TIMEOUT' });
    expect(client.closedReason).toMatchObject({ code: 'ERR_MICROVM_AGENT_UNAVAILABLE' });
  });

  test('a transfer cancelled on a local failure (a full disk, a limit) ends even when the agent never acknowledges the cancel', async () => {
    const [client, g] = await connect();
    const reading = readFile(client, '/big', 3);
    const op = await g.next(FRAME.OP);
    g.send(FRAME.STDOUT, op.stream, 'more than three');
    await g.next(FRAME.SIGNAL); // the cancel; never answered
    await expect(reading).rejects.toMatchObject({ code: 'ERR_MICROVM_COPY' });
  });

  test('attach (microvm exec): a signal goes to the guest; when the agent ignores it we exit 128+N anyway, at once on a second one', async () => {
    const [client, g] = await connect();
    const proc = client.spawn(['sleep', '100']);
    await g.next(FRAME.EXEC);
    const waiting = attach(proc, { stdin: false, tty: false });
    process.emit('SIGTERM', 'SIGTERM');
    expect(JSON.parse((await g.next(FRAME.SIGNAL)).payload.toString())).toEqual({ signal: 15 });
    await expect(waiting).resolves.toBe(143); // after the grace, with no EXIT from the agent
    const proc2 = client.spawn(['sleep', '100']);
    await g.next(FRAME.EXEC);
    const again = attach(proc2, { stdin: false, tty: false });
    process.emit('SIGINT', 'SIGINT');
    process.emit('SIGINT', 'SIGINT');
    await expect(again).resolves.toBe(130);
    client.close();
  });

  test('microvm cp interrupted while the agent stalls: the copy ends at once and nothing partial is left', async () => {
    const [client, g] = await connect();
    const ac = new AbortController();
    const dest = path.join(s.dir, 'dest');
    const copying = copyBetween({ vm: 'x', path: '/srv' }, { host: dest }, async () => client, ac.signal);
    const list = await g.next(FRAME.OP);
    g.send(FRAME.INFO, list.stream, JSON.stringify({ p: '', t: 'f', m: 0o644, s: 1, u: 0, g: 0 }));
    g.send(FRAME.EXIT, list.stream, '{"code":0}');
    await g.next(FRAME.OP); // the get: never answered
    ac.abort();
    await expect(copying).rejects.toMatchObject({ name: 'AbortError' });
    expect(fs.readdirSync(s.dir).sort()).toEqual(['agent.sock']);
  });
});
