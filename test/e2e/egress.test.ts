/**
 * The egress policy on real QEMU boots, against a server this test creates on the host (reached
 * from the guest as 10.0.2.2, QEMU user networking's address of the host): 'allow' reaches it,
 * 'deny' reaches nothing, and a published port still answers under 'deny'. Never any outside address.
 */
import * as http from 'node:http';
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

test("a backend that cannot enforce 'deny' (libkrun's TSI) refuses to start: ERR_MICROVM_EGRESS_UNSUPPORTED, never an open network", async () => {
  const d = scratch('microvm-egress-krun-');
  try {
    const onKrun = (egress: RunOptions['egress']): Promise<unknown> =>
      run('img', {
        rootfsPath: process.env.MICROVM_TEST_IMAGE,
        dataDir: path.join(d.dir, 'data'),
        initOverride: ['/bin/true'],
        preflight: [],
        egress,
        backend: libkrunBackend({
          runtime: { libDir: doubleDir(), pkgConfig: false, systemDirs: [], loaderSearch: false },
          firmware: { dir: firmwareDir(), systemDirs: [], loaderSearch: false },
          env: { PATH: process.env.PATH },
        }),
      });
    await expect(onKrun('deny')).rejects.toMatchObject({ code: 'ERR_MICROVM_EGRESS_UNSUPPORTED' });
    // An allow-list too: libkrun's TSI gives the guest the host's sockets.
    await expect(onKrun({ allow: [{ host: 'svc.test', port: 80 }] })).rejects.toMatchObject({
      code: 'ERR_MICROVM_EGRESS_UNSUPPORTED',
      message: expect.stringContaining("egress 'allow-list(1)' cannot be enforced by backend libkrun"),
    });
    await expect(run('img', { rootfsPath: process.env.MICROVM_TEST_IMAGE, egress: 'none' as never })).rejects.toThrow(
      "Expected 'allow', 'deny' or { allow: [...], deny: [...] } for egress but received \"none\"",
    );
  } finally {
    d.cleanup();
  }
});
