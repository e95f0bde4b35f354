/**
 * A hostile guest against the host, with real VMs (QEMU backend, real virtiofsd): what root in the
 * guest does to files through a share and through its own root filesystem never gives a host user
 * a privilege. The guest makes root-owned set-user-ID files, set-group-ID files and directories,
 * block and character devices, a FIFO; the host then looks at what is really on its disk.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { type MicroVM, run, type RunOptions } from '../../lib';
import { qemuSkipReason, scratch } from '../helpers';

const skip = qemuSkipReason();
process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;

let s: ReturnType<typeof scratch>;
const vms: MicroVM[] = [];
beforeEach(() => {
  s = scratch('microvm-safety-');
});
afterEach(async () => {
  for (const vm of vms.splice(0)) await vm.remove().catch(() => undefined);
  s.cleanup();
});

// Runs as root in the guest; prints what each attempt returned, for the assertions below.
const HOSTILE = (dir: string): string =>
  [
    `cd ${dir}`,
    'echo payload > suid && chown 0:0 suid && chmod 4755 suid; echo "chmod4755=$?"',
    'echo payload > sgid && chmod 2755 sgid',
    'echo payload > both; chmod 6777 both',
    'mkdir -p shared && chmod 2775 shared',
    'mknod hostdisk b 254 0; echo "mknodb=$?"',
    'mknod hostmem c 1 1; echo "mknodc=$?"',
    'mknod fifo p; echo "fifo=$?"',
    'mkfifo -m 4777 sfifo; echo "sfifo=$?"',
    // What the guest itself sees: the bits were not kept.
    'stat -c "%n %a" suid sgid both shared',
  ].join('; ');

function modeOf(file: string): number {
  return fs.lstatSync(file).mode;
}

(skip ? describe.skip : describe)(`guest root is not host root${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  test('through a read-write share: no set-ID file, no device node on the host; FIFOs and set-group-ID directories work', async () => {
    const share = path.join(s.dir, 'share');
    fs.mkdirSync(share, { mode: 0o777 });
    const log = path.join(s.dir, 'guard.log');
    process.env.MICROVM_FSGUARD_LOG = log;
    let vm: MicroVM;
    try {
      vm = await run('test-image', {
        rootfsPath: process.env.MICROVM_TEST_IMAGE,
        backend: 'qemu',
        dataDir: path.join(s.dir, 'data'),
        virtiofs: [{ tag: 'rw', hostPath: share, guestPath: '/mnt/rw' }],
        initOverride: ['/bin/sh', '-c', HOSTILE('/mnt/rw')],
      } satisfies RunOptions);
    } finally {
      delete process.env.MICROVM_FSGUARD_LOG;
    }
    vms.push(vm);
    expect(await vm.wait()).toMatchObject({ reason: 'exited' });
    const out = fs.readFileSync(vm.stdoutPath as string, 'utf8');
    expect(out).toMatch(/mknodb=1/);
    expect(out).toMatch(/mknodc=1/);
    expect(out).toMatch(/fifo=0/);
    expect(out).toMatch(/^suid 755$/m);
    expect(out).toMatch(/^sgid 755$/m);
    expect(out).toMatch(/^both 777$/m);
    expect(out).toMatch(/^shared 2775$/m);

    // A FIFO made with set-ID bits (mkfifo, which glibc does not route through mknodat) loses them too.
    expect(out).toMatch(/sfifo=0/);
    expect(fs.lstatSync(path.join(share, 'sfifo')).mode & 0o6000).toBe(0);
    for (const f of ['suid', 'sgid', 'both']) {
      const st = fs.statSync(path.join(share, f));
      expect([f, st.mode & 0o6000]).toEqual([f, 0]);
      expect(fs.readFileSync(path.join(share, f), 'utf8')).toBe('payload\n');
    }
    expect(modeOf(path.join(share, 'shared')) & 0o7777).toBe(0o2775);
    expect(fs.existsSync(path.join(share, 'hostdisk'))).toBe(false);
    expect(fs.existsSync(path.join(share, 'hostmem'))).toBe(false);
    expect(fs.lstatSync(path.join(share, 'fifo')).isFIFO()).toBe(true);
    // The guard said what it refused (the log is how an operator sees it).
    const said = fs.readFileSync(log, 'utf8');
    expect(said).toMatch(/^mknod hostdisk 60644$/m);
    expect(said).toMatch(/^strip /m);
  });

  test("through the VM's own root filesystem (its overlay upper layer on the host): the same", async () => {
    const vm = await run('test-image', {
      rootfsPath: process.env.MICROVM_TEST_IMAGE,
      backend: 'qemu',
      dataDir: path.join(s.dir, 'data'),
      initOverride: ['/bin/sh', '-c', `mkdir -p /hostile; ${HOSTILE('/hostile')}`],
    });
    vms.push(vm);
    expect(await vm.wait()).toMatchObject({ reason: 'exited' });
    const out = fs.readFileSync(vm.stdoutPath as string, 'utf8');
    expect(out).toMatch(/mknodb=1/);
    expect(out).toMatch(/^suid 755$/m);
    // Everything the guest wrote is in the VM's directory on the host: look at all of it.
    const found: string[] = [];
    const walk = (dir: string): void => {
      for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
        const p = path.join(dir, e.name);
        const st = fs.lstatSync(p);
        if (st.isBlockDevice() || st.isCharacterDevice()) found.push(`device ${p}`);
        if (st.isFile() && st.mode & 0o6000) found.push(`set-ID ${p}`);
        if (e.isDirectory()) walk(p);
      }
    };
    walk(vm.dataDir);
    expect(found.filter((f) => f.includes('hostile'))).toEqual([]);
    // The upper layer did receive the guest's files (the walk looked at the right place).
    const upper = fs.readdirSync(path.join(vm.dataDir, 'rootfs', 'upper'));
    expect(upper).toContain('hostile');
  });
});
