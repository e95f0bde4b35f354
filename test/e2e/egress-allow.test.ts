/**
 * Egress allow-lists on real QEMU boots, against test hosts this test makes in a network namespace
 * of its own (a veth pair to the host; two HTTP services on the far side), never any outside address.
 * Plus the option's validation, which needs no VM.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { type MicroVM, run, type RunOptions } from '../../lib';
import { parseEgress } from '../../lib/network/egress';
import { packageRoot } from '../../lib/native';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { scratch } from '../helpers';
import { guestHttpGet, makeTestHosts, netnsSkipReason, type TestHosts } from './test-hosts';

process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;

describe('egress option validation', () => {
  test.each([
    [
      { allow: [{ host: '*example.com', port: 443 }] },
      /egress\.allow\[0\]\.host "\*example\.com" is not a host name \(a wildcard/,
    ],
    [
      { deny: [{ cidr: '10.0.0.0/8', port: 80, address: '10.0.0.1' }] },
      /egress\.deny\[0\]\.address goes with an allowed host name/,
    ],
    [{ allow: [{ cidr: '::1/129' }] }, /egress\.allow\[0\]\.cidr "::1\/129" is not an address or a network/],
    [
      { allow: [{ host: '*.a.test', port: 80, protocol: 'icmp' }] },
      /egress\.allow\[0\]\.protocol must be 'tcp' or 'udp'/,
    ],
    [{ dns: 'resolver.test' }, /egress\.dns "resolver\.test" is not a resolver address/],
    [{ allow: [{ host: '10.0.0.1', port: 443 }] }, /egress\.allow\[0\]\.host "10\.0\.0\.1" is an address/],
    [{ allow: [{ host: 'bad_name', port: 443 }] }, /egress\.allow\[0\]\.host "bad_name" is not a host name/],
    [{ allow: [{ host: 'ok.test', port: 0 }] }, /egress\.allow\[0\]\.port/],
    [{ allow: [{ host: 'ok.test', port: 70000 }] }, /egress\.allow\[0\]\.port/],
    [{ allow: [{ host: 'ok.test', port: 80, address: 'nope' }] }, /egress\.allow\[0\]\.address "nope" is not an IP/],
    [
      {
        allow: [
          { host: 'a.test', port: 80 },
          { host: 'A.test', port: 80 },
        ],
      },
      /egress\.allow\[1\]: a\.test:80 is listed twice/,
    ],
    [
      {
        allow: [
          { host: 'a.test', port: 80, address: '10.1.1.1' },
          { host: 'a.test', port: 81, address: '10.1.1.2' },
        ],
      },
      /a\.test is given different addresses/,
    ],
    [{ allow: Array.from({ length: 65 }, (_, i) => ({ host: 'a.test', port: i + 1 })) }, /65 rules; at most 64/],
    ['sometimes', /Expected 'allow', 'deny' or \{ allow: \[\.\.\.\], deny: \[\.\.\.\] \}/],
  ])('refused with a RangeError that names the rule (case %#)', (value, message) => {
    let err: unknown;
    try {
      parseEgress(value);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(RangeError);
    expect(err).toMatchObject({ code: 'ERR_OUT_OF_RANGE', message: expect.stringMatching(message) });
  });

  test('wrong types are TypeErrors; a good list comes back normalized (lowercase names)', () => {
    expect(() => parseEgress({ allow: 'x' })).toThrow(TypeError);
    expect(() => parseEgress({ allow: [{ host: 'a.test', port: 1, extra: 1 }] })).toThrow(/Unknown option/);
    expect(() => parseEgress({ allow: [null] })).toThrow(TypeError);
    expect(
      parseEgress({
        allow: [
          { host: 'API.Test', port: 443, address: '192.0.2.1' },
          { host: 'b.test', port: 80 },
        ],
      }),
    ).toEqual({
      allow: [
        { host: 'api.test', port: 443, address: '192.0.2.1' },
        { host: 'b.test', port: 80 },
      ],
    });
    expect(parseEgress(undefined)).toBe('allow');
    expect(parseEgress('deny')).toBe('deny');
  });
});

const skip = netnsSkipReason();

(skip ? describe.skip : describe)(
  `egress allow-list, real VMs and test hosts${skip ? ` [skipped: ${skip}]` : ''}`,
  () => {
    let hosts: TestHosts;
    let hostIp = '';
    let farIp = '';
    let s: ReturnType<typeof scratch>;
    const vms: MicroVM[] = [];

    beforeAll(async () => {
      s = scratch('microvm-egress-allow-');
      // Two services on the far side: 8080 (to be allowed) and 9090 (never allowed).
      hosts = await makeTestHosts({
        tag: 'mvmeg',
        octet: 213,
        farCount: 1,
        dir: s.dir,
        probePort: 9090,
        server: `const http = require('http');
for (const [port, body] of [[8080, 'allowed-service'], [9090, 'forbidden-service']])
  http.createServer((req, res) => res.end(body)).listen(port, '0.0.0.0');`,
      });
      hostIp = hosts.hostIp;
      farIp = hosts.far[0];
    });
    afterAll(async () => {
      for (const vm of vms.splice(0)) await vm.remove().catch(() => undefined);
      hosts.stop();
      s.cleanup();
    });

    const base = (extra: RunOptions): RunOptions => ({
      rootfsPath: process.env.MICROVM_TEST_IMAGE,
      backend: 'qemu',
      dataDir: path.join(s.dir, 'data'),
      initOverride: ['/bin/sleep', '600'],
      ...extra,
    });
    const fetch = (host: string, port: number): string => guestHttpGet(host, port);

    test('only the allowed name and port answer; raw addresses, other ports, the host and DNS do not; each connection is in egress.log', async () => {
      // Reachable from the host itself: the services are up.
      const exporter = new InMemorySpanExporter();
      const vm = await run(
        'egress-allow',
        base({
          name: 'listed',
          egress: { allow: [{ host: 'svc.test', port: 8080, address: farIp }] },
          tracerProvider: new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] }),
        }),
      );
      vms.push(vm);
      expect((await vm.exec(fetch('svc.test', 8080))).stdout).toBe('allowed-service exit=0\n');
      // The same service by its real address, the other service, the host's side of the veth: nothing.
      for (const [h, p] of [
        [farIp, 8080],
        [farIp, 9090],
        ['svc.test', 9090],
        [hostIp, 8080],
        ['10.0.2.2', 22],
      ] as const) {
        const r = await vm.exec(fetch(h, p));
        expect([h, p, r.stdout]).toEqual([h, p, expect.stringMatching(/^ exit=[1-9]\d*\n$/)]);
      }
      // No resolver: QEMU's DNS relay is cut off, and a resolver the guest picks is unreachable.
      expect((await vm.exec('nslookup svc.test 10.0.2.3 >/dev/null 2>&1; echo $?')).stdout).not.toBe('0\n');
      expect((await vm.exec(`nslookup svc.test ${hostIp} >/dev/null 2>&1; echo $?`)).stdout).not.toBe('0\n');
      // The guest rewriting its hosts file gains nothing: the name was only ever a virtual address.
      await vm.exec(`echo '${farIp} svc.test' > /etc/hosts`);
      expect((await vm.exec(fetch('svc.test', 8080))).stdout).toMatch(/^ exit=[1-9]\d*\n$/);
      const log = fs
        .readFileSync(path.join(vm.dataDir, 'egress.log'), 'utf8')
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l) as Record<string, unknown>);
      expect(log).toHaveLength(1);
      expect(log[0]).toMatchObject({ host: 'svc.test', port: 8080, address: farIp, ok: true });
      expect(log[0].bytesIn as number).toBeGreaterThan(15);
      expect((fs.statSync(path.join(vm.dataDir, 'egress.log')).mode & 0o777).toString(8)).toBe('600');
      // The same through the CLI.
      const cliOut = execFileSync(
        process.execPath,
        [
          path.join(packageRoot, 'bin', 'microvm.js'),
          'logs',
          'listed',
          '--network',
          '--data-dir',
          path.join(s.dir, 'data'),
        ],
        { encoding: 'utf8' },
      );
      expect(JSON.parse(cliOut.trim())).toMatchObject({ host: 'svc.test', port: 8080, ok: true });
      // And in the trace: one event on microvm.network.Egress, which ends with the VM.
      await vm.stop();
      const egressSpan = exporter.getFinishedSpans().find((x) => x.name === 'microvm.network.Egress');
      const runSpan = exporter.getFinishedSpans().find((x) => x.name === 'microvm.Run');
      expect(egressSpan?.parentSpanContext?.spanId).toBe(runSpan?.spanContext().spanId);
      expect(egressSpan?.events.map((e) => e.attributes)).toEqual([
        expect.objectContaining({
          'server.address': 'svc.test',
          'server.port': 8080,
          'microvm.network.outcome': 'connected',
        }),
      ]);
      expect(egressSpan?.attributes).toMatchObject({
        'microvm.network.connections': 1,
        'microvm.network.connection_failures': 0,
      });
    }, 180_000);

    test('an allowed name whose host is down: the guest sees the connection end, the log says why', async () => {
      const vm = await run(
        'egress-allow',
        base({ name: 'down', egress: { allow: [{ host: 'gone.test', port: 7070, address: farIp }] } }),
      );
      vms.push(vm);
      expect((await vm.exec(fetch('gone.test', 7070))).stdout).not.toContain('service');
      let log = '';
      for (let i = 0; i < 50 && !log; i++) {
        log = fs.existsSync(path.join(vm.dataDir, 'egress.log'))
          ? fs.readFileSync(path.join(vm.dataDir, 'egress.log'), 'utf8')
          : '';
        if (!log) await new Promise((r) => setTimeout(r, 100));
      }
      expect(JSON.parse(log.trim().split('\n')[0])).toMatchObject({
        host: 'gone.test',
        port: 7070,
        ok: false,
        error: 'ECONNREFUSED',
      });
    }, 120_000);
  },
);
