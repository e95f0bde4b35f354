/**
 * Nothing built, downloaded or third-party is tracked: every file git tracks is at most 2 MB and is
 * not a binary object (ELF executables and libraries, `.so`/`.node` files, `.deb` packages or other
 * `ar` archives). Kernels, firmware and addons are fetched or built by scripts/setup.sh.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

const root = path.join(__dirname, '..');
const listing = spawnSync('git', ['-C', root, 'ls-files', '-z'], { encoding: 'utf8' });
const skip = listing.status === 0 ? '' : 'not a git checkout (or no git)';
const MAX_BYTES = 2 * 1024 * 1024;

/** Why `file` must not be tracked, or undefined. */
export function refusal(file: string, head: Buffer, size: number): string | undefined {
  if (size > MAX_BYTES) return `${size} bytes (over 2 MB)`;
  if (/\.(so(\.\d+)*|node|deb|elf|o|a)$/.test(file)) return 'a binary object by its name';
  if (head.subarray(0, 4).equals(Buffer.from([0x7f, 0x45, 0x4c, 0x46]))) return 'an ELF file';
  if (head.subarray(0, 8).toString('latin1') === '!<arch>\n') return 'an ar archive (.deb, .a)';
  return undefined;
}

describe('repository hygiene', () => {
  test('the check itself refuses each kind of binary and passes source', () => {
    const elf = Buffer.from([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0]);
    expect(refusal('kernel.bin', elf, 100)).toBe('an ELF file');
    expect(refusal('x.deb', Buffer.from('!<arch>\n'), 100)).toBeDefined();
    expect(refusal('pkg.tar', Buffer.from('!<arch>\n'), 100)).toBe('an ar archive (.deb, .a)');
    expect(refusal('addon.node', Buffer.from('text'), 10)).toBeDefined();
    expect(refusal('libkrunfw.so.5', Buffer.from('text'), 10)).toBeDefined();
    expect(refusal('big.json', Buffer.from('{'), MAX_BYTES + 1)).toMatch(/over 2 MB/);
    expect(refusal('lib/run.ts', Buffer.from('import'), 1000)).toBeUndefined();
    expect(refusal('docs/node.md', Buffer.from('# node'), 1000)).toBeUndefined();
  });

  (skip ? test.skip : test)(
    `no tracked file is over 2 MB or a binary object${skip ? ` [skipped: ${skip}]` : ''}`,
    () => {
      const files = listing.stdout.split('\0').filter((f) => f.length > 0);
      expect(files.length).toBeGreaterThan(50);
      const bad: string[] = [];
      for (const f of files) {
        const p = path.join(root, f);
        let st: fs.Stats;
        try {
          st = fs.lstatSync(p);
        } catch {
          continue; // deleted in the work tree, not yet committed
        }
        if (!st.isFile()) continue;
        const head = Buffer.alloc(8);
        const fd = fs.openSync(p, 'r');
        try {
          fs.readSync(fd, head, 0, 8, 0);
        } finally {
          fs.closeSync(fd);
        }
        const why = refusal(f, head, st.size);
        if (why) bad.push(`${f}: ${why}`);
      }
      expect(bad).toEqual([]);
    },
  );
});
