/**
 * The guest agent on the libkrun backend, through the libkrun recording double (no real libkrun can
 * run here). With KRUN_DOUBLE_RUN_GUEST=1 the double runs the guest as libkrun's init would, as a
 * host process chrooted into the VM's root in namespaces of its own: our guest init (the real
 * binary) starts the agent and becomes the command; the double bridges the `agent.sock` libkrun
 * listens on to the agent's port. The double's guest has no vsock device, so the agent listens on a
 * unix socket in the root instead (see the double's header): the only part not exercised here is
 * the AF_VSOCK socket itself.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { hooks, libkrunBackend, type MicroVM, run, type RunOptions, SPAN } from '../../lib';
import { AGENT_VSOCK_PORT } from '../../lib/backends/libkrun';
import { IDLE_COMMAND } from '../../lib/backends/guest-init';
import { ATTR } from '../../lib/telemetry/attributes';
import { doubleDir, firmwareDir, readCalls, scratch } from '../helpers';

function skipReason(): string | undefined {
  if (!process.env.MICROVM_TEST_IMAGE || !fs.existsSync(process.env.MICROVM_TEST_IMAGE))
    return 'no test image (scripts/make-test-image.sh did not run)';
  if (process.getuid?.() !== 0 && spawnSync('unshare', ['-U', '-r', '-p', '-f', 'true']).status !== 0)
    return 'no user namespaces for the double to run its guest in';
  return undefined;
}
const skip = skipReason();

let s: ReturnType<typeof scratch>;
const vms: MicroVM[] = [];
beforeEach(() => {
  s = scratch('microvm-agent-krun-');
});
afterEach(async () => {
  for (const vm of vms.splice(0)) await vm.remove().catch(() => undefined);
  s.cleanup();
});

const options = (extra: RunOptions = {}, env: Record<string, string> = { KRUN_DOUBLE_RUN_GUEST: '1' }): RunOptions => ({
  rootfsPath: process.env.MICROVM_TEST_IMAGE,
  dataDir: path.join(s.dir, 'data'),
  initOverride: ['/bin/sleep', '600'],
  preflight: [],
  backend: libkrunBackend({
    runtime: { libDir: doubleDir(), pkgConfig: false, systemDirs: [], loaderSearch: false },
    firmware: { dir: firmwareDir(), systemDirs: [], loaderSearch: false },
    env: { PATH: process.env.PATH, KRUN_DOUBLE_LOG: path.join(s.dir, 'calls.jsonl'), ...env },
  }),
  ...extra,
});

(skip ? describe.skip : describe)(
  `guest agent on libkrun (recording double)${skip ? ` [skipped: ${skip}]` : ''}`,
  () => {
    test("run() resolves on the agent's hello through libkrun's vsock bridge; exec on a busybox image with no SSH", async () => {
      const exporter = new InMemorySpanExporter();
      const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
      const vm = await run(
        'krun-agent',
        options({ name: 'a', env: { GREETING: 'from run' }, workdir: '/tmp', tracerProvider: provider }),
      );
      vms.push(vm);
      const wait = exporter.getFinishedSpans().find((x) => x.name === SPAN.AGENT_WAIT_READY);
      expect(wait?.attributes[ATTR.AGENT_READY]).toBe(true);
      expect(vm.agentHello?.caps).toEqual(expect.arrayContaining(['exec', 'files']));
      // libkrun listens on agent.sock (private) and connects each client to the agent's vsock port.
      const sock = path.join(vm.dataDir, 'agent.sock');
      const add = readCalls(path.join(s.dir, 'calls.jsonl')).find((c) => c.fn === 'krun_add_vsock_port2');
      expect(add?.args).toEqual({ ctx: expect.any(Number), port: AGENT_VSOCK_PORT, c_filepath: sock, listen: true });
      expect(fs.statSync(sock).mode & 0o777).toBe(0o600);

      // Env: the image's + run()'s + the call's; the working directory: run()'s unless given.
      expect(
        await vm.exec(['sh', '-c', 'echo "$GREETING|$EXTRA|$(pwd)"; echo oops >&2; exit 4'], { env: { EXTRA: 'x' } }),
      ).toEqual({ stdout: 'from run|x|/tmp\n', stderr: 'oops\n', exitCode: 4, signal: null });
      expect((await vm.exec('cd / && ls /.microvm', { cwd: '/' })).stdout).toBe('init\n');
      const proc = await vm.spawn(['cat'], { stdin: true });
      let out = '';
      proc.stdout.on('data', (d: Buffer) => (out += d.toString()));
      proc.stdin?.end('piped in\n');
      expect(await proc.exited).toMatchObject({ exitCode: 0 });
      expect(out).toBe('piped in\n');
    });

    test('files: a tree in and out, readFile/writeFile', async () => {
      const vm = await run('krun-agent', options({ name: 'f' }));
      vms.push(vm);
      const src = path.join(s.dir, 'tree');
      fs.mkdirSync(path.join(src, 'sub'), { recursive: true });
      fs.writeFileSync(path.join(src, 'sub', 'a.txt'), 'alpha');
      fs.chmodSync(path.join(src, 'sub', 'a.txt'), 0o640);
      fs.symlinkSync('sub/a.txt', path.join(src, 'link'));
      await vm.copyIn(src, '/tmp/tree');
      expect((await vm.exec(['sh', '-c', 'cat /tmp/tree/link; stat -c %a /tmp/tree/sub/a.txt'])).stdout).toBe(
        'alpha640\n',
      );
      await vm.writeFile('/tmp/note', 'written');
      expect((await vm.readFile('/tmp/note')).toString()).toBe('written');
      const back = path.join(s.dir, 'back');
      await vm.copyOut('/tmp/tree', back);
      expect(fs.readFileSync(path.join(back, 'sub', 'a.txt'), 'utf8')).toBe('alpha');
      expect(fs.readlinkSync(path.join(back, 'link'))).toBe('sub/a.txt');
    });

    test("the command's exit code is the VM's: the agent runs outside the command's process tree", async () => {
      const vm = await run('krun-agent', options({ name: 'e', initOverride: ['/bin/sh', '-c', 'sleep 1; exit 7'] }));
      vms.push(vm);
      expect(vm.agentHello).toBeDefined();
      expect(await vm.wait()).toEqual({ reason: 'exited', exitCode: 7, signal: null });
    });

    test("run -it's idle command: no command of its own, the VM serves its agent until stopped", async () => {
      const vm = await run('krun-agent', options({ name: 'i', initOverride: [...IDLE_COMMAND] }));
      vms.push(vm);
      expect((await vm.exec(['echo', 'idle'])).stdout).toBe('idle\n');
      await vm.stop();
      expect(await vm.wait()).toMatchObject({ reason: 'stopped' });
    });

    test('an agent the init could not start: ERR_MICROVM_AGENT_UNAVAILABLE with its line, long before the timeout', async () => {
      // Something already at the path the agent would listen on (in the double's guest: a unix socket).
      const t0 = Date.now();
      const err = await run(
        'krun-agent',
        options({ name: 'x', rootfsHooks: [hooks.injectFile(`/.krun-double-vsock-${AGENT_VSOCK_PORT}/taken`, 'x')] }),
      ).catch((e: Error) => e);
      expect(err).toMatchObject({
        code: 'ERR_MICROVM_AGENT_UNAVAILABLE',
        message: expect.stringContaining('cannot listen for the host on unix:'),
      });
      expect(Date.now() - t0).toBeLessThan(15_000); // the agent's own timeout is 30 s
      expect(fs.existsSync(path.join(s.dir, 'data', 'vms', 'x'))).toBe(false);
    });

    test('nothing listening behind the socket: ERR_MICROVM_AGENT_TIMEOUT at the timeout, nothing left', async () => {
      // The double without a running guest: libkrun closes every connection, as with no agent in the guest.
      const t0 = Date.now();
      const err = await run('krun-agent', options({ name: 'n', agent: { timeoutMs: 1500 } }, {})).catch(
        (e: Error) => e,
      );
      expect(err).toMatchObject({
        code: 'ERR_MICROVM_AGENT_TIMEOUT',
        message: expect.stringContaining('nothing listened'),
      });
      expect(Date.now() - t0).toBeLessThan(20_000);
      expect(fs.existsSync(path.join(s.dir, 'data', 'vms', 'n'))).toBe(false);
    });
  },
);
