/**
 * The error-code contract: every ERR_MICROVM_* code in the source (TypeScript and native) is in
 * ERROR_CODES and in docs/api.md, and nothing is documented that the source does not throw.
 * Invalid options carry Node's argument codes.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ERROR_CODES, parseReference, PreflightError, run } from '../lib';
import { scratch } from './helpers';

const root = path.join(__dirname, '..');

function walk(dir: string, ext: RegExp): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    return e.isDirectory() ? walk(p, ext) : ext.test(e.name) ? [p] : [];
  });
}

/** Codes written in the source files, but not in the code table itself. */
function sourceCodes(): Map<string, string> {
  const found = new Map<string, string>();
  const files = [...walk(path.join(root, 'lib'), /\.ts$/), ...walk(path.join(root, 'native'), /\.(cc|h)$/)].filter(
    (f) => !f.endsWith(path.join('errors', 'codes.ts')),
  );
  for (const f of files) {
    for (const m of fs.readFileSync(f, 'utf8').matchAll(/ERR_MICROVM_[A-Z0-9_]*[A-Z0-9](?!_\*|[A-Z0-9_])/g)) {
      if (!found.has(m[0])) found.set(m[0], path.relative(root, f));
    }
  }
  return found;
}

describe('error codes', () => {
  const table = Object.keys(ERROR_CODES).sort();

  test('every code the source throws is in ERROR_CODES, and every entry is thrown somewhere', () => {
    const src = sourceCodes();
    const missing = [...src.entries()].filter(([c]) => !(c in ERROR_CODES)).map(([c, f]) => `${c} (${f})`);
    expect(missing).toEqual([]);
    expect(table.filter((c) => !src.has(c))).toEqual([]);
  });

  test('docs/api.md documents exactly the codes in ERROR_CODES, each with its meaning', () => {
    const doc = fs.readFileSync(path.join(root, 'docs', 'api.md'), 'utf8');
    const documented = [...new Set([...doc.matchAll(/ERR_MICROVM_[A-Z0-9_]*[A-Z0-9]/g)].map((m) => m[0]))].sort();
    expect(documented).toEqual(table);
    for (const [code, meaning] of Object.entries(ERROR_CODES)) {
      expect(doc).toContain(`| \`${code}\` | ${meaning.replace(/\|/g, '\\|')} |`);
    }
  });

  test("invalid options carry Node's codes: ERR_OUT_OF_RANGE, ERR_INVALID_ARG_TYPE, ERR_INVALID_ARG_VALUE", async () => {
    await expect(run('x', { cpus: 0 })).rejects.toMatchObject({
      name: 'RangeError',
      code: 'ERR_OUT_OF_RANGE',
      message: 'Expected an integer 1–255 for cpus but received 0',
    });
    await expect(run('x', { cpus: '2' as unknown as number })).rejects.toMatchObject({
      name: 'TypeError',
      code: 'ERR_INVALID_ARG_TYPE',
    });
    expect(() => parseReference('Bad/UPPER')).toThrow(
      expect.objectContaining({ name: 'TypeError', code: 'ERR_INVALID_ARG_VALUE' }),
    );
    // The stack starts at the validating function, not inside the helper that built the error.
    const err = await run('x', { memoryMiB: -1 }).catch((e: Error) => e);
    expect((err as Error).stack?.split('\n')[1]).not.toMatch(/validate\.ts.*rangeError|at rangeError/);
  });

  test('a required preflight failure is a PreflightError with typed failures', async () => {
    const s = scratch('microvm-codes-');
    try {
      const err = await run('x', {
        dataDir: path.join(s.dir, 'data'),
        rootfsPath: s.dir,
        preflight: [
          { name: 'advisory', description: 'd', required: false, run: () => ({ ok: false, message: 'meh' }) },
          {
            name: 'needed',
            description: 'd',
            required: true,
            run: () => ({ ok: false, message: 'no', remediation: 'fix it' }),
          },
        ],
      }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(PreflightError);
      expect(err).toMatchObject({
        code: 'ERR_MICROVM_PREFLIGHT',
        failures: [
          { name: 'advisory', required: false, message: 'meh' },
          { name: 'needed', required: true, message: 'no', remediation: 'fix it' },
        ],
      });
    } finally {
      s.cleanup();
    }
  });
});
