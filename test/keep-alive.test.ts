/** KeepAlive: one ref'd handle while waits are pending, none after, none when unref'd. */
import { KeepAlive } from '../lib/keep-alive';

test('holds while any wait is pending, lets go when the last settles (resolved or rejected)', async () => {
  const k = new KeepAlive();
  expect(k.holding).toBe(false);
  let resolveA: (v: number) => void = () => undefined;
  let rejectB: (e: Error) => void = () => undefined;
  const a = k.hold(new Promise<number>((r) => (resolveA = r)));
  const b = k.hold(new Promise<number>((_, j) => (rejectB = j)));
  expect([k.pending, k.holding]).toEqual([2, true]);
  resolveA(1);
  expect(await a).toBe(1);
  expect([k.pending, k.holding]).toEqual([1, true]);
  rejectB(new Error('no'));
  await expect(b).rejects.toThrow('no');
  expect([k.pending, k.holding]).toEqual([0, false]);
});

test('unref() drops the handle while waits are pending; ref() takes it again', async () => {
  const k = new KeepAlive();
  let done: () => void = () => undefined;
  const p = k.hold(new Promise<void>((r) => (done = r)));
  k.unref();
  expect([k.pending, k.holding]).toEqual([1, false]);
  k.ref();
  expect(k.holding).toBe(true);
  done();
  await p;
  expect(k.holding).toBe(false);
  k.unref();
  const q = k.hold(Promise.resolve());
  expect(k.holding).toBe(false);
  await q;
});
