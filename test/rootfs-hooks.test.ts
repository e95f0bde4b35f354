/** The ready-made rootfs hooks not covered elsewhere: injectBinary and injectEnvFile. */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { hooks } from '../lib';
import { rootfsContext } from '../lib/rootfs/hooks';
import { scratch } from './helpers';

let s: ReturnType<typeof scratch>;
let root: string;
const ctx = () =>
  rootfsContext('vm-test', { strategy: 'copy', rootPath: root, writableDir: root, sourceDir: root } as never);
beforeEach(() => {
  s = scratch('microvm-hooks-');
  root = path.join(s.dir, 'root');
  fs.mkdirSync(path.join(root, 'usr', 'bin'), { recursive: true });
});
afterEach(() => s.cleanup());

test('injectBinary copies the host file byte for byte, executable (0755) unless a mode is given, creating parents', async () => {
  const host = path.join(s.dir, 'tool');
  const bytes = Buffer.from([0x7f, 0x45, 0x4c, 0x46, 0, 1, 2, 255]);
  fs.writeFileSync(host, bytes, { mode: 0o600 });
  await hooks.injectBinary(host, '/usr/local/bin/tool')(ctx());
  const dest = path.join(root, 'usr', 'local', 'bin', 'tool');
  expect(fs.readFileSync(dest)).toEqual(bytes);
  expect(fs.statSync(dest).mode & 0o7777).toBe(0o755);
  await hooks.injectBinary(host, '/usr/bin/private', { mode: 0o700 })(ctx());
  expect(fs.statSync(path.join(root, 'usr', 'bin', 'private')).mode & 0o7777).toBe(0o700);
  expect(() => hooks.injectBinary('relative/tool', '/x')).toThrow(/absolute path for hostPath/);
  expect(() => hooks.injectBinary(host, '/../escape')).toThrow();
});

test('injectEnvFile writes KEY=value lines a shell reads back exactly (quotes, $, backslashes, empty); bad keys and newlines are refused', async () => {
  const env = { PLAIN: 'value', QUOTED: 'it\'s "x" $HOME `id` \\n', EMPTY: '' };
  await hooks.injectEnvFile('/etc/app.env', env)(ctx());
  const file = path.join(root, 'etc', 'app.env');
  expect(fs.statSync(file).mode & 0o777).toBe(0o644);
  // The oracle: sh itself sources the file and prints each value.
  const out = execFileSync('sh', ['-c', `. "${file}"; printf '%s|' "$PLAIN" "$QUOTED" "$EMPTY"`], {
    encoding: 'utf8',
    env: { PATH: process.env.PATH, HOME: '/should-not-expand' },
  });
  expect(out).toBe(`value|${env.QUOTED}||`);
  expect(() => hooks.injectEnvFile('/e', { 'BAD-KEY': 'x' })).toThrow(RangeError);
  expect(() => hooks.injectEnvFile('/e', { '1X': 'x' })).toThrow(RangeError);
  expect(() => hooks.injectEnvFile('/e', { K: 'a\nb' })).toThrow(/without a newline/);
});

describe('writeFile and readFile (exact behaviour)', () => {
  const overlay = (): { lower: string; upper: string; r: ReturnType<typeof rootfsContext> } => {
    const lower = path.join(s.dir, 'lower');
    const upper = path.join(s.dir, 'upper');
    fs.mkdirSync(path.join(lower, 'root'), { recursive: true, mode: 0o700 });
    fs.chmodSync(path.join(lower, 'root'), 0o700);
    fs.chownSync(path.join(lower, 'root'), 0, 0);
    fs.mkdirSync(path.join(lower, 'etc'), { recursive: true });
    fs.mkdirSync(upper);
    const r = rootfsContext('vm', {
      strategy: 'overlay',
      rootPath: '/x',
      writableDir: upper,
      sourceDir: lower,
    } as never);
    return { lower, upper, r };
  };

  test('defaults: 0644 files, new parents 0755; parents the image has keep its mode in the upper layer', () => {
    const { upper, r } = overlay();
    r.writeFile('/root/.ssh/k', 'x');
    expect(fs.statSync(path.join(upper, 'root')).mode & 0o7777).toBe(0o700); // as in the image
    expect(fs.statSync(path.join(upper, 'root', '.ssh')).mode & 0o7777).toBe(0o755); // not in the image
    expect(fs.statSync(path.join(upper, 'root', '.ssh', 'k')).mode & 0o7777).toBe(0o644);
    r.writeFile('/new/dir/f', Buffer.from([1, 2]), { mode: 0o600, parents: { mode: 0o711 } });
    expect(fs.statSync(path.join(upper, 'new')).mode & 0o7777).toBe(0o711);
    expect(fs.statSync(path.join(upper, 'new', 'dir', 'f')).mode & 0o7777).toBe(0o600);
    expect(fs.readFileSync(path.join(upper, 'new', 'dir', 'f'))).toEqual(Buffer.from([1, 2]));
  });

  (process.getuid?.() === 0 ? test : test.skip)(
    `owners: as created unless uid/gid given, for the file and new parents${process.getuid?.() === 0 ? '' : ' [skipped: needs root to chown]'}`,
    () => {
      const { upper, r } = overlay();
      r.writeFile('/a/f', 'x');
      expect([fs.statSync(path.join(upper, 'a', 'f')).uid, fs.statSync(path.join(upper, 'a')).uid]).toEqual([0, 0]);
      r.writeFile('/b/c/f', 'x', { uid: 1000, gid: 1001, parents: { uid: 2000, gid: 2001 } });
      const st = (p: string): [number, number] => {
        const x = fs.statSync(path.join(upper, p));
        return [x.uid, x.gid];
      };
      expect([st('b/c/f'), st('b/c'), st('b')]).toEqual([
        [1000, 1001],
        [2000, 2001],
        [2000, 2001],
      ]);
      r.writeFile('/d/f', 'x', { uid: 5 });
      expect(st('d/f')).toEqual([5, 0]);
      r.writeFile('/e/f', 'x', { gid: 6 });
      expect(st('e/f')).toEqual([0, 6]);
    },
  );

  test('bad arguments: each names its option and what it got', () => {
    const r = ctx();
    const bad: [() => void, string][] = [
      [() => r.writeFile('etc/x', 'x'), 'Expected an absolute guest path for guestPath but received "etc/x"'],
      [
        () => r.writeFile('/', 'x'),
        `Expected a guest file path without '.' or '..' components for guestPath but received "/"`,
      ],
      [
        () => r.writeFile('/a/./b', 'x'),
        `Expected a guest file path without '.' or '..' components for guestPath but received "/a/./b"`,
      ],
      [
        () => r.writeFile('/a/../b', 'x'),
        `Expected a guest file path without '.' or '..' components for guestPath but received "/a/../b"`,
      ],
      [
        () => r.writeFile('/x', 'x', { mode: 0o10000 }),
        'Expected an integer 0–4095 for options.mode but received 4096',
      ],
      [() => r.writeFile('/x', 'x', { uid: -2 }), 'Expected an integer 0–4294967294 for options.uid but received -2'],
      [() => r.writeFile('/x', 'x', { gid: -2 }), 'Expected an integer 0–4294967294 for options.gid but received -2'],
      [
        () => r.writeFile('/x', 'x', { parents: { mode: -1 } }),
        'Expected an integer 0–4095 for options.parents.mode but received -1',
      ],
      [
        () => r.writeFile('/x', 'x', { parents: { uid: -2 } }),
        'Expected an integer 0–4294967294 for options.parents.uid but received -2',
      ],
      [
        () => r.writeFile('/x', 'x', { parents: { gid: -2 } }),
        'Expected an integer 0–4294967294 for options.parents.gid but received -2',
      ],
      [() => r.writeFile('/x', 42 as never), 'Expected a string or Buffer for data but received 42'],
      [() => r.readFile('rel'), 'Expected an absolute guest path for guestPath but received "rel"'],
      [
        () => hooks.injectFile('/..', 'x'),
        `Expected a guest file path without '.' or '..' components for guestPath but received "/.."`,
      ],
      [() => hooks.injectEnvFile('x', {}), 'Expected an absolute guest path for guestPath but received "x"'],
    ];
    for (const [fn, message] of bad) expect(fn).toThrow(message);
    expect(() => r.writeFile('/x', 'x', { owner: 1 } as never)).toThrow(/owner/);
    expect(() => r.writeFile('/x', 'x', { parents: { owner: 1 } } as never)).toThrow(
      /options\.parents.*owner|owner.*options\.parents/,
    );
    expect(() => r.writeFile('/x', 'x', null as never)).toThrow(/options/);
  });

  test('a write through a symlinked directory is ERR_MICROVM_ROOTFS_SYMLINK; other failures ERR_MICROVM_ROOTFS_WRITE, with the cause', () => {
    fs.symlinkSync('/tmp', path.join(root, 'evil'));
    let err = (() => {
      try {
        ctx().writeFile('/evil/f', 'x');
      } catch (e) {
        return e as Error & { code: string; cause: unknown };
      }
    })();
    expect(err).toMatchObject({
      code: 'ERR_MICROVM_ROOTFS_SYMLINK',
      message: expect.stringMatching(/^Cannot write \/evil\/f into the VM rootfs: /),
    });
    expect(err?.cause).toBeDefined();
    fs.writeFileSync(path.join(root, 'file'), 'x');
    err = (() => {
      try {
        ctx().writeFile('/file/f', 'x');
      } catch (e) {
        return e as Error & { code: string; cause: unknown };
      }
    })();
    expect(err).toMatchObject({
      code: 'ERR_MICROVM_ROOTFS_WRITE',
      message: expect.stringMatching(/^Cannot write \/file\/f into the VM rootfs: /),
    });
  });

  test('readFile: the writable layer first, then the image; never through a final symlink; undefined when absent', () => {
    const { lower, upper, r } = overlay();
    fs.writeFileSync(path.join(lower, 'etc', 'a'), 'image');
    fs.writeFileSync(path.join(lower, 'etc', 'b'), 'image-b');
    fs.mkdirSync(path.join(upper, 'etc'));
    fs.writeFileSync(path.join(upper, 'etc', 'a'), 'upper');
    expect(r.readFile('/etc/a')?.toString()).toBe('upper');
    expect(r.readFile('/etc/b')?.toString()).toBe('image-b');
    expect(r.readFile('/etc/none')).toBeUndefined();
    fs.symlinkSync('/etc/hostname', path.join(lower, 'etc', 'link'));
    expect(r.readFile('/etc/link')).toBeUndefined();
    // One layer (copy/reflink): read there.
    fs.mkdirSync(path.join(root, 'etc'));
    fs.writeFileSync(path.join(root, 'etc', 'c'), 'only');
    expect(ctx().readFile('/etc/c')?.toString()).toBe('only');
  });
});

describe('injectAuthorizedKeys (exact behaviour)', () => {
  const key1 = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0 one';
  const key2 = 'ecdsa-sha2-nistp256 AAAAE2VjZHNh two';
  const passwd = (lines: string): void => {
    fs.mkdirSync(path.join(root, 'etc'), { recursive: true });
    fs.writeFileSync(path.join(root, 'etc', 'passwd'), lines);
  };

  test('root (default): /root/.ssh/authorized_keys 0600 in a 0700 .ssh, keys appended after existing content', async () => {
    passwd('root:x:0:0:root:/root:/bin/sh\n');
    fs.mkdirSync(path.join(root, 'root', '.ssh'), { recursive: true });
    fs.writeFileSync(path.join(root, 'root', '.ssh', 'authorized_keys'), 'ssh-rsa OLD'); // no final newline
    await hooks.injectAuthorizedKeys([` ${key1} `, key2])(ctx());
    const file = path.join(root, 'root', '.ssh', 'authorized_keys');
    expect(fs.readFileSync(file, 'utf8')).toBe(`ssh-rsa OLD\n${key1}\n${key2}\n`);
    expect(fs.statSync(file).mode & 0o7777).toBe(0o600);
    await hooks.injectAuthorizedKeys(key1)(ctx());
    expect(fs.readFileSync(file, 'utf8')).toBe(`ssh-rsa OLD\n${key1}\n${key2}\n${key1}\n`);
  });

  test('root without an /etc/passwd: /root, uid 0', async () => {
    await hooks.injectAuthorizedKeys(key1)(ctx());
    const file = path.join(root, 'root', '.ssh', 'authorized_keys');
    expect(fs.readFileSync(file, 'utf8')).toBe(`${key1}\n`);
    expect(fs.statSync(path.join(root, 'root', '.ssh')).mode & 0o7777).toBe(0o700);
  });

  test("another user: home, uid and gid from the image's passwd (short lines skipped, a trailing / trimmed, an empty home is /home/NAME)", async () => {
    passwd('alice:x:9\nalice:x:1000:1001:Alice:/srv/alice/:/bin/sh\nbob:x:1002:1003::::\n');
    await hooks.injectAuthorizedKeys(key1, { user: 'alice' })(ctx());
    const file = path.join(root, 'srv', 'alice', '.ssh', 'authorized_keys');
    expect(fs.readFileSync(file, 'utf8')).toBe(`${key1}\n`);
    if (process.getuid?.() === 0) {
      expect([fs.statSync(file).uid, fs.statSync(file).gid]).toEqual([1000, 1001]);
      expect([fs.statSync(path.dirname(file)).uid, fs.statSync(path.dirname(file)).gid]).toEqual([1000, 1001]);
    }
    expect(fs.statSync(path.dirname(file)).mode & 0o7777).toBe(0o700);
    await hooks.injectAuthorizedKeys(key2, { user: 'bob' })(ctx());
    expect(fs.readFileSync(path.join(root, 'home', 'bob', '.ssh', 'authorized_keys'), 'utf8')).toBe(`${key2}\n`);
  });

  test('a user the image lacks is ERR_MICROVM_ROOTFS_USER; bad keys are refused naming their index', async () => {
    passwd('root:x:0:0:root:/root:/bin/sh\n');
    const run = async (): Promise<void> => hooks.injectAuthorizedKeys(key1, { user: 'carol' })(ctx());
    await expect(run()).rejects.toMatchObject({
      code: 'ERR_MICROVM_ROOTFS_USER',
      message: "User carol does not exist in the image's /etc/passwd",
    });
    expect(() => hooks.injectAuthorizedKeys([key1, 'not a key'])).toThrow(
      'Expected one OpenSSH public key line for publicKeys[1]',
    );
    expect(() => hooks.injectAuthorizedKeys(`${key1}\n${key2}`)).toThrow(
      'Expected one OpenSSH public key line for publicKeys[0]',
    );
    expect(() => hooks.injectAuthorizedKeys('sk-ssh-ed25519@openssh.com AAAA x')).not.toThrow();
    expect(() => hooks.injectAuthorizedKeys([5 as never])).toThrow('publicKeys[0]');
    expect(() => hooks.injectAuthorizedKeys(key1, { user: 5 as never })).toThrow('options.user');
  });

  test('injectEnvFile: exact lines, options override the mode; messages name the key', async () => {
    await hooks.injectEnvFile('/etc/e', { A: 'x y', B: "it's" }, { mode: 0o600 })(ctx());
    const file = path.join(root, 'etc', 'e');
    expect(fs.readFileSync(file, 'utf8')).toBe(`A='x y'\nB='it'\\''s'\n`);
    expect(fs.statSync(file).mode & 0o7777).toBe(0o600);
    expect(() => hooks.injectEnvFile('/e', { 'A-B': 'x' })).toThrow(
      'Expected a valid variable name in env but received "A-B"',
    );
    expect(() => hooks.injectEnvFile('/e', { K: 'a\nb' })).toThrow('Expected env.K without a newline');
    expect(() => hooks.injectEnvFile('/e', { K: 5 as never })).toThrow('env.K');
    expect(() => hooks.injectEnvFile('/e', 'x' as never)).toThrow(/env/);
  });
});
