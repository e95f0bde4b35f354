/** Telemetry helpers: spans end once with the right status, errors are recorded, the tree renders exactly. */
import { context, SpanStatusCode, trace } from '@opentelemetry/api';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { formatSpanTree, type SpanLike } from '../lib/telemetry/tree';
import { endSpan, getTracer, inSpan } from '../lib/telemetry/tracer';

function capture() {
  const exporter = new InMemorySpanExporter();
  const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
  return { exporter, tracer: getTracer(provider) };
}

test("getTracer names the tracer after this package and its version; without a provider it is the global one's", () => {
  const { tracer, exporter } = capture();
  tracer.startSpan('x').end();
  const scope = exporter.getFinishedSpans()[0].instrumentationScope;
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const pkg = require('../package.json') as { name: string; version: string };
  expect(scope).toMatchObject({ name: pkg.name, version: pkg.version });
  expect(getTracer().startSpan('y').isRecording()).toBe(false); // no global provider: no-op
});

test('inSpan: a child of the scope, ended with OK; its scope parents grandchildren (no context manager needed)', async () => {
  const { tracer, exporter } = capture();
  const parent = tracer.startSpan('parent');
  const scope = { tracer, ctx: trace.setSpan(context.active(), parent) };
  const r = await inSpan(scope, 'child', { a: 1 }, async (_span, inner) => {
    await inSpan(inner, 'grandchild', undefined, () => undefined);
    return 42;
  });
  parent.end();
  expect(r).toBe(42);
  const spans = exporter.getFinishedSpans();
  const by = (n: string) => spans.find((x) => x.name === n)!;
  expect(by('child').parentSpanContext?.spanId).toBe(parent.spanContext().spanId);
  expect(by('grandchild').parentSpanContext?.spanId).toBe(by('child').spanContext().spanId);
  expect(by('child').attributes).toEqual({ a: 1 });
  expect(by('child').status.code).toBe(SpanStatusCode.UNSET);
  expect(by('child').events).toEqual([]);
});

test('inSpan: a rejection ends the span ERROR with message, error.type (the code, else the name) and the exception; the error passes through', async () => {
  const { tracer, exporter } = capture();
  const scope = { tracer, ctx: context.active() };
  const coded = Object.assign(new Error('boom\nsecond line'), { code: 'E_CODED' });
  await expect(
    inSpan(scope, 'fails', undefined, () => {
      throw coded;
    }),
  ).rejects.toBe(coded);
  await expect(inSpan(scope, 'named', undefined, () => Promise.reject(new TypeError('bad')))).rejects.toThrow(
    TypeError,
  );
  const [a, b] = exporter.getFinishedSpans();
  expect(a.status).toEqual({ code: SpanStatusCode.ERROR, message: 'boom\nsecond line' });
  expect(a.attributes['error.type']).toBe('E_CODED');
  expect(a.events.map((e) => [e.name, e.attributes?.['exception.message']])).toEqual([
    ['exception', 'boom\nsecond line'],
  ]);
  expect(b.attributes['error.type']).toBe('TypeError');
});

test('endSpan with non-Error values: a string is the message; an object is its JSON; undefined means success', () => {
  const { tracer, exporter } = capture();
  endSpan(tracer.startSpan('s'), 'plain words');
  endSpan(tracer.startSpan('o'), { why: 1 });
  endSpan(tracer.startSpan('ok'));
  const [s, o, ok] = exporter.getFinishedSpans();
  expect([s.status.message, s.attributes['error.type']]).toEqual(['plain words', 'Error']);
  expect(o.status.message).toBe('{"why":1}');
  expect(ok.status.code).toBe(SpanStatusCode.UNSET);
});

const sp = (
  id: string,
  name: string,
  start: number,
  end: number,
  parent?: string,
  attributes: Record<string, unknown> = {},
  status: { code: number; message?: string } = { code: 0 },
): SpanLike => ({
  name,
  spanContext: () => ({ spanId: id }),
  parentSpanContext: parent ? { spanId: parent } : undefined,
  startTime: [start, 0],
  endTime: [Math.floor(end), Math.round((end % 1) * 1e9)],
  attributes,
  status,
});

test('formatSpanTree: children under parents in start order, aligned durations, the largest stage marked, chosen attributes and errors shown', () => {
  const text = formatSpanTree([
    sp('c', 'microvm.PostBoot', 12, 14.5, 'r'),
    sp('r', 'microvm.Run', 10, 14.75),
    sp('b', 'microvm.ImagePull', 10, 11, 'r', { 'microvm.image.cache_hit': true, ignored: 'x' }),
    sp('d', 'microvm.SSHWaitReady', 12, 14.25, 'c', { 'ssh.probes_total': 9 }),
    sp('e', 'microvm.VMSpawn', 11, 12, 'r', { 'microvm.qemu.accel': 'tcg' }, { code: 2, message: 'failed\nmore' }),
    sp('o', 'orphan', 20, 20.5, 'not-here'),
  ]);
  expect(text).toBe(
    [
      'microvm.Run                  4.750 s',
      '  microvm.ImagePull          1.000 s  cache_hit=true',
      '  microvm.VMSpawn            1.000 s  ERROR: failed  accel=tcg',
      '  microvm.PostBoot           2.500 s  ◀ largest stage',
      '    microvm.SSHWaitReady     2.250 s  probes=9',
      'orphan                       0.500 s',
    ].join('\n'),
  );
  expect(formatSpanTree([])).toBe('');
});

test('formatSpanTree: every shown attribute by its short name in a fixed order; an ERROR without a message; the first of equal children is the largest', () => {
  const text = formatSpanTree([
    sp('r', 'microvm.Run', 0, 10),
    sp('a', 'A', 1, 3, 'r', {
      'preflight.check.passed': false,
      'preflight.check.name': 'kvm',
      'microvm.backend': 'qemu',
      'microvm.rootfs.clone_strategy': 'overlay',
      'microvm.image.layered': true,
    }),
    sp('b', 'B', 3, 5, 'r', {}, { code: 2 }),
    sp('c', 'C', 5, 5.5, 'b'),
    sp('d', 'D', 6, 8, 'c'), // a grandchild longer than its parent is not a "stage"
  ]);
  expect(text).toBe(
    [
      'microvm.Run    10.000 s',
      '  A             2.000 s  ◀ largest stage  layered=true  clone=overlay  backend=qemu  check=kvm  passed=false',
      '  B             2.000 s  ERROR',
      '    C           0.500 s',
      '      D         2.000 s',
    ].join('\n'),
  );
});
