/** vm.exec()/execBuffered options and commands: every bad input is a coded error naming it. */
import { execOptions, toArgv } from '../../lib/agent/exec';

describe('toArgv', () => {
  test('a string runs through /bin/sh -c; an argv is kept as it is', () => {
    expect(toArgv('echo $HOME')).toEqual(['/bin/sh', '-c', 'echo $HOME']);
    expect(toArgv(['ls', '-l'])).toEqual(['ls', '-l']);
  });
  test.each([
    ['', RangeError, 'Expected a non-empty command'],
    [[], TypeError, 'Expected a command string or a non-empty array of strings'],
    [['ls', 3], TypeError, 'Expected a command string or a non-empty array of strings'],
    [42, TypeError, 'Expected a command string or a non-empty array of strings'],
  ])('%p: %p', (cmd, Kind, message) => {
    expect(() => toArgv(cmd as never)).toThrow(Kind);
    expect(() => toArgv(cmd as never)).toThrow(message);
  });
});

describe('execOptions', () => {
  test('valid options come back as given', () => {
    const signal = new AbortController().signal;
    const given = () => ({
      env: { A_1: 'x', _b: '' },
      cwd: '/tmp',
      user: '1000:1000',
      tty: { rows: 24, cols: 80 },
      stdin: Buffer.from('in'),
      signal,
      timeoutMs: 2 ** 31 - 1,
      maxBuffer: 1,
    });
    expect(execOptions(given())).toEqual(given()); // two separate objects, as before
    expect(execOptions({})).toEqual({});
    expect(execOptions({ stdin: 'text' })).toEqual({ stdin: 'text' });
  });
  test.each([
    [{ bogus: 1 }, /options has an unknown key "bogus"|bogus/],
    [{ env: { '1A': 'x' } }, 'options.env has an invalid name "1A"'],
    [{ env: { 'A-B': 'x' } }, 'options.env has an invalid name "A-B"'],
    [{ env: { 'A B': 'x' } }, 'options.env has an invalid name "A B"'],
    [{ env: { A: 1 } }, 'options.env.A'],
    [{ env: 'A=1' }, 'options.env'],
    [{ cwd: 1 }, 'options.cwd'],
    [{ user: {} }, 'options.user'],
    [{ tty: { rows: 0, cols: 80 } }, 'options.tty.rows'],
    [{ tty: { rows: 24, cols: 65536 } }, 'options.tty.cols'],
    [{ tty: true }, 'options.tty'],
    [{ stdin: 5 }, 'Expected a string or Buffer for options.stdin but received 5'],
    [{ signal: {} }, 'Expected an AbortSignal for options.signal'],
    [{ timeoutMs: 0 }, 'options.timeoutMs'],
    [{ timeoutMs: 2 ** 31 }, 'options.timeoutMs'],
    [{ maxBuffer: 2 ** 31 }, 'options.maxBuffer'],
  ])('%p is refused, naming the option', (options, message) => {
    expect(() => execOptions(options)).toThrow(message);
    try {
      execOptions(options);
    } catch (err) {
      expect((err as { code?: string }).code).toMatch(/^ERR_(INVALID_ARG_TYPE|OUT_OF_RANGE)$/);
    }
  });
});
