/**
 * Egress rules enforced by the filter in QEMU (native/preload/net_guard.cc) on real boots: CIDRs, wildcard
 * names learned from DNS, deny rules, the resolver, against test hosts this test makes in a network
 * namespace of its own (a veth pair; HTTP services on two addresses) and a resolver it runs on the
 * host's loopback, never any outside address. The filter's logic without a VM: test/net-guard.test.ts.
 */
import * as dgram from 'node:dgram';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { type MicroVM, run, type RunOptions } from '../../lib';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { scratch } from '../helpers';
import { guestHttpGet, makeTestHosts, netnsSkipReason, type TestHosts } from './test-hosts';

process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;

const skip = netnsSkipReason();

(skip ? describe.skip : describe)(`egress rules, real VMs and test hosts${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  let hosts: TestHosts;
  let hostIp = '';
  let farA = ''; // what *.svc.test resolves to
  let farB = ''; // never in a DNS answer
  let dns: dgram.Socket | undefined;
  const asked: string[] = [];
  let s: ReturnType<typeof scratch>;
  const vms: MicroVM[] = [];

  beforeAll(async () => {
    s = scratch('microvm-egress-rules-');
    hosts = await makeTestHosts({
      tag: 'mvmer',
      octet: 214,
      farCount: 2,
      dir: s.dir,
      probePort: 9090,
      server: `const http = require('http');
for (const port of [8080, 9090])
  http.createServer((req, res) => res.end('service-' + port + '@' + req.socket.localAddress)).listen(port, '0.0.0.0');`,
    });
    hostIp = hosts.hostIp;
    [farA, farB] = hosts.far;
    // The resolver: *.svc.test -> farA (TTL 300), anything else NXDOMAIN; it notes every question.
    dns = dgram.createSocket('udp4');
    dns.on('message', (q, from) => {
      let i = 12;
      const parts: string[] = [];
      while (i < q.length && q[i]) {
        parts.push(q.subarray(i + 1, i + 1 + q[i]).toString());
        i += 1 + q[i];
      }
      const name = parts.join('.').toLowerCase();
      const type = q.readUInt16BE(i + 1);
      asked.push(name);
      const head = Buffer.from(q.subarray(0, 12));
      const hit = name.endsWith('.svc.test') && type === 1;
      head[2] = 0x81;
      head[3] = name.endsWith('.svc.test') ? 0x80 : 0x83;
      head.writeUInt16BE(hit ? 1 : 0, 6);
      head.writeUInt16BE(0, 8);
      head.writeUInt16BE(0, 10);
      const rr = hit
        ? Buffer.from([0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, ...farA.split('.').map(Number)])
        : Buffer.alloc(0);
      dns?.send(Buffer.concat([head, q.subarray(12, i + 5), rr]), from.port, from.address);
    });
    await new Promise<void>((r) => dns?.bind(0, '127.0.0.1', r));
  });
  afterAll(async () => {
    for (const vm of vms.splice(0)) await vm.remove().catch(() => undefined);
    hosts.stop();
    dns?.close();
    s.cleanup();
  });

  const base = (extra: RunOptions): RunOptions => ({
    rootfsPath: process.env.MICROVM_TEST_IMAGE,
    backend: 'qemu',
    dataDir: path.join(s.dir, 'data'),
    initOverride: ['/bin/sleep', '600'],
    ...extra,
  });
  const fetch = (host: string, port: number): string => guestHttpGet(host, port, 1);
  const readLog = (vm: MicroVM): Record<string, unknown>[] =>
    fs
      .readFileSync(path.join(vm.dataDir, 'egress.log'), 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>);

  test('an allow-list of a wildcard name and a CIDR: exactly those answer; raw addresses, other ports, the host, refused names and other resolvers do not', async () => {
    asked.length = 0;
    const exporter = new InMemorySpanExporter();
    const vm = await run(
      'egress-rules',
      base({
        name: 'rules',
        tracerProvider: new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] }),
        ports: [{ host: 0, guest: 8000 }],
        egress: {
          allow: [
            { host: '*.svc.test', port: 8080 },
            { cidr: `${farB}/32`, port: 9090, protocol: 'tcp' },
          ],
          deny: [{ host: 'bad.svc.test' }],
          dns: `127.0.0.1:${(dns as dgram.Socket).address().port}`,
        },
      }),
    );
    vms.push(vm);
    const sh = async (cmd: string): Promise<string> => (await vm.exec(cmd)).stdout;
    // The name resolves through QEMU's DNS address (the filter sends it to our resolver) ...
    expect(await sh('nslookup a.svc.test >/dev/null 2>&1; echo $?')).toBe('0\n');
    // ... and then its address answers on the allowed port, by name and by that address.
    expect(await sh(fetch('a.svc.test', 8080))).toBe(`service-8080@${farA} exit=0\n`);
    expect(await sh(fetch(farA, 8080))).toBe(`service-8080@${farA} exit=0\n`);
    // The CIDR rule: that address, that port.
    expect(await sh(fetch(farB, 9090))).toBe(`service-9090@${farB} exit=0\n`);
    for (const [h, p] of [
      ['a.svc.test', 9090], // the name's rule says 8080
      [farB, 8080], // a raw address no answer gave, on a port its rule does not list
      [hostIp, 8080],
      ['10.0.2.2', 22], // the host's loopback, through QEMU
    ] as const) {
      const r = await sh(fetch(h, p));
      expect([h, p, r]).toEqual([h, p, expect.stringMatching(/^ exit=[1-9]\d*\n$/)]);
    }
    // Refused names: NXDOMAIN from inside QEMU, whichever server the guest asks; never sent on.
    expect(await sh('nslookup bad.svc.test; echo "st=$?"')).toMatch(/st=[1-9]/);
    expect(await sh('nslookup elsewhere.test 192.0.2.53; echo "st=$?"')).toMatch(/st=[1-9]/);
    // A resolver of the guest's own choosing gets the allowed question too: it goes to ours.
    expect(await sh('nslookup b.svc.test 192.0.2.53 >/dev/null 2>&1; echo $?')).toBe('0\n');
    expect(asked.filter((n) => n === 'bad.svc.test' || n === 'elsewhere.test')).toEqual([]);
    expect(asked).toContain('b.svc.test');
    // Other routes and MTU change nothing: everything still leaves through QEMU's sockets.
    await sh('ip link set eth0 mtu 576; ip route del default; ip route add default via 10.0.2.3 dev eth0');
    expect(await sh('ip route show default')).toContain('via 10.0.2.3');
    expect(await sh(fetch(farB, 8080))).toMatch(/^ exit=[1-9]\d*\n$/);
    expect(await sh(fetch('a.svc.test', 8080))).toBe(`service-8080@${farA} exit=0\n`);
    // A published port still answers.
    await sh('mkdir -p /tmp/www && echo published > /tmp/www/index.html && httpd -p 8000 -h /tmp/www');
    const body = await new Promise<string>((resolve, reject) => {
      http
        .get({ host: '127.0.0.1', port: vm.port(8000), path: '/' }, (res) => {
          let b = '';
          res.on('data', (d: Buffer) => (b += d.toString()));
          res.on('end', () => resolve(b));
        })
        .on('error', reject);
    });
    expect(body).toBe('published\n');
    // The audit: each refusal with the rule that decided it.
    const log = readLog(vm);
    expect(log).toEqual(
      expect.arrayContaining([
        expect.objectContaining({ kind: 'dns', host: 'a.svc.test', ok: true, rule: 'egress.allow[0]' }),
        expect.objectContaining({ kind: 'connect', host: 'a.svc.test', port: 8080, address: farA, ok: true }),
        expect.objectContaining({ kind: 'connect', address: farB, port: 9090, ok: true, rule: 'egress.allow[1]' }),
        expect.objectContaining({ kind: 'connect', address: farB, port: 8080, ok: false, rule: 'default' }),
        expect.objectContaining({ kind: 'connect', address: farA, port: 9090, ok: false, rule: 'default' }),
        expect.objectContaining({ kind: 'connect', address: '127.0.0.1', port: 22, ok: false }),
        expect.objectContaining({ kind: 'dns', host: 'bad.svc.test', ok: false, rule: 'egress.deny[0]' }),
        expect.objectContaining({ kind: 'dns', host: 'elsewhere.test', ok: false, rule: 'default' }),
      ]),
    );
    // The same decisions in the trace, on microvm.network.Egress (it ends with the VM); the filter
    // was checked for at preflight.
    await vm.stop();
    expect(
      exporter
        .getFinishedSpans()
        .filter((x) => x.name === 'microvm.preflight.Check')
        .map((x) => x.attributes['preflight.check.name']),
    ).toContain('egress-filter');
    const egressSpan = exporter.getFinishedSpans().find((x) => x.name === 'microvm.network.Egress');
    expect(egressSpan?.events.map((e) => e.attributes)).toEqual(
      expect.arrayContaining([
        expect.objectContaining({
          'server.address': 'bad.svc.test',
          'microvm.network.outcome': 'refused',
          'microvm.network.kind': 'dns',
          'microvm.network.rule': 'egress.deny[0]',
        }),
        expect.objectContaining({
          'server.address': farB,
          'server.port': 8080,
          'microvm.network.outcome': 'refused',
          'microvm.network.rule': 'default',
        }),
        expect.objectContaining({ 'server.address': 'a.svc.test', 'microvm.network.outcome': 'resolved' }),
      ]),
    );
  }, 180_000);

  test('deny rules alone: everything else stays reachable', async () => {
    const vm = await run('egress-rules', base({ name: 'denylist', egress: { deny: [{ cidr: `${farB}/32` }] } }));
    vms.push(vm);
    expect((await vm.exec(fetch(farA, 8080))).stdout).toBe(`service-8080@${farA} exit=0\n`);
    expect((await vm.exec(fetch(farB, 8080))).stdout).toMatch(/^ exit=[1-9]\d*\n$/);
    expect(readLog(vm)).toEqual([
      expect.objectContaining({ address: farA, ok: true, rule: 'default' }),
      expect.objectContaining({ address: farB, ok: false, rule: 'egress.deny[0]' }),
    ]);
  }, 120_000);
});
