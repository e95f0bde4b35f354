/**
 * The two native builds agree: node-gyp (binding.gyp, what `npm install` runs) and cmake-js
 * (CMakeLists.txt) build every target from the same source lists (native/*.sources) with the same
 * hardening flags (native/hardening.*). This builds with cmake-js into a scratch directory and
 * compares it, artifact by artifact, with node-gyp's build/Release: the same set of files, and for
 * each the same ELF type, RELRO and immediate binding, the stack protector, and the same dynamic
 * imports and exports (so a flag or a source present in one build only shows up).
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const root = path.join(__dirname, '..');
const gypOut = path.join(root, 'build', 'Release');

/** A list file's entries: one per line, '#' lines are comments (as binding.gyp and CMakeLists.txt read them). */
export function listEntries(text: string): string[] {
  return text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l.length > 0 && !l.startsWith('#'));
}

/** The artifacts in a build output directory: the regular files named microvm*. */
function artifacts(dir: string): string[] {
  return fs
    .readdirSync(dir, { withFileTypes: true })
    .filter((e) => e.isFile() && e.name.startsWith('microvm'))
    .map((e) => e.name)
    .sort();
}

interface ElfFacts {
  type: string;
  relro: boolean;
  bindNow: boolean;
  interpreter: boolean;
  stackProtector: boolean;
  imports: string[];
  exports: string[];
}

function readelf(args: string[], file: string): string {
  return execFileSync('readelf', ['-W', ...args, file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
}

/** Symbol names of the dynamic symbol table, undefined (imports) or defined (exports), without versions. */
function dynamicSymbols(file: string): { imports: string[]; exports: string[] } {
  const imports = new Set<string>();
  const exports = new Set<string>();
  for (const line of readelf(['--dyn-syms'], file).split('\n')) {
    // Num: Value Size Type Bind Vis Ndx Name
    const f = line.trim().split(/\s+/);
    if (f.length < 8 || !/^\d+:$/.test(f[0]) || f[7] === undefined) continue;
    const name = f[7].replace(/@.*$/, '');
    if (name === '') continue;
    (f[6] === 'UND' ? imports : exports).add(name);
  }
  return { imports: [...imports].sort(), exports: [...exports].sort() };
}

function facts(file: string): ElfFacts {
  const header = readelf(['-h'], file);
  const segments = readelf(['-l'], file);
  const dynamic = segments.includes('DYNAMIC') ? readelf(['-d'], file) : '';
  const symbols = dynamic ? dynamicSymbols(file) : { imports: [], exports: [] };
  const allSymbols = dynamic ? symbols.imports : readelf(['-s'], file).split('\n');
  return {
    type: /Type:\s+(\w+)/.exec(header)?.[1] ?? '?',
    relro: segments.includes('GNU_RELRO'),
    bindNow: /\bBIND_NOW\b|\bFlags:.*\bNOW\b/.test(dynamic),
    interpreter: segments.includes('INTERP'),
    stackProtector: allSymbols.some((s) => s.includes('__stack_chk_fail')),
    imports: symbols.imports,
    exports: symbols.exports,
  };
}

const haveReadelf = (() => {
  try {
    execFileSync('readelf', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();
const skip = !fs.existsSync(gypOut)
  ? 'no node-gyp build (build/Release); npm install builds it'
  : !haveReadelf
    ? 'no readelf (binutils)'
    : '';

describe('native build lists', () => {
  test('list files read with comments and blank lines left out', () => {
    expect(listEntries('# a comment\nnative/a.cc\n\n  native/b.cc  \n#native/c.cc\n')).toEqual([
      'native/a.cc',
      'native/b.cc',
    ]);
  });

  test('every .cc under native/ is in a source list, and every listed file exists', () => {
    const listed = new Set<string>();
    for (const f of fs.readdirSync(path.join(root, 'native')).filter((n) => n.endsWith('.sources')))
      for (const e of listEntries(fs.readFileSync(path.join(root, 'native', f), 'utf8'))) listed.add(e);
    for (const e of listed) expect(fs.existsSync(path.join(root, e)) ? e : `${e} (missing)`).toBe(e);
    const sources: string[] = [];
    for (const dir of fs.readdirSync(path.join(root, 'native'), { withFileTypes: true }))
      if (dir.isDirectory())
        for (const f of fs.readdirSync(path.join(root, 'native', dir.name)))
          if (f.endsWith('.cc')) sources.push(`native/${dir.name}/${f}`);
    expect(sources.length).toBeGreaterThan(10);
    expect(sources.filter((s) => !listed.has(s))).toEqual([]);
  });

  test('binding.gyp and CMakeLists.txt read the same lists and flag files', () => {
    const gyp = fs.readFileSync(path.join(root, 'binding.gyp'), 'utf8');
    const cmake = fs.readFileSync(path.join(root, 'CMakeLists.txt'), 'utf8');
    const lists = fs.readdirSync(path.join(root, 'native')).filter((n) => /\.(sources|cflags|ldflags)$/.test(n));
    expect(lists.length).toBeGreaterThanOrEqual(7);
    for (const l of lists) {
      expect(gyp.includes(`native/${l}`) ? l : `${l} (not in binding.gyp)`).toBe(l);
      expect(cmake.includes(`native/${l}`) ? l : `${l} (not in CMakeLists.txt)`).toBe(l);
    }
  });
});

describe('node-gyp and cmake-js builds', () => {
  (skip ? test.skip : test)(
    `cmake-js builds the same artifacts as node-gyp, equally hardened${skip ? ` [skipped: ${skip}]` : ''}`,
    () => {
      const out = fs.mkdtempSync(path.join(os.tmpdir(), 'microvm-cmake-'));
      try {
        execFileSync(process.execPath, [path.join(root, 'scripts', 'native-build.js'), 'cmake', out], {
          cwd: root,
          stdio: ['ignore', 'ignore', 'pipe'],
          timeout: 600_000,
        });
        const cmakeOut = path.join(out, 'Release');
        const names = artifacts(gypOut);
        expect(names).toEqual(
          expect.arrayContaining([
            'microvm.node',
            'microvm-runner',
            'microvm-guest-init',
            'microvm-fsguard.so',
            'microvm-netguard.so',
          ]),
        );
        expect(artifacts(cmakeOut)).toEqual(names);
        for (const name of names) {
          const gyp = facts(path.join(gypOut, name));
          const cmake = facts(path.join(cmakeOut, name));
          expect({ name, ...cmake }).toEqual({ name, ...gyp });
          // Hardened either way: read-only relocations, and (dynamic objects) bound at load time
          // with the stack protector in; the static guest init has no dynamic section to show it.
          expect({ name, relro: gyp.relro }).toEqual({ name, relro: true });
          if (gyp.interpreter || gyp.type === 'DYN')
            expect({ name, bindNow: gyp.bindNow, ssp: gyp.stackProtector }).toEqual({
              name,
              bindNow: true,
              ssp: true,
            });
        }
      } finally {
        fs.rmSync(out, { recursive: true, force: true });
      }
    },
    900_000,
  );
});
