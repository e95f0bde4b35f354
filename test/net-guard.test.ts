/**
 * The egress filter (native/preload/net_guard.cc) on the host, preloaded into a Node process the way the
 * QEMU backend preloads it into QEMU: real sockets on loopback addresses (127.0.0.0/8 is all local
 * on Linux), a real DNS server made here as the resolver. What libslirp calls (connect, sendto,
 * sendmsg, recvfrom, recvmsg) libuv calls too. The same filter inside real QEMU boots:
 * test/e2e/egress-rules.test.ts.
 */
import { execFileSync, spawn } from 'node:child_process';
import * as dgram from 'node:dgram';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { guardPolicy, parseEgress } from '../lib/network/egress';
import { netGuardPath } from '../lib/backends/qemu';
import { scratch } from './helpers';

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-netguard-');
});
afterEach(() => s.cleanup());

/** A DNS question for `name` (type A), id `id`. */
function question(name: string, id: number): Buffer {
  const labels = name.split('.').map((l) => Buffer.concat([Buffer.from([l.length]), Buffer.from(l)]));
  return Buffer.concat([
    Buffer.from([id >> 8, id & 255, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]),
    ...labels,
    Buffer.from([0, 0, 1, 0, 1]),
  ]);
}

/** A resolver on 127.0.0.1: every question gets one A record, `answer` (TTL 300); records what it was asked. */
async function resolver(
  answerFor: string | ((name: string) => string),
): Promise<{ port: number; asked: string[]; close: () => void }> {
  const sock = dgram.createSocket('udp4');
  const asked: string[] = [];
  sock.on('message', (q, from) => {
    let i = 12;
    const parts: string[] = [];
    while (q[i]) {
      parts.push(q.subarray(i + 1, i + 1 + q[i]).toString());
      i += 1 + q[i];
    }
    asked.push(parts.join('.'));
    const answer = typeof answerFor === 'string' ? answerFor : answerFor(parts.join('.'));
    const head = Buffer.from(q.subarray(0, 12));
    head[2] = 0x81;
    head[3] = 0x80;
    head.writeUInt16BE(1, 6);
    const rr = Buffer.from([0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, ...answer.split('.').map(Number)]);
    sock.send(Buffer.concat([head, q.subarray(12, i + 5), rr]), from.port, from.address);
  });
  await new Promise<void>((r) => sock.bind(0, '127.0.0.1', r));
  return { port: sock.address().port, asked, close: () => sock.close() };
}

// Runs in the preloaded child: services on 127.0.0.5 and 127.0.0.6, then each step in order;
// prints one JSON array of what each step saw.
const CHILD = `
const net = require('net'), dgram = require('dgram');
const steps = JSON.parse(process.argv[process.argv.length - 1]);
const listen = (host) => new Promise((r) => { const srv = net.createServer((c) => c.end(host)).listen(0, host, () => r(srv.address().port)); });
const connect = (host, port) => new Promise((r) => { const c = net.connect(port, host); let d = ''; c.on('data', (x) => (d += x)); c.on('end', () => r('ok ' + d)); c.on('error', (e) => r('error ' + e.code)); });
const ask = (q, server, port) => new Promise((r) => {
  const sock = dgram.createSocket(server.includes(':') ? 'udp6' : 'udp4');
  const t = setTimeout(() => (sock.close(), r({ timeout: true })), 3000);
  sock.on('message', (m, from) => { clearTimeout(t); sock.close(); r({ from: from.address + ':' + from.port, rcode: m[3] & 15, answers: m.readUInt16BE(6), a: m.readUInt16BE(6) ? [...m.subarray(m.length - 4)].join('.') : null }); });
  sock.send(Buffer.from(q, 'hex'), port, server, (err) => { if (err) { clearTimeout(t); sock.close(); r({ sendError: err.code }); } });
});
(async () => {
  const ports = { '127.0.0.5': await listen('127.0.0.5'), '127.0.0.6': await listen('127.0.0.6') };
  const out = [];
  for (const st of steps) {
    if (st.connect) out.push(await connect(st.connect, ports[st.connect]));
    if (st.ask) out.push(await ask(st.ask, st.server, st.port));
    if (st.datagram) out.push(await new Promise((r) => { const u = dgram.createSocket('udp4'); u.send('x', st.port, st.datagram, (e) => { u.close(); r(e ? 'error ' + e.code : 'sent'); }); }));
  }
  console.log(JSON.stringify(out));
  process.exit(0);
})();
`;

// Not spawnSync: the resolver answers from this process's event loop meanwhile.
async function runGuarded(
  policyText: string,
  steps: unknown[],
): Promise<{ out: unknown[]; ready: string; log: Record<string, unknown>[] }> {
  const policy = path.join(s.dir, 'policy');
  fs.writeFileSync(policy, policyText, { mode: 0o600 });
  const child = spawn(process.execPath, ['-e', CHILD, JSON.stringify(steps)], {
    env: { ...process.env, LD_PRELOAD: netGuardPath(), MICROVM_NETGUARD_POLICY: policy },
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const timer = setTimeout(() => child.kill('SIGKILL'), 30000);
  const status = await new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  clearTimeout(timer);
  if (status !== 0) throw new Error(`child failed (${status}): ${stderr}`);
  const r = { stdout };
  const logFile = path.join(s.dir, 'egress.log');
  return {
    out: JSON.parse(r.stdout) as unknown[],
    ready: fs.existsSync(path.join(s.dir, 'ready')) ? fs.readFileSync(path.join(s.dir, 'ready'), 'utf8') : '',
    log: fs.existsSync(logFile)
      ? fs
          .readFileSync(logFile, 'utf8')
          .trim()
          .split('\n')
          .map((l) => JSON.parse(l) as Record<string, unknown>)
      : [],
  };
}

const files = (): { log: string; ready: string } => ({
  log: path.join(s.dir, 'egress.log'),
  ready: path.join(s.dir, 'ready'),
});
const policyOf = (egress: unknown): string =>
  guardPolicy(parseEgress(egress) as Exclude<ReturnType<typeof parseEgress>, string>, files());

test('CIDR rules: the allowed address connects, another is refused at once; deny wins; each decision logged with its rule', async () => {
  const r = await runGuarded(
    policyOf({ allow: [{ cidr: '127.0.0.0/29', protocol: 'tcp' }], deny: [{ cidr: '127.0.0.6' }] }),
    [
      { connect: '127.0.0.5' },
      { connect: '127.0.0.6' },
      { datagram: '127.0.0.5', port: 9 }, // UDP: the allow rule says tcp
    ],
  );
  expect(r.ready).toBe('ok\n');
  expect(r.out).toEqual(['ok 127.0.0.5', 'error ECONNREFUSED', 'error EACCES']);
  expect(r.log).toEqual([
    expect.objectContaining({
      address: '127.0.0.5',
      ok: true,
      rule: 'egress.allow[0]',
      protocol: 'tcp',
      kind: 'connect',
    }),
    expect.objectContaining({ address: '127.0.0.6', ok: false, error: 'ECONNREFUSED', rule: 'egress.deny[0]' }),
    expect.objectContaining({
      address: '127.0.0.5',
      port: 9,
      ok: false,
      rule: 'host', // the host itself, and no rule names it for UDP
      protocol: 'udp',
      kind: 'datagram',
    }),
  ]);
  expect(fs.statSync(path.join(s.dir, 'egress.log')).mode & 0o777).toBe(0o600);
});

test('deny rules alone: everything else is allowed, but not the host itself', async () => {
  const r = await runGuarded(policyOf({ deny: [{ cidr: '192.0.2.6/32', port: 1 }, { cidr: '192.0.2.6/32' }] }), [
    { datagram: '192.0.2.5', port: 9 },
    { datagram: '192.0.2.6', port: 9 },
    { connect: '127.0.0.5' },
  ]);
  expect(r.out[0]).not.toBe('error EACCES'); // allowed: sent (or no route here), never refused
  expect(r.out.slice(1)).toEqual(['error EACCES', 'error ECONNREFUSED']);
  expect(r.log).toEqual([
    expect.objectContaining({ address: '192.0.2.6', ok: false, rule: 'egress.deny[1]' }),
    expect.objectContaining({ address: '127.0.0.5', ok: false, rule: 'host' }),
  ]);
});

test("the host is reachable only through an address rule that names it: not a default route, not a name's answer, and 10.0.2.2 or fec0::2 in a rule stand for it", async () => {
  const named = await runGuarded(policyOf({ allow: [{ cidr: '127.0.0.5' }] }), [
    { connect: '127.0.0.5' },
    { connect: '127.0.0.6' },
  ]);
  expect(named.out).toEqual(['ok 127.0.0.5', 'error ECONNREFUSED']);
  const everything = await runGuarded(policyOf({ allow: [{ cidr: '0.0.0.0/0' }] }), [{ connect: '127.0.0.5' }]);
  expect(everything.out).toEqual(['error ECONNREFUSED']);
  // QEMU's gateway stands for the host: a rule on 10.0.2.2 (or a network holding it) is one on 127.0.0.1.
  expect(policyOf({ deny: [{ cidr: '10.0.2.2' }, { cidr: 'fec0::/64', port: 22 }] }).split('\n')).toEqual(
    expect.arrayContaining([
      'rule deny cidr 10.0.2.2/32 0 any egress.deny[0]',
      'rule deny cidr 127.0.0.1/32 0 any egress.deny[0]',
      'rule deny cidr fec0::/64 22 any egress.deny[1]',
      'rule deny cidr ::1/128 22 any egress.deny[1]',
    ]),
  );
  expect(policyOf({ allow: [{ cidr: '10.0.2.0/24' }] })).toContain(
    'rule allow cidr 127.0.0.1/32 0 any egress.allow[0]',
  );
  expect(policyOf({ allow: [{ cidr: '10.0.0.0/8' }, { cidr: '0.0.0.0/0' }] })).not.toContain('127.0.0.1');
  const gateway = await runGuarded(policyOf({ allow: [{ cidr: '10.0.2.0/24' }] }), [{ connect: '127.0.0.5' }]);
  expect(gateway.out).toEqual(['error ECONNREFUSED']); // 127.0.0.1 is opened, not the rest of 127/8
});

test("DNS: an allowed name goes to the resolver and its answer opens its address (never the host's); refused names get NXDOMAIN here, whatever server was asked", async () => {
  const dns = await resolver((name) => (name.startsWith('loop.') ? '127.0.0.5' : '192.0.2.5'));
  try {
    const r = await runGuarded(
      policyOf({ allow: [{ host: '*.svc.test' }], deny: [{ host: 'bad.svc.test' }], dns: `127.0.0.1:${dns.port}` }),
      [
        { datagram: '192.0.2.5', port: 9 }, // before any answer: no rule opens it
        { ask: question('a.svc.test', 7).toString('hex'), server: '127.0.0.1', port: 53 },
        { datagram: '192.0.2.5', port: 9 }, // learned for a.svc.test
        { datagram: '192.0.2.6', port: 9 },
        { ask: question('bad.svc.test', 8).toString('hex'), server: '192.0.2.53', port: 53 },
        { ask: question('elsewhere.test', 9).toString('hex'), server: '127.0.0.1', port: 53 },
        { ask: question('svc.test', 10).toString('hex'), server: '127.0.0.1', port: 53 }, // *. is below only
        { ask: question('v6.other.test', 11).toString('hex'), server: '::1', port: 53 }, // from an IPv6 socket
        { ask: question('loop.svc.test', 12).toString('hex'), server: '127.0.0.1', port: 53 }, // answered: 127.0.0.5
        { connect: '127.0.0.5' }, // ...which stays closed: the host itself
      ],
    );
    expect(r.out[0]).toBe('error EACCES');
    expect(r.out[2]).not.toBe('error EACCES');
    expect([r.out[1], ...r.out.slice(3)]).toEqual([
      { from: '127.0.0.1:53', rcode: 0, answers: 1, a: '192.0.2.5' },
      'error EACCES',
      { from: '192.0.2.53:53', rcode: 3, answers: 0, a: null },
      { from: '127.0.0.1:53', rcode: 3, answers: 0, a: null },
      { from: '127.0.0.1:53', rcode: 3, answers: 0, a: null },
      { from: '::1:53', rcode: 3, answers: 0, a: null },
      { from: '127.0.0.1:53', rcode: 0, answers: 1, a: '127.0.0.5' },
      'error ECONNREFUSED',
    ]);
    // Only the allowed questions reached the resolver.
    expect(dns.asked).toEqual(['a.svc.test', 'loop.svc.test']);
    expect(r.log.filter((e) => e.kind === 'dns')).toEqual([
      expect.objectContaining({ host: 'a.svc.test', ok: true, rule: 'egress.allow[0]' }),
      expect.objectContaining({ host: 'bad.svc.test', ok: false, error: 'ENOTFOUND', rule: 'egress.deny[0]' }),
      expect.objectContaining({ host: 'elsewhere.test', ok: false, rule: 'default' }),
      expect.objectContaining({ host: 'svc.test', ok: false, rule: 'default' }),
      expect.objectContaining({ host: 'v6.other.test', ok: false, rule: 'default' }),
      expect.objectContaining({ host: 'loop.svc.test', ok: true, rule: 'egress.allow[0]' }),
    ]);
    expect(r.log.find((e) => e.kind === 'connect')).toMatchObject({ address: '127.0.0.5', ok: false, rule: 'host' });
  } finally {
    dns.close();
  }
});

test('hostile questions: malformed or odd names are refused, not forwarded, and the process lives', async () => {
  const dns = await resolver('127.0.0.5');
  try {
    const odd = question('a.svc.test', 1);
    odd[13] = 0x22; // a quote inside the first label
    const compressed = Buffer.concat([
      Buffer.from([0, 2, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]),
      Buffer.from([0xc0, 12, 0, 1, 0, 1]),
    ]);
    const r = await runGuarded(policyOf({ deny: [], allow: [{ host: '*.svc.test' }], dns: `127.0.0.1:${dns.port}` }), [
      { ask: odd.toString('hex'), server: '127.0.0.1', port: 53 },
      { ask: compressed.toString('hex'), server: '127.0.0.1', port: 53 },
      { ask: '00', server: '127.0.0.1', port: 53 },
    ]);
    expect(r.out).toEqual([{ sendError: 'EACCES' }, { sendError: 'EACCES' }, { sendError: 'EACCES' }]);
    expect(dns.asked).toEqual([]);
    expect(r.log.map((e) => [e.host, e.rule])).toEqual([
      ['-', 'malformed'],
      ['-', 'malformed'],
      ['-', 'malformed'],
    ]);
  } finally {
    dns.close();
  }
});

test('a policy it cannot read: it says so, and refuses every connection (fail closed)', async () => {
  const r = await runGuarded(
    `default deny\nready ${path.join(s.dir, 'ready')}\nrule allow cidr 127.0.0.0/8 0 any x\nnonsense\n`,
    [{ connect: '127.0.0.5' }],
  );
  expect(r.ready).toBe('error unreadable line\n');
  expect(r.out).toEqual(['error ECONNREFUSED']);
});

test('sendmmsg (several datagrams in one call) goes through the same verdicts, message by message', async () => {
  const src = path.join(s.dir, 'mmsg.c');
  fs.writeFileSync(
    src,
    `#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
int main(void) {
  int fd = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in to[2];
  struct iovec iov = {"x", 1};
  struct mmsghdr m[2];
  memset(m, 0, sizeof m);
  for (int i = 0; i < 2; i++) {
    memset(&to[i], 0, sizeof to[i]);
    to[i].sin_family = AF_INET;
    to[i].sin_port = htons(9);
    inet_pton(AF_INET, i == 0 ? "127.0.0.5" : "127.0.0.6", &to[i].sin_addr);
    m[i].msg_hdr.msg_name = &to[i];
    m[i].msg_hdr.msg_namelen = sizeof to[i];
    m[i].msg_hdr.msg_iov = &iov;
    m[i].msg_hdr.msg_iovlen = 1;
  }
  printf("%d\\n", sendmmsg(fd, m, 2, 0));
  return 0;
}
`,
  );
  const exe = path.join(s.dir, 'mmsg');
  execFileSync('cc', ['-o', exe, src]);
  const policy = path.join(s.dir, 'policy');
  fs.writeFileSync(policy, policyOf({ allow: [{ cidr: '127.0.0.5', protocol: 'udp' }] }), { mode: 0o600 });
  const out = execFileSync(exe, {
    encoding: 'utf8',
    env: { LD_PRELOAD: netGuardPath(), MICROVM_NETGUARD_POLICY: policy },
  });
  expect(out).toBe('1\n'); // the first went, the second was refused
  const log = fs.readFileSync(path.join(s.dir, 'egress.log'), 'utf8').trim().split('\n');
  expect(log.map((l) => JSON.parse(l) as Record<string, unknown>)).toEqual([
    expect.objectContaining({ address: '127.0.0.6', port: 9, ok: false, kind: 'datagram', protocol: 'udp' }),
  ]);
});
