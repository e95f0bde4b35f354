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
