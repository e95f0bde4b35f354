/**
 * The run() failure, abort and clean-up matrix on the backend that really boots here: QEMU (with
 * virtiofsd, an overlay root in a mount namespace, TCG). Each stage fails or is aborted in turn;
 * every case must end in the right coded error, with that stage and microvm.Run marked ERROR, and
 * leave nothing behind: no QEMU or virtiofsd process, no VM directory. (The same matrix over the
 * libkrun double is in test/pipeline/run.test.ts.)
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { SpanStatusCode } from '@opentelemetry/api';
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  type ReadableSpan,
  SimpleSpanProcessor,
} from '@opentelemetry/sdk-trace-base';
import { loadKeyPair, type MicroVM, qemuBackend, run, type RunOptions, waitForReady } from '../../lib';
import { alive, qemuSkipReason, scratch } from '../helpers';

const skip = qemuSkipReason();
process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;

let s: ReturnType<typeof scratch>;
let exporter: InMemorySpanExporter;
let provider: BasicTracerProvider;
beforeEach(() => {
  s = scratch('microvm-matrix-');
  exporter = new InMemorySpanExporter();
  provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
});
afterEach(() => s.cleanup());

const base = (extra: RunOptions = {}): RunOptions => ({
  rootfsPath: process.env.MICROVM_TEST_IMAGE,
  backend: 'qemu',
  dataDir: path.join(s.dir, 'data'),
  initOverride: ['/bin/sh', '-c', 'sleep 600'],
  preflight: [],
  tracerProvider: provider,
  ...extra,
});

/** Processes (QEMU, virtiofsd, the launcher) whose command line names this test's directory. */
function related(): number[] {
  return fs
    .readdirSync('/proc')
    .filter((d) => /^\d+$/.test(d))
    .map(Number)
    .filter((p) => {
      try {
        return p !== process.pid && fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(s.dir) && alive(p);
      } catch {
        return false;
      }
    });
}

function span(name: string): ReadableSpan {
  const l = exporter.getFinishedSpans().filter((x) => x.name === name);
  expect([name, l.length]).toEqual([name, 1]);
  return l[0];
}

async function nothingLeft(): Promise<void> {
  // The processes are killed (SIGKILL) before run() rejects; give /proc a moment to drop them.
  for (let i = 0; i < 100 && related().length; i++) await new Promise((r) => setTimeout(r, 20));
  expect(related()).toEqual([]);
  const vms = path.join(s.dir, 'data', 'vms');
  expect(fs.existsSync(vms) ? fs.readdirSync(vms) : []).toEqual([]);
}

const failing = (code: string, message = code): Error => Object.assign(new Error(message), { code });

(skip ? describe.skip : describe)(`run() failures on QEMU${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  test.each<[string, () => RunOptions, string | RegExp]>([
    [
      'microvm.Preflight',
      () => ({
        preflight: [{ name: 'no', description: 'fails', required: true, run: () => ({ ok: false, message: 'nope' }) }],
      }),
      'ERR_MICROVM_PREFLIGHT',
    ],
    ['microvm.ImagePull', () => ({ rootfsPath: path.join(s.dir, 'no-such-rootfs') }), 'ERR_MICROVM_ROOTFS_NOT_FOUND'],
    ['microvm.RootfsClone', () => ({ cloneStrategies: ['reflink'] }), /^ERR_MICROVM_CLONE/],
    [
      'microvm.RootfsHooks',
      () => ({
        rootfsHooks: [
          () => {
            throw failing('E_HOOK');
          },
        ],
      }),
      'E_HOOK',
    ],
    ['microvm.BackendPrepare', () => ({ initOverride: undefined }), 'ERR_MICROVM_NO_COMMAND'],
    [
      'microvm.NetworkStart',
      () => ({
        network: {
          name: 'broken',
          start: async () => {
            throw failing('E_NET');
          },
        },
      }),
      'E_NET',
    ],
    [
      'microvm.VMSpawn',
      () => ({ backend: qemuBackend({ extraArgs: ['-no-such-qemu-option'] }) }),
      'ERR_MICROVM_BOOT_FAILED',
    ],
    [
      'microvm.PostBoot',
      () => ({
        postBoot: [
          async () => {
            throw failing('E_POST');
          },
        ],
      }),
      'E_POST',
    ],
  ])('a failure in %s: the coded error, ERROR spans, no process and no directory left', async (stage, extra, code) => {
    const err = await run('test-image', base(extra())).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: typeof code === 'string' ? code : expect.stringMatching(code) });
    expect(span(stage).status.code).toBe(SpanStatusCode.ERROR);
    expect(span('microvm.Run').status.code).toBe(SpanStatusCode.ERROR);
    expect(span('microvm.Run').attributes['error.type']).toBe((err as { code: string }).code);
    await nothingLeft();
  });

  test.each<[string, (ac: AbortController) => RunOptions]>([
    ['microvm.RootfsHooks', (ac) => ({ rootfsHooks: [() => ac.abort()] })],
    [
      'microvm.VMSpawn',
      (ac) => ({
        // Aborted while QEMU boots: the guest init has not said UP yet.
        rootfsHooks: [() => void setTimeout(() => ac.abort(), 300)],
      }),
    ],
    ['microvm.PostBoot', (ac) => ({ postBoot: [() => ac.abort()] })],
  ])('abort during %s: AbortError, that span ERROR, QEMU and virtiofsd gone, no directory', async (stage, extra) => {
    const ac = new AbortController();
    const err = await run('test-image', base({ signal: ac.signal, ...extra(ac) })).catch((e: unknown) => e);
    expect(err).toMatchObject({ name: 'AbortError' });
    expect(span(stage).status.code).toBe(SpanStatusCode.ERROR);
    expect(span('microvm.Run').status.code).toBe(SpanStatusCode.ERROR);
    await nothingLeft();
  });

  test('a VM that dies during PostBoot (its command exits): ERR_MICROVM_VM_EXITED with its stderr, nothing left', async () => {
    const err = await run(
      'test-image',
      base({
        initOverride: ['/bin/sh', '-c', 'echo dying words >&2; exit 4'],
        postBoot: [() => new Promise<void>(() => undefined)], // waits forever unless the VM's end ends it
      }),
    ).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_MICROVM_VM_EXITED', message: expect.stringContaining('dying words') });
    expect(span('microvm.PostBoot').status.code).toBe(SpanStatusCode.ERROR);
    await nothingLeft();
  });

  test('remove() of a running VM: QEMU and virtiofsd gone, directory gone', async () => {
    const vm: MicroVM = await run('test-image', base());
    expect(related().length).toBeGreaterThanOrEqual(2);
    await vm.remove();
    expect(await vm.wait()).toMatchObject({ reason: 'stopped' });
    await nothingLeft();
  });
});

(skip ? describe.skip : describe)(`readiness against a real dropbear${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  test('waitForReady keeps one probe in flight (dropbear drops excess unauthenticated clients) and gets in once dropbear is up', async () => {
    const vm = await run(
      'test-image',
      base({
        initOverride: [
          '/bin/sh',
          '-c',
          'sleep 1; exec /usr/sbin/dropbear -F -E -r /etc/dropbear/dropbear_ed25519_host_key -p 22',
        ],
        ssh: { waitReady: false },
      }),
    );
    // A counting proxy between the probes and QEMU's forward to the guest's port 22.
    const target = vm.ports.find((p) => p.guest === 22)?.host as number;
    let open = 0;
    let most = 0;
    let total = 0;
    const proxy = net.createServer((c) => {
      total++;
      most = Math.max(most, ++open);
      const up = net.connect(target, '127.0.0.1');
      c.pipe(up).pipe(c);
      const done = (): void => {
        c.destroy();
        up.destroy();
      };
      c.on('close', () => {
        open--;
        done();
      });
      c.on('error', done);
      up.on('error', done);
      up.on('close', done);
    });
    await new Promise<void>((r) => proxy.listen(0, '127.0.0.1', () => r()));
    try {
      const key = loadKeyPair(
        path.join(
          vm.dataDir,
          'ssh',
          fs
            .readdirSync(path.join(vm.dataDir, 'ssh'))
            .find((f) => f.startsWith('id_') && !f.endsWith('.pub')) as string,
        ),
      );
      const client = await waitForReady({
        host: '127.0.0.1',
        port: (proxy.address() as net.AddressInfo).port,
        username: 'root',
        privateKey: key.privateKey,
        hostKey: { insecureAcceptAny: true },
        timeoutMs: 60000,
      });
      expect((await client.exec('echo in')).stdout).toBe('in\n');
      client.close();
      expect(total).toBeGreaterThan(1); // it did probe before dropbear was up
      expect(most).toBe(1);
    } finally {
      proxy.close();
      await vm.remove();
    }
  });
});
