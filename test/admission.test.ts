/**
 * Admission (lib/run/admission.ts): at most N boots at once per data root, across processes. The
 * slots themselves (limit, waiting, abort, a dead owner's slot taken over), then real QEMU boots:
 * five run() at once with a limit of 2 all become ready, and no more than two ever boot together.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { run, type MicroVM } from '../lib';
import { admissionLimit, admit } from '../lib/run/admission';
import { qemuSkipReason, scratch } from './helpers';

process.env.MICROVM_LIBKRUNFW_DIR ??= process.env.MICROVM_TEST_LIBKRUNFW_DIR;
const skip = qemuSkipReason();

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-admission-');
});
afterEach(() => s.cleanup());

test('the limit: the option, else MICROVM_MAX_BOOTS, else the cores (at least 2); bad values are refused', () => {
  expect(admissionLimit(3, {})).toBe(3);
  expect(admissionLimit(undefined, { MICROVM_MAX_BOOTS: '7' })).toBe(7);
  expect(admissionLimit(undefined, {})).toBeGreaterThanOrEqual(2);
  expect(() => admissionLimit(undefined, { MICROVM_MAX_BOOTS: 'many' })).toThrow(
    expect.objectContaining({ code: 'ERR_INVALID_ARG_VALUE' }),
  );
  expect(() => admissionLimit(undefined, { MICROVM_MAX_BOOTS: '0' })).toThrow(
    expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }),
  );
  expect(() => admissionLimit(0, {})).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
});

test('a third start waits until one of two slots is freed; release is once; abort ends a wait', async () => {
  const a = await admit(s.dir, 2);
  const b = await admit(s.dir, 2);
  expect(new Set([a.index, b.index])).toEqual(new Set([0, 1]));
  let third: Awaited<ReturnType<typeof admit>> | undefined;
  const waiting = admit(s.dir, 2).then((x) => (third = x));
  await new Promise((r) => setTimeout(r, 200));
  expect(third).toBeUndefined();
  a.release();
  a.release(); // once only: it must not free the slot the third start takes next
  await waiting;
  expect(third?.index).toBe(a.index);
  expect(fs.existsSync(path.join(s.dir, 'admission', `${a.index}.lock`))).toBe(true);

  const ac = new AbortController();
  const aborted = admit(s.dir, 2, ac.signal);
  setTimeout(() => ac.abort(new Error('no longer wanted')), 100);
  await expect(aborted).rejects.toThrow('no longer wanted');
  b.release();
  third?.release();
  expect(fs.readdirSync(path.join(s.dir, 'admission'))).toEqual([]);
});

test("a slot whose owner died is taken over; a live process's slot is not", async () => {
  const dir = path.join(s.dir, 'admission');
  fs.mkdirSync(dir);
  const dead = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], {
    encoding: 'utf8',
  }).stdout;
  fs.writeFileSync(path.join(dir, '0.lock'), dead);
  const slot = await admit(s.dir, 1);
  expect(slot.index).toBe(0);
  expect(fs.readFileSync(path.join(dir, '0.lock'), 'utf8')).toBe(String(process.pid));
  slot.release();
  // A live owner (this test's parent process) keeps its slot: the wait goes on until aborted.
  fs.writeFileSync(path.join(dir, '0.lock'), String(process.ppid));
  await expect(admit(s.dir, 1, AbortSignal.timeout(300))).rejects.toMatchObject({ name: 'TimeoutError' });
  expect(fs.readFileSync(path.join(dir, '0.lock'), 'utf8')).toBe(String(process.ppid));
});

(skip ? describe.skip : describe)(`admission on real boots${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  test('five run() at once with maxConcurrentBoots 2: all ready, never more than two booting together', async () => {
    const exporter = new InMemorySpanExporter();
    const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
    const vms: MicroVM[] = [];
    try {
      const started = await Promise.allSettled(
        [0, 1, 2, 3, 4].map((i) =>
          run('test-image', {
            name: `q${i}`,
            rootfsPath: process.env.MICROVM_TEST_IMAGE,
            dataDir: path.join(s.dir, 'data'),
            backend: 'qemu',
            idle: true,
            maxConcurrentBoots: 2,
            tracerProvider: provider,
          }).then((vm) => (vms.push(vm), vm)),
        ),
      );
      expect(started.map((r) => r.status)).toEqual(Array(5).fill('fulfilled'));
      for (const vm of vms) expect((await vm.exec(['echo', vm.name])).stdout).toBe(`${vm.name}\n`);
      // Each run's boot: from its VMSpawn's start to its PostBoot's end.
      const spans = exporter.getFinishedSpans();
      const runs = spans.filter((x) => x.name === 'microvm.Run');
      const t = (x: { startTime: [number, number] } | { endTime: [number, number] }, key: 'startTime' | 'endTime') => {
        const [sec, ns] = (x as Record<string, [number, number]>)[key];
        return sec * 1e9 + ns;
      };
      const boots = runs.map((r) => {
        const mine = spans.filter((x) => x.parentSpanContext?.spanId === r.spanContext().spanId);
        const spawn = mine.find((x) => x.name === 'microvm.VMSpawn');
        const post = mine.find((x) => x.name === 'microvm.PostBoot');
        return [t(spawn as never, 'startTime'), t(post as never, 'endTime')] as const;
      });
      expect(boots).toHaveLength(5);
      const most = Math.max(...boots.map(([start]) => boots.filter(([a, b]) => a <= start && start < b).length));
      expect(most).toBeLessThanOrEqual(2);
      const waits = spans.filter((x) => x.name === 'microvm.AdmissionWait');
      expect(waits).toHaveLength(5);
      expect(waits.every((w) => w.attributes['microvm.admission.limit'] === 2)).toBe(true);
      // With five starts and two slots, some had to wait.
      expect(waits.filter((w) => (w.attributes['microvm.admission.waited_ms'] as number) > 0).length).toBeGreaterThan(
        0,
      );
    } finally {
      for (const vm of vms) await vm.remove().catch(() => undefined);
    }
    expect(fs.readdirSync(path.join(s.dir, 'data', 'admission'))).toEqual([]);
  }, 240_000);
});
