/**
 * The allow-list relay is bounded per VM (real QEMU boots; the allowed name points at a server this
 * test runs on 127.0.0.1): one relay process per VM whatever the guest does, at most
 * MICROVM_RELAY_MAX_CONNECTIONS upstream connections at once (the rest refused, each refusal in
 * egress.log), and a connection idle for MICROVM_RELAY_IDLE_MS closed and logged.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { type MicroVM, run } from '../../lib';
import { alive, qemuSkipReason, scratch } from '../helpers';

const skip = qemuSkipReason();
process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;

let s: ReturnType<typeof scratch>;
let server: net.Server;
let port = 0;
let current = 0;
let most = 0;
const vms: MicroVM[] = [];

/** Processes whose command line holds all of `parts`. */
function processes(...parts: string[]): number[] {
  return fs
    .readdirSync('/proc')
    .filter((d) => /^\d+$/.test(d))
    .map(Number)
    .filter((p) => {
      try {
        const cmd = fs.readFileSync(`/proc/${p}/cmdline`, 'utf8');
        return parts.every((x) => cmd.includes(x)) && alive(p);
      } catch {
        return false;
      }
    });
}

function logLines(vm: MicroVM): Record<string, unknown>[] {
  const file = path.join(vm.dataDir, 'egress.log');
  if (!fs.existsSync(file)) return [];
  return fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

async function until(cond: () => boolean, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!cond() && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
}

async function boot(name: string, env: Record<string, string>): Promise<MicroVM> {
  const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
  Object.assign(process.env, env);
  try {
    const vm = await run('relay-bounds', {
      name,
      rootfsPath: process.env.MICROVM_TEST_IMAGE,
      backend: 'qemu',
      dataDir: path.join(s.dir, 'data'),
      initOverride: ['/bin/sleep', '600'],
      egress: { allow: [{ host: 'svc.test', port, address: '127.0.0.1' }] },
    });
    vms.push(vm);
    return vm;
  } finally {
    for (const [k, v] of Object.entries(saved))
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
  }
}

(skip ? describe.skip : describe)(`egress relay bounds${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  beforeAll(async () => {
    s = scratch('microvm-relay-');
    server = net.createServer((c) => {
      current++;
      most = Math.max(most, current);
      c.on('error', () => undefined);
      c.on('close', () => current--);
      c.write('hello\n');
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    port = (server.address() as net.AddressInfo).port;
  });
  afterAll(async () => {
    for (const vm of vms.splice(0)) await vm.remove().catch(() => undefined);
    server.close();
    s.cleanup();
  });

  test('a guest holding 12 connections under a cap of 4: one relay, at most 4 upstream at once, the rest refused and logged', async () => {
    const vm = await boot('capped', { MICROVM_RELAY_MAX_CONNECTIONS: '4' });
    most = 0;
    await vm.exec([
      '/bin/sh',
      '-c',
      'i=0; while [ $i -lt 12 ]; do (sleep 20 | nc svc.test ' +
        port +
        ' > /dev/null 2>&1 &); i=$((i+1)); done; sleep 3',
    ]);
    await until(() => logLines(vm).filter((l) => l.ok === false).length >= 8, 10_000);
    const refused = logLines(vm).filter((l) => l.ok === false);
    expect(refused.length).toBeGreaterThanOrEqual(8);
    expect(refused[0]).toMatchObject({ host: 'svc.test', port, error: 'refused: 4 connections open' });
    expect(most).toBeGreaterThanOrEqual(1);
    expect(most).toBeLessThanOrEqual(4);
    expect(processes('relay.js', vm.dataDir)).toHaveLength(1);
    // The per-connection copiers QEMU started (not QEMU, whose command line names them too).
    const copiers = (): number[] => processes('microvm-runner\0--relay-connect', vm.dataDir);
    expect(copiers().length).toBeLessThanOrEqual(4);
    await vm.remove();
    await until(() => processes('relay.js', vm.dataDir).length + copiers().length === 0, 5000);
    expect([processes('relay.js', vm.dataDir), copiers()]).toEqual([[], []]);
  }, 120_000);

  test('a connection idle past MICROVM_RELAY_IDLE_MS is closed and logged as idle', async () => {
    const vm = await boot('idle', { MICROVM_RELAY_IDLE_MS: '700' });
    await vm.exec(['/bin/sh', '-c', `(sleep 30 | nc svc.test ${port} > /dev/null 2>&1 &); sleep 0.2`]);
    await until(() => logLines(vm).some((l) => l.closed === 'idle'), 10_000);
    expect(logLines(vm).find((l) => l.closed === 'idle')).toMatchObject({
      host: 'svc.test',
      port,
      ok: true,
      bytesIn: 6,
    });
  }, 120_000);
});
