/**
 * lib/log-times.ts: `--since` values, and the arrival-time index the guest init writes, read as
 * hostile input (the guest writes it). The index on a real boot: test/e2e/logs-since.test.ts.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  jsonLinesOffsetSince,
  NOTE_EVERY_MS,
  offsetsSince,
  parseSince,
  readGuestClock,
  writeGuestClock,
} from '../lib/log-times';
import { scratch } from './helpers';

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-log-times-');
});
afterEach(() => s.cleanup());

describe('parseSince', () => {
  const now = Date.UTC(2026, 11, 3, 15, 0, 0);
  test.each([
    ['2026-12-03T14:00:00Z', Date.UTC(2026, 11, 3, 14, 0, 0)],
    ['2026-12-03T14:00:00.250+01:00', Date.UTC(2026, 11, 3, 13, 0, 0, 250)],
    ['2026-12-03', Date.UTC(2026, 11, 3)],
    ['1764770400', 1764770400000],
    ['1764770400.5', 1764770400500],
    ['90s', now - 90000],
    ['10m', now - 600000],
    ['1h30m', now - 5400000],
    ['250ms', now - 250],
    ['1.5h', now - 5400000],
  ])('%s', (value, expected) => {
    expect(parseSince(value, now)).toBe(expected);
  });

  test.each(['', 'yesterday', '10x', 'm10', '-5m', '2026-13-45T99:00:00Z', '2026-12-03T14:00:00Zjunk', '1h 30m'])(
    'refuses %j',
    (value) => {
      expect(parseSince(value, now)).toBeUndefined();
    },
  );
});

describe('the guest clock file', () => {
  test('written once the mounts milestone is there, 0600, and read back', () => {
    const file = path.join(s.dir, 'guest-clock.json');
    expect(writeGuestClock(file, 'UP\nT init 900000000\n', performance.now())).toBe(false);
    expect(fs.existsSync(file)).toBe(false);
    const upSeenAt = performance.now();
    const before = Date.now();
    expect(writeGuestClock(file, 'UP\nT init 900000000\nT mounts 1000000000\n', upSeenAt)).toBe(true);
    expect(fs.statSync(file).mode & 0o777).toBe(0o600);
    const zero = readGuestClock(file) as number;
    // The guest's clock read 1 s at the mounts milestone, seen (UP) just before `before`.
    expect(zero).toBeGreaterThan(before - 1000 - 50);
    expect(zero).toBeLessThanOrEqual(before - 1000 + 1);
  });

  test.each([
    ['not json', 'zero'],
    ['a string', '{"zeroEpochMs":"5"}'],
    ['negative', '{"zeroEpochMs":-1}'],
    ['huge file', `{"zeroEpochMs":5${' '.repeat(5000)}}`],
  ])('malformed (%s): undefined', (_why, text) => {
    const file = path.join(s.dir, 'guest-clock.json');
    fs.writeFileSync(file, text);
    expect(readGuestClock(file)).toBeUndefined();
  });

  test('a symlink or a directory is not read', () => {
    const real = path.join(s.dir, 'real.json');
    fs.writeFileSync(real, '{"zeroEpochMs":5}');
    expect(readGuestClock(real)).toBe(5);
    fs.symlinkSync(real, path.join(s.dir, 'link.json'));
    expect(readGuestClock(path.join(s.dir, 'link.json'))).toBeUndefined();
    expect(readGuestClock(s.dir)).toBeUndefined();
    expect(readGuestClock(path.join(s.dir, 'absent.json'))).toBeUndefined();
  });
});

describe('offsetsSince', () => {
  const zero = 1_000_000; // epoch ms of the guest's clock 0
  const ms = (n: number): string => String(n * 1e6);
  const index = (lines: string[]): string => {
    const file = path.join(s.dir, 'output-times');
    fs.writeFileSync(file, lines.map((l) => `${l}\n`).join(''));
    return file;
  };

  test('the first chunk of each stream at or after the time; a stream with none gets its size', () => {
    const file = index([`1 0 ${ms(100)}`, `2 0 ${ms(150)}`, `1 6 ${ms(200)}`, `1 12 ${ms(300)}`, `2 4 ${ms(310)}`]);
    expect(offsetsSince(file, zero, zero + 50, [20, 9])).toEqual([0, 0]);
    expect(offsetsSince(file, zero, zero + 200, [20, 9])).toEqual([6, 4]);
    // A note covers the chunks after it for NOTE_EVERY_MS: the one at 200 ms starts what came at 205.
    expect(offsetsSince(file, zero, zero + 200 + NOTE_EVERY_MS, [20, 9])).toEqual([6, 4]);
    expect(offsetsSince(file, zero, zero + 201 + NOTE_EVERY_MS, [20, 9])).toEqual([12, 4]);
    expect(offsetsSince(file, zero, zero + 311 + NOTE_EVERY_MS, [20, 9])).toEqual([20, 9]);
  });

  test('hostile lines are skipped: garbage, a third stream, offsets backwards or past the log, huge numbers', () => {
    const file = index([
      'garbage',
      `3 0 ${ms(100)}`,
      `1 0 ${ms(100)}`,
      `1 0 ${ms(500)}`, // not after the last offset of its stream
      `1 99 ${ms(500)}`, // past the log's end
      `1 ${'9'.repeat(40)} ${ms(500)}`,
      `1 5 ${ms(400)}`,
      `1 7`,
      ` 1 8 ${ms(600)}`,
      `1 9 ${ms(700)}`,
    ]);
    expect(offsetsSince(file, zero, zero + 450 + NOTE_EVERY_MS, [10, 0])).toEqual([9, 0]);
    expect(offsetsSince(file, zero, zero + 300 + NOTE_EVERY_MS, [10, 0])).toEqual([5, 0]);
  });

  test('a long index is read in pieces; an over-long line is dropped; no file: the sizes', () => {
    const lines = Array.from({ length: 100000 }, (_, i) => `1 ${i * 10} ${ms(i)}`);
    const file = index([...lines.slice(0, 50000), `1 ${'1'.repeat(5_000_000)}`, ...lines.slice(50000)]);
    expect(fs.statSync(file).size).toBeGreaterThan(2 << 20);
    expect(offsetsSince(file, zero, zero + 99998 + NOTE_EVERY_MS, [1_000_000, 0])).toEqual([999980, 0]);
    expect(offsetsSince(path.join(s.dir, 'absent'), zero, 0, [3, 4])).toEqual([3, 4]);
  });
});

describe('offsetsSince across its 1 MiB reads', () => {
  test('a note cut by the read boundary is put back together; a stream found early waits for the other', () => {
    const file = path.join(s.dir, 'output-times');
    // Old stdout notes up to just before 1 MiB, then the one the answer is in, cut by the boundary,
    // then stderr's first note (only in the second read).
    const zero = 1_000_000;
    const old: string[] = [];
    let size = 0;
    for (let i = 0; size < (1 << 20) - 40; i++) {
      const l = `1 ${i} ${1e6 * 10}\n`; // 10 ms after zero: too early
      old.push(l);
      size += l.length;
    }
    const pad = (1 << 20) - 5 - size; // the next note starts 5 bytes before the boundary
    old.push(`${' '.repeat(pad - 1)}\n`); // a line that is no note
    const target = `1 ${old.length + 1000} ${1e6 * 500}\n`;
    fs.writeFileSync(file, `${old.join('')}${target}2 0 ${1e6 * 600}\n`);
    expect(fs.statSync(file).size).toBeGreaterThan(1 << 20);
    expect(offsetsSince(file, zero, zero + 400, [1e9, 100])).toEqual([old.length + 1000, 0]);
  });

  test('the guest clock: zero is no clock; a file of 4096 bytes is still read', () => {
    const clock = path.join(s.dir, 'guest-clock.json');
    fs.writeFileSync(clock, '{"zeroEpochMs":0}');
    expect(readGuestClock(clock)).toBeUndefined();
    fs.writeFileSync(clock, `{"zeroEpochMs":7}${' '.repeat(4096 - 17)}`);
    expect(fs.statSync(clock).size).toBe(4096);
    expect(readGuestClock(clock)).toBe(7);
  });
});

describe('jsonLinesOffsetSince (the egress log)', () => {
  test('the first line at or after the time; bad lines skipped', () => {
    const file = path.join(s.dir, 'egress.log');
    const a = `${JSON.stringify({ time: '2026-12-03T14:00:00.000Z', host: 'a' })}\n`;
    const bad = 'not json\n';
    const b = `${JSON.stringify({ time: '2026-12-03T14:00:05.000Z', host: 'b' })}\n`;
    fs.writeFileSync(file, a + bad + b);
    expect(jsonLinesOffsetSince(file, Date.UTC(2026, 11, 3, 13))).toBe(0);
    expect(jsonLinesOffsetSince(file, Date.UTC(2026, 11, 3, 14, 0, 1))).toBe(a.length + bad.length);
    expect(jsonLinesOffsetSince(file, Date.UTC(2026, 11, 3, 15))).toBe(fs.statSync(file).size);
    expect(jsonLinesOffsetSince(path.join(s.dir, 'absent'), 0)).toBe(0);
  });
});
