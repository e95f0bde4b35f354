/**
 * The telemetry contract, pinned by value: every span name, parent, attribute key and event name
 * below is a literal string (never the SPAN/ATTR constants the code uses), checked against real
 * runs — the libkrun RECORDING ABI TEST DOUBLE for libkrun's spans, a real QEMU boot with dropbear
 * for the QEMU and SSH ones — and against docs/telemetry.md. Renaming one in the code, or in the
 * docs, breaks this test. go-microvm's keys (microvm.image, microvm.memory_mib, ...) are among them.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ROOT_CONTEXT, SpanStatusCode } from '@opentelemetry/api';
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  type ReadableSpan,
  SimpleSpanProcessor,
} from '@opentelemetry/sdk-trace-base';
import { hooks, libkrunBackend, run, type RunOptions } from '../lib';
import { packageRoot } from '../lib/native';
import { emitGuestSpans, parseMilestones } from '../lib/telemetry/guest';
import { doubleDir, firmwareDir, qemuSkipReason, scratch } from './helpers';

/** span -> [parent, attribute keys that must be set on it]. */
const COMMON: Record<string, [string | null, string[]]> = {
  'microvm.Run': [
    null,
    [
      'microvm.image',
      'microvm.name',
      'microvm.cpus',
      'microvm.memory_mib',
      'microvm.vm.id',
      'microvm.backend',
      'microvm.vm.pid',
    ],
  ],
  'microvm.Preflight': ['microvm.Run', []],
  'microvm.preflight.RunAll': ['microvm.Preflight', ['preflight.check_count']],
  'microvm.preflight.Check': [
    'microvm.preflight.RunAll',
    ['preflight.check.name', 'preflight.check.required', 'preflight.check.passed'],
  ],
  'microvm.ImagePull': ['microvm.Run', ['microvm.image_ref', 'microvm.image.source']],
  'microvm.RootfsClone': ['microvm.Run', ['microvm.rootfs.clone_strategy']],
  'microvm.RootfsHooks': ['microvm.Run', ['microvm.hook_count']],
  'microvm.BackendPrepare': ['microvm.Run', ['microvm.backend']],
  'microvm.NetworkStart': ['microvm.Run', ['microvm.network.provider', 'microvm.network.ports']],
  'microvm.AdmissionWait': ['microvm.Run', ['microvm.admission.limit', 'microvm.admission.waited_ms']],
  'microvm.VMSpawn': ['microvm.Run', ['microvm.vm.pid']],
  'microvm.backend.Start': ['microvm.VMSpawn', ['microvm.backend', 'microvm.vm.pid']],
  'microvm.backend.ResolveRuntime': ['microvm.backend.Start', ['microvm.runtime.runner_path']],
  'microvm.backend.ResolveFirmware': [
    'microvm.backend.Start',
    ['microvm.firmware.path', 'microvm.firmware.abi_version'],
  ],
  'microvm.PostBoot': ['microvm.Run', ['microvm.post_boot.hook_count']],
};
const LIBKRUN_ONLY: Record<string, string[]> = {
  'microvm.backend.ResolveRuntime': ['microvm.runtime.libkrun_path'],
  'microvm.ImagePull': ['microvm.image.prebuilt'],
};
const QEMU_ONLY: Record<string, [string | null, string[]]> = {
  'microvm.AgentWaitReady': [
    'microvm.PostBoot',
    ['microvm.agent.socket', 'microvm.agent.ready', 'microvm.agent.uptime_ms'],
  ],
  'microvm.SSHWaitReady': [
    'microvm.PostBoot',
    ['ssh.host', 'ssh.port', 'ssh.user', 'ssh.probes_total', 'server.address', 'server.port'],
  ],
};
const QEMU_ATTRS: Record<string, string[]> = {
  'microvm.backend.ResolveRuntime': ['microvm.qemu.accel', 'microvm.qemu.accel_reason'],
  'microvm.backend.Start': ['microvm.qemu.accel'],
};
/** The image sub-spans (a pull from an OCI layout) and their keys. */
const IMAGE_SPANS: Record<string, [string, string[]]> = {
  'microvm.image.CacheLookup': ['microvm.ImagePull', ['microvm.image', 'microvm.image.cache_hit']],
  'microvm.image.Fetch': ['microvm.ImagePull', ['microvm.image', 'microvm.image.digest', 'microvm.image.layers']],
  'microvm.image.Extract': ['microvm.ImagePull', ['microvm.image.layered', 'microvm.image.entries']],
  'microvm.image.CacheStore': ['microvm.ImagePull', ['microvm.image.digest']],
};
/** run({ waitFor }) spans (checked on real boots in test/e2e/qemu.test.ts and the double in test/pipeline/run.test.ts). */
const WAIT_SPANS: Record<string, [string, string[]]> = {
  'microvm.WaitForLog': ['microvm.PostBoot', ['microvm.wait.pattern', 'microvm.wait.stream', 'microvm.wait.attempts']],
  'microvm.WaitForTCP': [
    'microvm.PostBoot',
    ['microvm.wait.guest_port', 'server.address', 'server.port', 'microvm.wait.attempts'],
  ],
  'microvm.WaitForHTTP': [
    'microvm.PostBoot',
    [
      'microvm.wait.guest_port',
      'server.address',
      'server.port',
      'url.path',
      'http.response.status_code',
      'microvm.wait.attempts',
    ],
  ],
};
/** Inside the guest (QEMU backend's init): span -> [parent, keys]. */
const GUEST_SPANS: Record<string, [string, string[]]> = {
  'microvm.guest.Boot': [
    'microvm.Run',
    ['microvm.guest.uptime_ms', 'microvm.guest.clock_error_ms', 'microvm.guest.milestones', 'microvm.qemu.accel'],
  ],
  'microvm.guest.Kernel': ['microvm.guest.Boot', []],
  'microvm.guest.Mounts': ['microvm.guest.Boot', []],
  'microvm.guest.Network': ['microvm.guest.Boot', []],
  'microvm.guest.Config': ['microvm.guest.Boot', []],
  'microvm.guest.Exec': ['microvm.guest.Boot', []],
};
/** Lifecycle calls on a running VM (checked on real boots in test/e2e/pause.test.ts): span -> keys. */
const LIFECYCLE_SPANS: Record<string, string[]> = {
  'microvm.Pause': ['microvm.name', 'microvm.backend'],
  'microvm.Resume': ['microvm.name', 'microvm.backend'],
};
const EVENTS = { probeFailed: 'ssh.probe_failed', probeCount: 'ssh.probe_count', probeError: 'error' };
const FAILURE_KEYS = ['error.type'];

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-contract-');
});
afterEach(() => s.cleanup());

function capture(): { provider: BasicTracerProvider; spans: () => ReadableSpan[] } {
  const exporter = new InMemorySpanExporter();
  const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
  return { provider, spans: () => exporter.getFinishedSpans() };
}

/** Checks `spans` against `contract`: each span once, under its parent, with its keys. */
function check(spans: ReadableSpan[], contract: Record<string, [string | null, string[]]>): void {
  const byId = new Map(spans.map((x) => [x.spanContext().spanId, x]));
  for (const [name, [parent, keys]] of Object.entries(contract)) {
    const found = spans.filter((x) => x.name === name);
    expect([name, found.length > 0]).toEqual([name, true]);
    for (const sp of found) {
      const p = sp.parentSpanContext ? byId.get(sp.parentSpanContext.spanId)?.name : undefined;
      expect([name, p ?? null]).toEqual([name, parent]);
      for (const k of keys) expect([name, k, sp.attributes[k] !== undefined]).toEqual([name, k, true]);
    }
  }
}

const docs = fs.readFileSync(path.join(packageRoot, 'docs', 'telemetry.md'), 'utf8');

describe('the telemetry contract', () => {
  test('docs/telemetry.md names every span, attribute key and event of the contract, in backticks', () => {
    const names = new Set<string>([
      ...Object.keys(COMMON),
      ...Object.keys(QEMU_ONLY),
      ...Object.keys(IMAGE_SPANS),
      ...Object.keys(WAIT_SPANS),
      ...Object.keys(GUEST_SPANS),
      ...Object.keys(LIFECYCLE_SPANS),
      ...Object.values(LIFECYCLE_SPANS).flat(),
      ...Object.values(GUEST_SPANS).flatMap(([, k]) => k),
      'TRACEPARENT',
      ...Object.values(WAIT_SPANS).flatMap(([, k]) => k),
      ...Object.values(COMMON).flatMap(([, k]) => k),
      ...Object.values(LIBKRUN_ONLY).flat(),
      ...Object.values(QEMU_ONLY).flatMap(([, k]) => k),
      ...Object.values(QEMU_ATTRS).flat(),
      ...Object.values(IMAGE_SPANS).flatMap(([, k]) => k),
      ...Object.values(EVENTS),
      ...FAILURE_KEYS,
    ]);
    const missing = [...names].filter((n) => !docs.includes(`\`${n}\``));
    expect(missing).toEqual([]);
  });

  test('libkrun (recording ABI test double): the span tree and its keys, and nothing outside the contract', async () => {
    const { provider, spans } = capture();
    const vm = await run('example.org/contract:1', {
      rootfsPath: makeImage(),
      dataDir: path.join(s.dir, 'data'),
      initOverride: ['/bin/sh'],
      cpus: 2,
      memoryMiB: 256,
      ports: [{ host: 40123, guest: 80 }],
      rootfsHooks: [hooks.injectFile('/etc/motd', 'x\n')],
      // The built-in checks would fail here (no hardware KVM, no libkrun): one that passes.
      preflight: [{ name: 'always', description: 'passes', required: true, run: () => ({ ok: true }) }],
      // This double runs no guest (no KRUN_DOUBLE_RUN_GUEST): nothing would answer as the agent.
      agent: false,
      backend: libkrunBackend({
        runtime: { libDir: doubleDir(), pkgConfig: false, systemDirs: [], loaderSearch: false },
        firmware: { dir: firmwareDir(), systemDirs: [], loaderSearch: false },
        env: { PATH: process.env.PATH },
      }),
      tracerProvider: provider,
    } satisfies RunOptions);
    await vm.remove();
    const all = spans();
    check(all, COMMON);
    for (const [name, keys] of Object.entries(LIBKRUN_ONLY))
      for (const k of keys)
        expect([name, k, all.find((x) => x.name === name)?.attributes[k] !== undefined]).toEqual([name, k, true]);
    const run0 = all.find((x) => x.name === 'microvm.Run') as ReadableSpan;
    expect(run0.attributes).toMatchObject({
      'microvm.image': 'example.org/contract:1',
      'microvm.cpus': 2,
      'microvm.memory_mib': 256,
      'microvm.backend': 'libkrun',
    });
    expect(all.find((x) => x.name === 'microvm.RootfsHooks')?.attributes['microvm.hook_count']).toBe(1);
    expect(all.find((x) => x.name === 'microvm.NetworkStart')?.attributes).toMatchObject({
      'microvm.network.provider': 'tsi',
      'microvm.network.ports': ['40123:80'],
    });
    const known = new Set([...Object.keys(COMMON), ...Object.keys(QEMU_ONLY), ...Object.keys(IMAGE_SPANS)]);
    expect(all.map((x) => x.name).filter((n) => !known.has(n))).toEqual([]);
  });

  test('a failing stage: status ERROR, error.type and a recorded exception on the stage and on microvm.Run', async () => {
    const { provider, spans } = capture();
    await expect(
      run('x', {
        rootfsPath: path.join(s.dir, 'missing'),
        dataDir: path.join(s.dir, 'data'),
        preflight: [],
        backend: 'qemu',
        tracerProvider: provider,
      }),
    ).rejects.toMatchObject({ code: 'ERR_MICROVM_ROOTFS_NOT_FOUND' });
    for (const name of ['microvm.ImagePull', 'microvm.Run']) {
      const sp = spans().find((x) => x.name === name) as ReadableSpan;
      expect([name, sp.status.code]).toEqual([name, SpanStatusCode.ERROR]);
      expect(sp.attributes['error.type']).toBe('ERR_MICROVM_ROOTFS_NOT_FOUND');
      expect(sp.events.map((e) => e.name)).toContain('exception');
    }
  });

  const skip = qemuSkipReason();
  const layout = process.env.MICROVM_TEST_LAYOUT;
  (skip || !layout ? test.skip : test)(
    `QEMU (a real boot, pulled from an OCI layout, SSH to dropbear): the image and SSH spans, go-microvm's keys${skip ? ` [skipped: ${skip}]` : ''}`,
    async () => {
      process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;
      const { provider, spans } = capture();
      const vm = await run(`oci:${layout}:test`, {
        dataDir: path.join(s.dir, 'data'),
        backend: 'qemu',
        initOverride: ['/usr/sbin/dropbear', '-F', '-E', '-r', '/etc/dropbear/dropbear_ed25519_host_key', '-p', '22'],
        ssh: { timeoutMs: 60000 },
        tracerProvider: provider,
      });
      await vm.remove();
      const all = spans();
      check(all, { ...COMMON, ...QEMU_ONLY, ...IMAGE_SPANS });
      for (const [name, keys] of Object.entries(QEMU_ATTRS))
        for (const k of keys)
          expect([name, k, all.find((x) => x.name === name)?.attributes[k] !== undefined]).toEqual([name, k, true]);
      expect(all.find((x) => x.name === 'microvm.ImagePull')?.attributes).toMatchObject({
        'microvm.image_ref': `oci:${layout}:test`,
        'microvm.image.from_cache': false,
      });
      expect(all.find((x) => x.name === 'microvm.NetworkStart')?.attributes['microvm.network.provider']).toBe(
        'qemu-user',
      );
      const wait = all.find((x) => x.name === 'microvm.SSHWaitReady') as ReadableSpan;
      expect(wait.attributes).toMatchObject({ 'ssh.host': '127.0.0.1', 'ssh.user': 'root' });
      // dropbear starts after the forward exists: at least one probe failed first (TCG boot).
      const failed = wait.events.filter((e) => e.name === EVENTS.probeFailed);
      expect(failed.length).toBe((wait.attributes['ssh.probes_total'] as number) - 1);
      for (const e of failed) {
        expect(typeof e.attributes?.[EVENTS.probeCount]).toBe('number');
        expect(typeof e.attributes?.[EVENTS.probeError]).toBe('string');
      }
    },
  );

  (skip ? test.skip : test)(
    `QEMU (a real boot, busybox httpd): waitFor log, tcp and http, each its span with its keys; ports host 0${skip ? ` [skipped: ${skip}]` : ''}`,
    async () => {
      process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;
      const { provider, spans } = capture();
      const www = '/tmp/www';
      const vm = await run('test-image', {
        rootfsPath: process.env.MICROVM_TEST_IMAGE,
        dataDir: path.join(s.dir, 'data'),
        backend: 'qemu',
        ports: [{ host: 0, guest: 8080 }],
        initOverride: [
          '/bin/sh',
          '-c',
          `mkdir -p ${www}; echo hello > ${www}/index.html; sleep 1; echo "server ready"; exec busybox httpd -f -p 8080 -h ${www}`,
        ],
        // tcp first: it must wait through the boot and the sleep (QEMU accepts on the host at once).
        waitFor: [{ tcp: 8080 }, { log: /^server ready$/ }, { http: { port: 8080, path: '/index.html', status: 200 } }],
        tracerProvider: provider,
      });
      try {
        const host = vm.port(8080);
        const body = await fetch(`http://127.0.0.1:${host}/index.html`).then((r) => r.text());
        expect(body).toBe('hello\n');
      } finally {
        await vm.remove();
      }
      const all = spans();
      check(all, WAIT_SPANS);
      const names = all.filter((x) => x.name.startsWith('microvm.WaitFor')).map((x) => x.name);
      expect(names).toEqual(['microvm.WaitForTCP', 'microvm.WaitForLog', 'microvm.WaitForHTTP']);
      // The TCP wait did not take the first host-side accept: it probed until the guest answered.
      expect(all.find((x) => x.name === 'microvm.WaitForTCP')?.attributes['microvm.wait.attempts']).toBeGreaterThan(1);
      const h = all.find((x) => x.name === 'microvm.WaitForHTTP') as ReadableSpan;
      expect(h.attributes).toMatchObject({
        'http.response.status_code': 200,
        'url.path': '/index.html',
        'microvm.wait.guest_port': 8080,
        'server.address': '127.0.0.1',
      });
      expect(h.attributes['server.port']).toBe(vm.ports[0].host);
    },
  );
});

describe('inside the guest', () => {
  const skip = qemuSkipReason();
  (skip ? test.skip : test)(
    `QEMU (a real TCG/KVM boot): the init's milestones as spans under microvm.Run, on the host's clock; TRACEPARENT reaches the command${skip ? ` [skipped: ${skip}]` : ''}`,
    async () => {
      process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;
      const { provider, spans } = capture();
      const vm = await run('test-image', {
        rootfsPath: process.env.MICROVM_TEST_IMAGE,
        dataDir: path.join(s.dir, 'data'),
        backend: 'qemu',
        initOverride: ['/bin/sh', '-c', 'echo "$TRACEPARENT"'],
        tracerProvider: provider,
      });
      expect(await vm.wait()).toMatchObject({ reason: 'exited', exitCode: 0 });
      const printed = fs.readFileSync(vm.stdoutPath as string, 'utf8');
      await vm.remove();
      const all = spans();
      check(all, GUEST_SPANS);
      const one = (n: string): ReadableSpan => all.find((x) => x.name === n) as ReadableSpan;
      const root = one('microvm.Run');
      // W3C traceparent: version 00, the run's trace id, microvm.Run as the parent, sampled.
      expect(printed).toBe(`00-${root.spanContext().traceId}-${root.spanContext().spanId}-01\n`);
      const t = (h: [number, number]): number => h[0] * 1e3 + h[1] / 1e6;
      const boot = one('microvm.guest.Boot');
      const parts = ['Kernel', 'Mounts', 'Network', 'Config', 'Exec'].map((n) => one(`microvm.guest.${n}`));
      // Consecutive: each starts where the one before ended; together they are Boot.
      expect(t(parts[0].startTime)).toBeCloseTo(t(boot.startTime), 3);
      for (let i = 1; i < parts.length; i++) expect(t(parts[i].startTime)).toBeCloseTo(t(parts[i - 1].endTime), 3);
      expect(t(parts[4].endTime)).toBeCloseTo(t(boot.endTime), 3);
      expect(boot.attributes['microvm.guest.milestones']).toBe('init,mounts,network,config,exec');
      // On the host's clock: the kernel starts after QEMU was started, the init's mounts end when
      // VMSpawn saw "UP" (it ends after that), so the mapping is neither early nor late beyond the bound.
      const spawn = one('microvm.VMSpawn');
      expect(t(boot.startTime)).toBeGreaterThan(t(spawn.startTime));
      // (within 1 ms: the SDK anchors each host span at Date.now(), whose resolution is 1 ms)
      expect(t(parts[1].endTime)).toBeLessThanOrEqual(t(spawn.endTime) + 1);
      // ...and not early: the mounts end inside VMSpawn (a load-independent bound; how soon after UP
      // start() returns depends on how busy the host is).
      expect(t(parts[1].endTime)).toBeGreaterThan(t(spawn.startTime));
      // The guest's uptime at exec is the Boot span's length.
      expect(boot.attributes['microvm.guest.uptime_ms'] as number).toBeCloseTo(t(boot.endTime) - t(boot.startTime), 3);
    },
  );

  test('hostile milestone lines: unknown names, repeats, huge numbers and disorder emit nothing wrong', () => {
    const { provider, spans } = capture();
    const scope = { tracer: provider.getTracer('t'), ctx: ROOT_CONTEXT };
    const m = parseMilestones('T init 5\nT evil 1\nT init 9\nT mounts 99999999999999999\nT network x\nUP\n');
    expect(m).toEqual({ init: 5 }); // 17 digits refused, the repeat ignored, the unknown name ignored
    expect(emitGuestSpans(scope, m, 1_790_000_000_000)).toBe(false); // no mounts: no clock mapping
    expect(emitGuestSpans(scope, { init: 50, mounts: 40 }, 1_790_000_000_000)).toBe(false); // out of order
    expect(spans()).toEqual([]);
    const base = performance.now() - 10; // performance.now() when UP was read, 10 ms ago
    // The mapping's anchor (Date.now() - performance.now()), sampled on both sides of the call: it
    // does not depend on how long the call or a loaded machine takes, only on the two clocks.
    const before = Date.now() - performance.now();
    expect(emitGuestSpans(scope, { init: 1_000_000, mounts: 3_000_000 }, base)).toBe(true);
    const after = Date.now() - performance.now();
    const names = spans().map((x) => x.name);
    expect(names.sort()).toEqual(['microvm.guest.Boot', 'microvm.guest.Kernel', 'microvm.guest.Mounts']);
    const kernel = spans().find((x) => x.name === 'microvm.guest.Kernel') as ReadableSpan;
    const ms = (h: [number, number]): number => h[0] * 1e3 + h[1] / 1e6;
    // Guest 0 maps to UP - 3 ms on the epoch clock (anchor + base - 3), within Date.now()'s 1 ms
    // resolution; the kernel span is 1 ms long.
    const start = ms(kernel.startTime);
    expect(start).toBeGreaterThanOrEqual(Math.min(before, after) + base - 3 - 1);
    expect(start).toBeLessThanOrEqual(Math.max(before, after) + base - 3 + 1);
    expect(ms(kernel.endTime) - ms(kernel.startTime)).toBeCloseTo(1, 3);
  });
});

function makeImage(): string {
  const img = path.join(s.dir, 'image');
  fs.mkdirSync(path.join(img, 'etc'), { recursive: true });
  fs.mkdirSync(path.join(img, 'bin'));
  fs.writeFileSync(path.join(img, 'etc', 'passwd'), 'root:x:0:0:root:/root:/bin/sh\n');
  fs.writeFileSync(path.join(img, 'bin', 'sh'), '#!fake\n', { mode: 0o755 });
  return img;
}
