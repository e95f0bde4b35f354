/**
 * The egress policy on real QEMU boots, against a server this test creates on the host (reached
 * from the guest as 10.0.2.2, QEMU user networking's address of the host): 'allow' reaches it,
 * 'deny' reaches nothing, and a published port still answers under 'deny'. Never any outside address.
 */
import * as dgram from 'node:dgram';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as path from 'node:path';
import { libkrunBackend, type MicroVM, run, type RunOptions } from '../../lib';
import { doubleDir, firmwareDir, qemuSkipReason, scratch } from '../helpers';

const skip = qemuSkipReason();
process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;

let s: ReturnType<typeof scratch>;
let server: http.Server;
let port: number;
const vms: MicroVM[] = [];
beforeEach(async () => {
  s = scratch('microvm-egress-');
  server = http.createServer((_req, res) => res.end('host-secret'));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  port = (server.address() as { port: number }).port;
});
afterEach(async () => {
  for (const vm of vms.splice(0)) await vm.remove().catch(() => undefined);
  await new Promise((r) => server.close(r));
  s.cleanup();
});

const base = (extra: RunOptions = {}): RunOptions => ({
  rootfsPath: process.env.MICROVM_TEST_IMAGE,
  backend: 'qemu',
  dataDir: path.join(s.dir, 'data'),
  initOverride: ['/bin/sleep', '600'],
  ...extra,
});
// busybox nc (its static wget crashes resolving a service name); the body is the last line.
const fetchFromGuest = (host: string) =>
  `printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 nc ${host} ${port} > /tmp/got; st=$?; printf '%s exit=%s\\n' "$(tail -n 1 /tmp/got)" $st`;

(skip ? describe.skip : describe)(`egress policy, real VMs${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  test("'allow' (the default) reaches a host service; 'deny' reaches nothing, by address or by the resolver", async () => {
    const open = await run('egress', base({ name: 'open' }));
    vms.push(open);
    expect((await open.exec(fetchFromGuest('10.0.2.2'))).stdout).toBe('host-secret exit=0\n');
    const closed = await run('egress', base({ name: 'closed', egress: 'deny' }));
    vms.push(closed);
    const r = await closed.exec(fetchFromGuest('10.0.2.2'));
    expect(r.stdout).not.toContain('host-secret');
    expect(r.stdout).toMatch(/^ exit=[1-9]\d*\n$/); // nc failed (refused or timed out): nothing came back
    // QEMU's DNS relay is cut off too.
    expect((await closed.exec('nslookup localhost 10.0.2.3 >/dev/null 2>&1; echo $?')).stdout).not.toBe('0\n');
  }, 120_000);

  test('the host is reachable under a policy only through a rule naming it (10.0.2.2): not under deny-only rules, not under an allow-all CIDR', async () => {
    const denyOnly = await run('egress', base({ name: 'deny-only', egress: { deny: [{ cidr: '192.0.2.0/24' }] } }));
    vms.push(denyOnly);
    expect((await denyOnly.exec(fetchFromGuest('10.0.2.2'))).stdout).toMatch(/^ exit=[1-9]\d*\n$/);
    const all = await run('egress', base({ name: 'all', egress: { allow: [{ cidr: '0.0.0.0/0' }] } }));
    vms.push(all);
    expect((await all.exec(fetchFromGuest('10.0.2.2'))).stdout).toMatch(/^ exit=[1-9]\d*\n$/);
    const named = await run('egress', base({ name: 'named', egress: { allow: [{ cidr: '10.0.2.2', port }] } }));
    vms.push(named);
    expect((await named.exec(fetchFromGuest('10.0.2.2'))).stdout).toBe('host-secret exit=0\n');
    const log = fs.readFileSync(path.join(denyOnly.dataDir, 'egress.log'), 'utf8');
    expect(log).toMatch(
      new RegExp(`"port":${port},"address":"127\\.0\\.0\\.1","ok":false,"error":"ECONNREFUSED","rule":"host"`),
    );
  }, 180_000);

  test.each([
    ['deny', 'deny' as const],
    ['an allow-list', { allow: [{ host: 'svc.test', port: 8080, address: '192.0.2.1' }] }],
  ])(
    '%s keeps published ports answering',
    async (_label, egress) => {
      const vm = await run(
        'egress',
        base({
          egress,
          initOverride: [
            '/bin/sh',
            '-c',
            'mkdir -p /www && echo inside > /www/index.html && exec httpd -f -p 80 -h /www',
          ],
          ports: [{ host: 0, guest: 80 }],
          waitFor: { http: { port: 80, path: '/' } },
        }),
      );
      vms.push(vm);
      const body = await new Promise<string>((resolve, reject) =>
        http
          .get(`http://127.0.0.1:${vm.port(80)}/`, (res) => {
            let b = '';
            res.on('data', (d: Buffer) => (b += d.toString()));
            res.on('end', () => resolve(b));
          })
          .on('error', reject),
      );
      expect(body).toBe('inside\n');
    },
    120_000,
  );
});

describe("libkrun: the runner's egress filter decides what TSI does for the guest (over the libkrun double, which makes TSI's calls)", () => {
  let d: ReturnType<typeof scratch>;
  const servers: net.Server[] = [];
  const ports: Record<string, number> = {};
  let dns: dgram.Socket;
  beforeAll(async () => {
    // Services on three loopback addresses; a resolver that answers every name with 127.0.0.5.
    for (const host of ['127.0.0.5', '127.0.0.6', '127.0.0.7']) {
      const srv = net.createServer((c) => {
        c.on('error', () => undefined); // the VM may be gone before the answer is
        c.end(host);
      });
      await new Promise<void>((r) => srv.listen(0, host, r));
      ports[host] = (srv.address() as net.AddressInfo).port;
      servers.push(srv);
    }
    dns = dgram.createSocket('udp4');
    dns.on('message', (q, from) => {
      let i = 12;
      while (i < q.length && q[i]) i += 1 + q[i];
      const head = Buffer.from(q.subarray(0, 12));
      head[2] = 0x81;
      head[3] = 0x80;
      head.writeUInt16BE(1, 6);
      const rr = Buffer.from([0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 127, 0, 0, 5]);
      dns.send(Buffer.concat([head, q.subarray(12, i + 5), rr]), from.port, from.address);
    });
    await new Promise<void>((r) => dns.bind(0, '127.0.0.1', r));
  });
  afterAll(() => {
    for (const srv of servers) srv.close();
    dns.close();
  });
  beforeEach(() => {
    d = scratch('microvm-egress-krun-');
  });
  afterEach(() => d.cleanup());

  // The guest asks 127.0.0.1:53, where nothing listens: only the filter (or `dns`) answers there.
  const onKrun = async (
    egress: RunOptions['egress'],
    name: string,
    server = '127.0.0.1:53',
  ): Promise<{ console: string; log: string }> => {
    const vm = await run('img', {
      rootfsPath: process.env.MICROVM_TEST_IMAGE,
      dataDir: path.join(d.dir, 'data'),
      name,
      initOverride: ['/bin/true'],
      preflight: [],
      egress,
      agent: false, // this double runs no guest: nothing would answer as the agent
      backend: libkrunBackend({
        runtime: { libDir: doubleDir(), pkgConfig: false, systemDirs: [], loaderSearch: false },
        firmware: { dir: firmwareDir(), systemDirs: [], loaderSearch: false },
        env: {
          PATH: process.env.PATH,
          KRUN_DOUBLE_GUEST_DNS: `a.svc.test@${server},x.other.test@${server}`,
          KRUN_DOUBLE_GUEST_CONNECT: ['127.0.0.5', '127.0.0.6', '127.0.0.7'].map((h) => `${h}:${ports[h]}`).join(','),
        },
      }),
    });
    try {
      let text = '';
      for (let i = 0; i < 200 && (text.match(/^connect /gm) ?? []).length < 3; i++) {
        await new Promise((r) => setTimeout(r, 25));
        text = fs.existsSync(vm.consoleLogPath) ? fs.readFileSync(vm.consoleLogPath, 'utf8') : '';
      }
      const logFile = path.join(vm.dataDir, 'egress.log');
      return { console: text, log: fs.existsSync(logFile) ? fs.readFileSync(logFile, 'utf8') : '' };
    } finally {
      await vm.remove();
    }
  };
  const ECONNREFUSED = 111;

  test("'deny': every connection and every question refused, each logged", async () => {
    const r = await onKrun('deny', 'deny');
    for (const h of ['127.0.0.5', '127.0.0.6', '127.0.0.7'])
      expect(r.console).toContain(`connect ${h}:${ports[h]}=-1 ${ECONNREFUSED}\n`);
    expect(r.console).toContain('dns a.svc.test rcode=3 answers=0 from=127.0.0.1:53\n');
    expect(r.log).toContain(
      '"host":"a.svc.test","port":53,"address":null,"ok":false,"error":"ENOTFOUND","rule":"default"',
    );
  });

  test("rules: an allowed name is answered through the policy's resolver, but its answer (the host's loopback) opens nothing; a CIDR naming the address does; the rest is refused", async () => {
    const r = await onKrun(
      {
        allow: [{ host: '*.svc.test', port: ports['127.0.0.5'] }, { cidr: '127.0.0.6' }],
        dns: `127.0.0.1:${dns.address().port}`,
      },
      'rules',
    );
    expect(r.console).toContain('dns a.svc.test rcode=0 answers=1 from=127.0.0.1:53\n');
    expect(r.console).toContain('dns x.other.test rcode=3 answers=0 from=127.0.0.1:53\n');
    // Under TSI, 127.0.0.5 is the host itself: a DNS answer never makes it reachable.
    expect(r.console).toContain(`connect 127.0.0.5:${ports['127.0.0.5']}=-1 ${ECONNREFUSED}\n`);
    expect(r.console).toContain(`connect 127.0.0.6:${ports['127.0.0.6']}=0 0\n`);
    expect(r.console).toContain(`connect 127.0.0.7:${ports['127.0.0.7']}=-1 ${ECONNREFUSED}\n`);
    expect(r.log).toMatch(/"address":"127\.0\.0\.5","ok":false,"error":"ECONNREFUSED","rule":"host"/);
    expect(r.log).toMatch(/"address":"127\.0\.0\.6","ok":true,"rule":"egress\.allow\[1\]"/);
  });

  test('without a policy the filter in the runner passes everything through', async () => {
    const port = dns.address().port;
    const r = await onKrun('allow', 'open', `127.0.0.1:${port}`);
    expect(r.console).toContain(`dns x.other.test rcode=0 answers=1 from=127.0.0.1:${port}\n`);
    for (const h of ['127.0.0.5', '127.0.0.6', '127.0.0.7'])
      expect(r.console).toContain(`connect ${h}:${ports[h]}=0 0\n`);
    expect(r.log).toBe('');
  });

  test('what libkrun cannot do is refused before anything starts: an address override, a bad policy', async () => {
    await expect(
      onKrun({ allow: [{ host: 'svc.test', port: 80, address: '127.0.0.5' }] }, 'addr'),
    ).rejects.toMatchObject({
      code: 'ERR_MICROVM_EGRESS_UNSUPPORTED',
      message: expect.stringContaining('needs the QEMU backend'),
    });
    await expect(run('img', { rootfsPath: process.env.MICROVM_TEST_IMAGE, egress: 'none' as never })).rejects.toThrow(
      "Expected 'allow', 'deny' or { allow: [...], deny: [...] } for egress but received \"none\"",
    );
  });
});
