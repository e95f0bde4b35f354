/**
 * Copies that no guest can race, on a real QEMU boot with a share the guest can write: while the
 * host copies out of the guest into the share, or into the guest from the share, a process in the
 * guest swaps the tree's directories and files for symlinks to a host directory outside (and back)
 * in a tight loop. Each copy may succeed or fail with ERR_MICROVM_COPY, but nothing outside the
 * copy's own tree is ever written, re-moded, re-owned or read.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { type MicroVM, run } from '../../lib';
import { qemuSkipReason, scratch } from '../helpers';

const skip = qemuSkipReason();
process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;
const ROUNDS = 40;

let s: ReturnType<typeof scratch>;
let vm: MicroVM;
let share: string;
let outside: string;

/** What the outside directory holds: names, contents, modes and owners. */
function snapshot(dir: string): string[] {
  return fs
    .readdirSync(dir)
    .sort()
    .map((n) => {
      const st = fs.lstatSync(path.join(dir, n));
      return `${n} ${(st.mode & 0o7777).toString(8)} ${st.uid}:${st.gid} ${fs.readFileSync(path.join(dir, n), 'utf8')}`;
    });
}

/** Starts `script` in the guest (a racer); returns a stop function. */
async function racer(script: string): Promise<() => Promise<void>> {
  const proc = await vm.spawn(['/bin/sh', '-c', script]);
  return async () => {
    proc.kill('SIGKILL');
    await proc.exited.catch(() => undefined);
  };
}

(skip ? describe.skip : describe)(`copies against a guest that races them${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  beforeAll(async () => {
    s = scratch('microvm-races-');
    share = path.join(s.dir, 'share');
    outside = path.join(s.dir, 'outside');
    fs.mkdirSync(share);
    fs.mkdirSync(outside, { mode: 0o700 });
    fs.writeFileSync(path.join(outside, 'secret'), 'HOST-SECRET\n', { mode: 0o600 });
    fs.writeFileSync(path.join(outside, 'victim'), 'victim\n', { mode: 0o600 });
    vm = await run('races', {
      rootfsPath: process.env.MICROVM_TEST_IMAGE,
      backend: 'qemu',
      dataDir: path.join(s.dir, 'data'),
      initOverride: ['/bin/sleep', '3600'],
      virtiofs: [{ tag: 'sh', hostPath: share, guestPath: '/mnt/sh' }],
    });
  }, 120_000);
  afterAll(async () => {
    await vm?.remove();
    s?.cleanup();
  });

  test('copyOut into a share the guest swaps symlinks into: nothing outside is written, re-moded or re-owned', async () => {
    const before = snapshot(outside);
    // The guest's tree: a directory of many files (a wide window between its creation and the
    // last file written into it), loose modes, a set-uid file.
    await vm.exec([
      '/bin/sh',
      '-c',
      'mkdir -p /tmp/src/sub/deeper /mnt/sh/out && i=0; while [ $i -lt 60 ]; do echo guest-data > /tmp/src/sub/f$i; i=$((i+1)); done; echo guest-data > /tmp/src/a; echo x > /tmp/src/sub/deeper/d; chmod 0666 /tmp/src/sub/f1; chmod 04777 /tmp/src/a',
    ]);
    // Every directory of every copy in progress (whatever its temporary name) becomes a link to
    // outside, and so does its set-uid file.
    const stop = await racer(
      `cd /mnt/sh/out && while :; do for d in .*microvm* .*microvm*/sub .*microvm*/entry .*microvm*/entry/sub .*microvm*/sub/deeper .*microvm*/entry/sub/deeper; do
         if [ -d "$d" ] && [ ! -L "$d" ]; then mv "$d" "$d.x" 2>/dev/null && ln -s ${outside} "$d" 2>/dev/null; fi
       done; done`,
    );
    let ok = 0;
    let refused = 0;
    try {
      for (let i = 0; i < ROUNDS; i++) {
        try {
          await vm.copyOut('/tmp/src', path.join(share, 'out', `copy-${i}`));
          ok++;
        } catch (err) {
          expect(err).toMatchObject({ code: 'ERR_MICROVM_COPY' });
          refused++;
        }
      }
    } finally {
      await stop();
    }
    expect(ok + refused).toBe(ROUNDS);
    expect(snapshot(outside)).toEqual(before);
    // What did arrive is the guest's data with the set-uid bit dropped; links arrive as links.
    for (let i = 0; i < ROUNDS; i++) {
      const a = path.join(share, 'out', `copy-${i}`, 'a');
      const st = fs.existsSync(path.join(share, 'out', `copy-${i}`))
        ? fs.lstatSync(a, { throwIfNoEntry: false })
        : undefined;
      if (st?.isFile()) expect(st.mode & 0o7000).toBe(0);
    }
  }, 180_000);

  test('copyIn from a share the guest swaps symlinks into: no host file from outside is ever read into the guest', async () => {
    const tree = path.join(share, 'in', 'tree');
    fs.mkdirSync(path.join(tree, 'sub'), { recursive: true });
    fs.writeFileSync(path.join(tree, 'sub', 'f'), 'public\n');
    fs.writeFileSync(path.join(tree, 'g'), 'public\n');
    const stop = await racer(
      `cd /mnt/sh/in/tree && while :; do
         mv sub sub.real 2>/dev/null; ln -s ${outside} sub 2>/dev/null; mv g g.real 2>/dev/null; ln -s ${outside}/secret g 2>/dev/null
         rm -f sub g; mv sub.real sub 2>/dev/null; mv g.real g 2>/dev/null
       done`,
    );
    let ok = 0;
    try {
      for (let i = 0; i < ROUNDS; i++) {
        try {
          await vm.copyIn(tree, `/tmp/in-${i}`);
          ok++;
        } catch (err) {
          expect(err).toMatchObject({ code: 'ERR_MICROVM_COPY' });
        }
      }
    } finally {
      await stop();
    }
    expect(ok).toBeGreaterThanOrEqual(0);
    // Regular files only (a link copied as a link is fine: it names a path on the host, not its content).
    const found = await vm.exec([
      '/bin/sh',
      '-c',
      'find /tmp -path "/tmp/in-*" -type f -exec cat {} + | grep -c HOST-SECRET',
    ]);
    expect(found.stdout.trim()).toBe('0');
  }, 180_000);
});
