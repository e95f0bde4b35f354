/** Option validation: exact messages (they are what a user reads), error classes, boundaries. */
import * as v from '../lib/validate';

test('describe: short, safe renderings of any received value', () => {
  expect(v.describe('abc')).toBe('"abc"');
  expect(v.describe('x'.repeat(81))).toBe(JSON.stringify(`${'x'.repeat(77)}...`));
  expect(v.describe('x'.repeat(80))).toBe(JSON.stringify('x'.repeat(80)));
  expect(v.describe(1.5)).toBe('1.5');
  expect(v.describe(true)).toBe('true');
  expect(v.describe(10n)).toBe('10');
  expect(v.describe(null)).toBe('null');
  expect(v.describe(undefined)).toBe('undefined');
  expect(v.describe([1, 2])).toBe('an array of length 2');
  expect(v.describe(() => 1)).toBe('a function');
  expect(v.describe({})).toBe('an object (Object)');
  expect(v.describe(new Map())).toBe('an object (Map)');
});

test('integer: type errors for non-numbers and NaN, range errors outside [min, max] and for fractions; bounds included', () => {
  expect(v.integer('cpus', 1, 1, 255)).toBe(1);
  expect(v.integer('cpus', 255, 1, 255)).toBe(255);
  expect(() => v.integer('cpus', 0, 1, 255)).toThrow(
    new RangeError('Expected an integer 1–255 for cpus but received 0'),
  );
  expect(() => v.integer('cpus', 256, 1, 255)).toThrow(RangeError);
  expect(() => v.integer('cpus', 1.5, 1, 255)).toThrow(RangeError);
  expect(() => v.integer('cpus', Infinity, 1, 255)).toThrow(RangeError);
  expect(() => v.integer('cpus', NaN, 1, 255)).toThrow(
    new TypeError('Expected an integer 1–255 for cpus but received NaN'),
  );
  expect(() => v.integer('cpus', '2', 1, 255)).toThrow(
    new TypeError('Expected an integer 1–255 for cpus but received "2"'),
  );
});

test('string: type, emptiness (unless allowed), NUL, byte length (not characters)', () => {
  expect(v.string('s', 'ok')).toBe('ok');
  expect(v.string('s', '', { allowEmpty: true })).toBe('');
  expect(() => v.string('s', '')).toThrow(new RangeError('Expected a non-empty string for s but received ""'));
  expect(() => v.string('s', 5)).toThrow(new TypeError('Expected a string for s but received 5'));
  expect(() => v.string('s', 'a\0b')).toThrow(
    new RangeError('Expected s to contain no NUL character but received "a\\u0000b"'),
  );
  expect(v.string('s', 'éé', { maxLength: 4 })).toBe('éé');
  expect(() => v.string('s', 'ééé', { maxLength: 4 })).toThrow(
    new RangeError('Expected at most 4 bytes for s but received 6'),
  );
});

test('absolutePath: must start with /, be shorter than 4096 bytes', () => {
  expect(v.absolutePath('p', '/a')).toBe('/a');
  expect(() => v.absolutePath('p', 'a/b')).toThrow(
    new RangeError('Expected an absolute path for p but received "a/b"'),
  );
  expect(v.absolutePath('p', `/${'a'.repeat(4094)}`)).toHaveLength(4095);
  expect(() => v.absolutePath('p', `/${'a'.repeat(4095)}`)).toThrow(
    new RangeError('Expected a path shorter than 4096 bytes for p'),
  );
  expect(() => v.absolutePath('p', '')).toThrow(RangeError);
});

test('boolean, object, stringArray, knownKeys', () => {
  expect(v.boolean('b', false)).toBe(false);
  expect(() => v.boolean('b', 0)).toThrow(new TypeError('Expected a boolean for b but received 0'));
  const o = { a: 1 };
  expect(v.object('o', o)).toBe(o);
  for (const bad of [null, [], 'x', 1, undefined])
    expect(() => v.object('o', bad)).toThrow(new TypeError(`Expected an object for o but received ${v.describe(bad)}`));
  expect(v.stringArray('l', ['a', 'b'])).toEqual(['a', 'b']);
  expect(v.stringArray('l', ['', 'b'], { allowEmptyItems: true })).toEqual(['', 'b']);
  expect(() => v.stringArray('l', ['a', ''])).toThrow(
    new RangeError('Expected a non-empty string for l[1] but received ""'),
  );
  expect(() => v.stringArray('l', 'a')).toThrow(new TypeError('Expected an array of strings for l but received "a"'));
  expect(() => v.knownKeys('options', { cpus: 1, memoryMb: 2 }, ['cpus', 'memoryMiB'])).toThrow(
    new TypeError('Unknown option options.memoryMb (known: cpus, memoryMiB)'),
  );
  expect(() => v.knownKeys('options', { cpus: 1 }, ['cpus'])).not.toThrow();
});

test('envEntries: KEY=VALUE with a valid variable name; the value may hold anything, even "="', () => {
  expect(v.envEntries('env', ['A=1', '_b2=x=y', 'C='])).toEqual(['A=1', '_b2=x=y', 'C=']);
  for (const bad of ['=1', 'NOEQUALS', '1A=x', 'A-B=x', ' A=x'])
    expect(() => v.envEntries('env', ['OK=1', bad])).toThrow(
      new RangeError(`Expected KEY=VALUE with a valid variable name for env[1] but received ${JSON.stringify(bad)}`),
    );
});
