/**
 * lib/backends/qemu/launch.ts without a boot: the guest kernel's command line, QEMU's arguments and
 * the launch plan native/runner/qemu_launch.cc reads, for the inputs that change them.
 */
import { kernelCommandLine, launchFiles, qemuLaunch, type LaunchHost } from '../../lib/backends/qemu/launch';
import type { BackendStartInput } from '../../lib/backends/types';

const host: LaunchHost = {
  qemuPath: '/usr/bin/qemu-system-x86_64',
  virtiofsdPath: '/usr/lib/qemu/virtiofsd',
  fsGuard: '/pkg/microvm-fsguard.so',
  runnerPath: '/pkg/microvm-runner',
  kernel: '/data/kernels/k.elf',
  accel: 'tcg',
  tscKhz: 2_100_000,
  relay: { node: '/usr/bin/node', script: '/pkg/dist/network/relay.js' },
  env: { PATH: '/usr/bin:/bin' },
};

const input = (extra: Partial<BackendStartInput> = {}): BackendStartInput =>
  ({
    vmId: 'id',
    name: 'vm',
    dataDir: '/data/vms/vm',
    rootfs: { rootPath: '/data/vms/vm/rootfs/merged', strategy: 'copy' },
    cpus: 2,
    memoryMiB: 256,
    ports: [{ host: 8080, guest: 80 }],
    virtiofs: [],
    logLevel: 1,
    consoleLogPath: '/data/vms/vm/console.log',
    stdoutPath: '/data/vms/vm/stdout.log',
    stderrPath: '/data/vms/vm/stderr.log',
    logPath: '/data/vms/vm/vm.log',
    bootTimeoutMs: 60_000,
    scope: {} as BackendStartInput['scope'],
    ...extra,
  }) as BackendStartInput;

const arg = (args: string[], flag: string): string | undefined => args[args.indexOf(flag) + 1];

test('the kernel command line: TCG gets its boot savings, KVM keeps the defaults; the TSC when known', () => {
  const tcg = kernelCommandLine('tcg', 2_100_000);
  const kvm = kernelCommandLine('kvm');
  for (const o of ['mitigations=off', 'nolapic_timer', 'noreplace-smp', 'initcall_blacklist=jent_mod_init'])
    expect([o, tcg.includes(o), kvm.includes(o)]).toEqual([o, true, false]);
  expect(tcg).toContain('tsc_early_khz=2100000');
  expect(kvm.some((o) => o.startsWith('tsc_early_khz'))).toBe(false);
  for (const c of [tcg, kvm])
    expect(c).toEqual(expect.arrayContaining(['reboot=t', 'panic=-1', 'init=/.microvm/init']));
});

test("QEMU's arguments: accel and CPU model, the vCPUs and memory asked for, forwards, every output port to the sink", () => {
  const { qemuArgs, plan } = qemuLaunch(input(), host);
  expect(qemuArgs[0]).toBe(host.qemuPath);
  expect([arg(qemuArgs, '-accel'), arg(qemuArgs, '-cpu'), arg(qemuArgs, '-smp'), arg(qemuArgs, '-m')]).toEqual([
    'tcg',
    'max,-svm,-vmx',
    '2',
    '256M',
  ]);
  expect(qemuLaunch(input(), { ...host, accel: 'kvm' }).qemuArgs).toContain('host');
  expect(arg(qemuArgs, '-netdev')).toBe('user,id=n0,hostfwd=tcp:127.0.0.1:8080-:80');
  const f = launchFiles('/data/vms/vm');
  const streams = (plan.sink as { streams: { name: string; socket: string; file: string; max: number }[] }).streams;
  expect(streams.map((x) => [x.name, x.file, x.max])).toEqual([
    ['console', '/data/vms/vm/console.log', 64 * 2 ** 20],
    ['exit', f.exitFile, 64 * 1024],
    ['stdout', '/data/vms/vm/stdout.log', 64 * 2 ** 20],
    ['stderr', '/data/vms/vm/stderr.log', 64 * 2 ** 20],
    ['times', f.timesFile, 16 * 2 ** 20],
  ]);
  for (const x of streams) expect(qemuArgs).toContain(`socket,id=${x.name},path=${x.socket}`);
  expect(qemuLaunch(input({ outputTimes: false, logMaxBytes: 4096 }), host).plan.sink).toMatchObject({
    streams: [{ name: 'console', max: 4096 }, { name: 'exit' }, { name: 'stdout', max: 4096 }, { name: 'stderr' }],
  });
});

test('the plan: the root and each share served by virtiofsd (read-only ones from a bind mount), the overlay when there is one', () => {
  const { plan, mountPoints } = qemuLaunch(
    input({
      rootfs: {
        rootPath: '/data/vms/vm/rootfs/merged',
        strategy: 'overlay',
        overlay: { lower: '/cache/img', upper: '/data/vms/vm/rootfs/upper', work: '/data/vms/vm/rootfs/work' },
      } as BackendStartInput['rootfs'],
      virtiofs: [
        { tag: 'vol0', hostPath: '/srv/rw', readOnly: false },
        { tag: 'vol1', hostPath: '/srv/ro', readOnly: true },
      ],
    }),
    host,
  );
  expect(plan).toMatchObject({
    version: 1,
    overlay: {
      lower: '/cache/img',
      upper: '/data/vms/vm/rootfs/upper',
      work: '/data/vms/vm/rootfs/work',
      merged: '/data/vms/vm/rootfs/merged',
    },
    virtiofsd: host.virtiofsdPath,
    fsGuard: host.fsGuard,
    fileServers: [
      { source: '/data/vms/vm/rootfs/merged', socket: '/data/vms/vm/virtiofs.sock', cache: 'always' },
      { source: '/srv/rw', socket: '/data/vms/vm/share-0.sock', cache: 'auto' },
      { source: '/srv/ro', socket: '/data/vms/vm/share-1.sock', cache: 'auto', readOnlyAt: '/data/vms/vm/shares/1' },
    ],
  });
  expect((plan.fileServers as object[])[1]).not.toHaveProperty('readOnlyAt');
  expect(mountPoints).toEqual(['/data/vms/vm/shares/1']);
  expect(qemuLaunch(input(), host).plan).not.toHaveProperty('overlay');
});

test("egress: an allow-list gets the relay and restricted networking; the filter's policies get the filter preloaded and no restriction", () => {
  const listed = qemuLaunch(input({ egress: { allow: [{ host: 'api.test', port: 443 }] } }), {
    ...host,
    env: { ...host.env, MICROVM_RELAY_MAX_CONNECTIONS: '4' },
  });
  expect(arg(listed.qemuArgs, '-netdev')).toMatch(
    /^user,id=n0,restrict=on,hostfwd=tcp:127\.0\.0\.1:8080-:80,guestfwd=tcp:10\.0\.2\.100:443-cmd:\/pkg\/microvm-runner --relay-connect \/data\/vms\/vm\/relay\.sock 0$/,
  );
  expect(listed.plan.relay).toEqual({
    node: '/usr/bin/node',
    script: '/pkg/dist/network/relay.js',
    socket: '/data/vms/vm/relay.sock',
    rules: '/data/vms/vm/relay-rules.json',
    log: '/data/vms/vm/egress.log',
    env: ['MICROVM_RELAY_MAX_CONNECTIONS=4'],
  });
  expect(JSON.parse(listed.relayRules?.text ?? '')).toEqual([{ host: 'api.test', port: 443, address: null }]);
  expect(listed.plan).not.toHaveProperty('netGuard');
  const guarded = qemuLaunch(input({ egress: { allow: [{ cidr: '192.0.2.0/24' }] } }), {
    ...host,
    netGuard: { library: '/pkg/microvm-netguard.so', policy: '/data/vms/vm/egress-policy' },
  });
  expect(arg(guarded.qemuArgs, '-netdev')).toBe('user,id=n0,hostfwd=tcp:127.0.0.1:8080-:80');
  expect(guarded.plan).toMatchObject({ netGuard: { library: '/pkg/microvm-netguard.so' } });
  expect(guarded.plan).not.toHaveProperty('relay');
  expect(arg(qemuLaunch(input({ egress: 'deny' }), host).qemuArgs, '-netdev')).toMatch(/restrict=on/);
});
