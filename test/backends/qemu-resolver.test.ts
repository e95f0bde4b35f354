/**
 * resolverMissing(): whether the QEMU backend writes the guest's /etc/resolv.conf (QEMU's resolver)
 * into a cloned root: only where the image has none or an empty one, never through a symlink.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { resolverMissing } from '../../lib/backends/qemu';
import { scratch } from '../helpers';

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-resolver-');
});
afterEach(() => s.cleanup());

/** A layer with `etc` as given: undefined (no /etc), a file's content, or 'link:TARGET'. */
function layer(name: string, etc?: { resolv?: string; etcLink?: string }): string {
  const dir = path.join(s.dir, name);
  fs.mkdirSync(dir);
  if (!etc) return dir;
  if (etc.etcLink) {
    fs.symlinkSync(etc.etcLink, path.join(dir, 'etc'));
    return dir;
  }
  fs.mkdirSync(path.join(dir, 'etc'));
  if (etc.resolv === undefined) return dir;
  if (etc.resolv.startsWith('link:')) fs.symlinkSync(etc.resolv.slice(5), path.join(dir, 'etc', 'resolv.conf'));
  else fs.writeFileSync(path.join(dir, 'etc', 'resolv.conf'), etc.resolv);
  return dir;
}

describe('resolverMissing', () => {
  test.each([
    ['no /etc at all', undefined, true],
    ['/etc without resolv.conf', {}, true],
    ['an empty resolv.conf', { resolv: '' }, true],
    ['a resolv.conf with content', { resolv: 'nameserver 192.0.2.53\n' }, false],
    ['resolv.conf a symlink (even dangling)', { resolv: 'link:/run/systemd/resolve/stub-resolv.conf' }, false],
    ['/etc a symlink (to the host-looking /etc)', { etcLink: '/etc' }, false],
  ])('one layer, %s: %s', (_what, etc, expected) => {
    const dir = layer('one', etc);
    expect(resolverMissing({ writableDir: dir, sourceDir: dir })).toBe(expected);
  });

  test('overlay: the top layer that has the entry decides', () => {
    const lowerFull = layer('lower-full', { resolv: 'nameserver 192.0.2.53\n' });
    const lowerEmpty = layer('lower-empty', { resolv: '' });
    expect(resolverMissing({ writableDir: layer('upper-none'), sourceDir: lowerFull })).toBe(false);
    expect(resolverMissing({ writableDir: layer('upper-etc', {}), sourceDir: lowerFull })).toBe(false);
    expect(resolverMissing({ writableDir: layer('upper-full', { resolv: 'x\n' }), sourceDir: lowerEmpty })).toBe(false);
    expect(resolverMissing({ writableDir: layer('upper-empty', { resolv: '' }), sourceDir: lowerFull })).toBe(true);
    expect(resolverMissing({ writableDir: layer('upper-none2'), sourceDir: lowerEmpty })).toBe(true);
  });
});
