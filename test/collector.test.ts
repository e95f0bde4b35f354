/**
 * The CLI's own span and metric collector (lib/telemetry/collector.ts): W3C ids and parenting,
 * times, bounds, the OTLP/JSON encoding a real receiver in this test parses, headers, and an
 * export that fails or hangs ending as one error naming the URL without credentials.
 */
import * as http from 'node:http';
import { context, SpanKind, SpanStatusCode, trace } from '@opentelemetry/api';
import {
  CollectingMeterProvider,
  CollectingTracerProvider,
  otlpHeaders,
  postOtlpJson,
  spansToOtlpJson,
} from '../lib/telemetry/collector';
import { runMetrics, recordStage } from '../lib/telemetry/metrics';

type Attr = { key: string; value: Record<string, unknown> };
const attr = (list: Attr[], key: string): unknown => {
  const v = list.find((a) => a.key === key)?.value;
  return v ? Object.values(v)[0] : undefined;
};

describe('CollectingTracerProvider', () => {
  test('children share the trace id and name their parent; roots get a new trace', () => {
    const p = new CollectingTracerProvider();
    const t = p.getTracer('node-microvm');
    const root = t.startSpan('a');
    const child = t.startSpan('b', {}, trace.setSpan(context.active(), root));
    const other = t.startSpan('c');
    const forced = t.startSpan('d', { root: true }, trace.setSpan(context.active(), root));
    for (const s of [child, root, other, forced]) s.end();
    const [b, a, c, d] = p.finishedSpans();
    expect(a.spanContext().traceId).toMatch(/^[0-9a-f]{32}$/);
    expect(a.spanContext().spanId).toMatch(/^[0-9a-f]{16}$/);
    expect(trace.isSpanContextValid(a.spanContext())).toBe(true);
    expect(b.spanContext().traceId).toBe(a.spanContext().traceId);
    expect(b.parentSpanContext?.spanId).toBe(a.spanContext().spanId);
    expect(a.parentSpanContext).toBeUndefined();
    expect(c.spanContext().traceId).not.toBe(a.spanContext().traceId);
    expect(d.parentSpanContext).toBeUndefined();
    expect(d.spanContext().traceId).not.toBe(a.spanContext().traceId);
    expect(new Set([a, b, c, d].map((s) => s.spanContext().spanId)).size).toBe(4);
  });

  test('times: performance.now() values, epoch milliseconds, Dates and hrtimes land on the epoch clock', () => {
    const p = new CollectingTracerProvider();
    const t = p.getTracer('x');
    const ms = (h: [number, number]): number => h[0] * 1e3 + h[1] / 1e6;
    const before = Date.now();
    const s = t.startSpan('now');
    s.end();
    const after = Date.now();
    const [now] = p.finishedSpans();
    expect(ms(now.startTime)).toBeGreaterThanOrEqual(before - 1);
    expect(ms(now.endTime)).toBeLessThanOrEqual(after + 1);
    const epoch = 1_790_000_000_123.5;
    t.startSpan('epoch', { startTime: epoch }).end(new Date(1_790_000_001_000));
    t.startSpan('hr', { startTime: [1_790_000_000, 5] }).end([1_790_000_000, 7]);
    const perf = performance.now();
    t.startSpan('perf', { startTime: perf }).end(perf + 2);
    const [, e, h, pf] = p.finishedSpans();
    expect(e.startTime).toEqual([1_790_000_000, 123_500_000]);
    expect(e.endTime).toEqual([1_790_000_001, 0]);
    expect(h.startTime).toEqual([1_790_000_000, 5]);
    expect(h.endTime).toEqual([1_790_000_000, 7]);
    expect(Math.abs(ms(pf.startTime) - (Date.now() - (performance.now() - perf)))).toBeLessThan(2);
    expect(ms(pf.endTime) - ms(pf.startTime)).toBeCloseTo(2, 3);
  });

  test('an ended span changes no more; events, attributes and exceptions are kept within bounds', () => {
    const p = new CollectingTracerProvider();
    const s = p.getTracer('x').startSpan('s', { attributes: { a: 1 }, kind: SpanKind.CLIENT });
    s.setAttribute('b', 'two');
    s.setAttributes({ c: true, d: undefined });
    for (let i = 0; i < 200; i++) s.addEvent('ev', { i });
    s.recordException(new TypeError('bad'));
    s.setStatus({ code: SpanStatusCode.ERROR, message: 'boom' });
    s.end();
    s.setAttribute('late', 1);
    s.updateName('renamed');
    s.setStatus({ code: SpanStatusCode.OK });
    s.end([1, 0]);
    const [r] = p.finishedSpans();
    expect(p.finishedSpans()).toHaveLength(1); // a second end() is not a second span
    expect(r.name).toBe('s');
    expect(r.attributes).toEqual({ a: 1, b: 'two', c: true });
    expect(r.events).toHaveLength(128);
    expect(r.droppedEvents).toBe(73); // 200 + the exception, 128 kept
    expect(r.status).toEqual({ code: SpanStatusCode.ERROR, message: 'boom' });
    expect(r.isRecording()).toBe(false);
    expect(r.endTime).not.toEqual([1, 0]);
  });

  test('OTLP/JSON: hex ids, string nanoseconds, OTLP kinds, typed values, parent ids, scopes', () => {
    const p = new CollectingTracerProvider();
    const t = p.getTracer('node-microvm');
    const root = t.startSpan('microvm.Run', {
      startTime: [1_790_000_000, 1],
      attributes: { s: 'x', i: 3, f: 0.5, b: false, arr: ['a', 'b'] },
    });
    const get = t.startSpan('GET', { kind: SpanKind.CLIENT }, trace.setSpan(context.active(), root));
    get.addEvent('ssh.probe_failed', { 'ssh.probe_count': 1 }, [1_790_000_000, 50]);
    get.setStatus({ code: SpanStatusCode.ERROR, message: 'refused' });
    get.end([1_790_000_001, 0]);
    root.end([1_790_000_002, 999_999_999]);
    p.getTracer('other').startSpan('o').end();
    const body = spansToOtlpJson(p.finishedSpans(), { 'service.name': 'svc' }) as {
      resourceSpans: {
        resource: { attributes: Attr[] };
        scopeSpans: { scope: { name: string }; spans: Record<string, unknown>[] }[];
      }[];
    };
    const json = JSON.parse(JSON.stringify(body)) as typeof body; // what the receiver parses
    const [rs] = json.resourceSpans;
    expect(attr(rs.resource.attributes, 'service.name')).toBe('svc');
    expect(rs.scopeSpans.map((s) => s.scope.name)).toEqual(['node-microvm', 'other']);
    const [g, r] = rs.scopeSpans[0].spans;
    expect(r).toMatchObject({
      name: 'microvm.Run',
      kind: 1,
      startTimeUnixNano: '1790000000000000001',
      endTimeUnixNano: '1790000002999999999',
      traceId: root.spanContext().traceId,
      spanId: root.spanContext().spanId,
      status: { code: 0 },
    });
    expect(r.parentSpanId).toBeUndefined();
    const ra = r.attributes as Attr[];
    expect(ra).toEqual([
      { key: 's', value: { stringValue: 'x' } },
      { key: 'i', value: { intValue: '3' } },
      { key: 'f', value: { doubleValue: 0.5 } },
      { key: 'b', value: { boolValue: false } },
      { key: 'arr', value: { arrayValue: { values: [{ stringValue: 'a' }, { stringValue: 'b' }] } } },
    ]);
    expect(g).toMatchObject({
      name: 'GET',
      kind: 3, // SPAN_KIND_CLIENT
      parentSpanId: root.spanContext().spanId,
      traceId: root.spanContext().traceId,
      status: { code: 2, message: 'refused' },
      events: [
        {
          name: 'ssh.probe_failed',
          timeUnixNano: '1790000000000000050',
          attributes: [{ key: 'ssh.probe_count', value: { intValue: '1' } }],
        },
      ],
    });
  });
});

describe('CollectingMeterProvider', () => {
  test("run()'s instruments: cumulative counters and second-bucket histograms per attribute set", () => {
    const p = new CollectingMeterProvider();
    const m = runMetrics(p);
    recordStage(m, 'microvm.VMSpawn', 0.004, { 'microvm.backend': 'qemu' });
    recordStage(m, 'microvm.VMSpawn', 1.5, { 'microvm.backend': 'qemu' });
    recordStage(m, 'microvm.VMSpawn', 120, { 'microvm.backend': 'qemu' });
    recordStage(m, 'microvm.VMSpawn', 0.005, { 'microvm.backend': 'qemu' }); // on a bound: that bucket
    recordStage(m, 'microvm.Preflight', 0.0001, { 'microvm.backend': 'qemu' }, { code: 'ERR_X' });
    m.runs.add(1, { 'microvm.outcome': 'ok' });
    m.runs.add(1, { 'microvm.outcome': 'ok' });
    m.runs.add(-5, { 'microvm.outcome': 'ok' }); // a counter never goes down: ignored
    m.runs.add(Number.NaN, { 'microvm.outcome': 'ok' });
    const body = JSON.parse(JSON.stringify(p.toOtlpJson({ 'service.name': 's' }))) as {
      resourceMetrics: { scopeMetrics: { scope: { name: string }; metrics: { name: string }[] }[] }[];
    };
    const [sm] = body.resourceMetrics[0].scopeMetrics;
    expect(sm.scope.name).toBe('node-microvm');
    const byName = Object.fromEntries(sm.metrics.map((x) => [x.name, x])) as unknown as Record<
      string,
      {
        unit: string;
        histogram?: { aggregationTemporality: number; dataPoints: Record<string, unknown>[] };
        sum?: { isMonotonic: boolean; dataPoints: Record<string, unknown>[] };
      }
    >;
    expect(Object.keys(byName).sort()).toEqual(['microvm.runs', 'microvm.stage.duration']); // nothing failed
    const h = byName['microvm.stage.duration'];
    expect(h.unit).toBe('s');
    expect(h.histogram?.aggregationTemporality).toBe(2);
    const spawn = h.histogram?.dataPoints.find(
      (d) => attr(d.attributes as Attr[], 'microvm.stage') === 'microvm.VMSpawn',
    );
    expect(spawn).toMatchObject({ count: '4', min: 0.004, max: 120 });
    expect(spawn?.sum).toBeCloseTo(121.509, 9);
    const bounds = spawn?.explicitBounds as number[];
    const buckets = (spawn?.bucketCounts as string[]).map(Number);
    expect(buckets).toHaveLength(bounds.length + 1);
    expect(buckets[bounds.indexOf(0.005)]).toBe(2); // 4 ms and 5 ms in (2.5 ms, 5 ms]
    expect(buckets[bounds.indexOf(2.5)]).toBe(1);
    expect(buckets[bounds.length]).toBe(1); // 120 s beyond the last bound
    const failed = h.histogram?.dataPoints.find((d) => attr(d.attributes as Attr[], 'error.type') === 'ERR_X');
    expect(failed).toMatchObject({ count: '1' });
    const runs = byName['microvm.runs'].sum;
    expect(runs?.isMonotonic).toBe(true);
    expect(runs?.dataPoints).toHaveLength(1);
    expect(runs?.dataPoints[0].asInt).toBe('2');
  });
});

describe('export', () => {
  test('OTEL_EXPORTER_OTLP_*_HEADERS: URL-decoded pairs, the signal’s own after the common ones, bad ones left out', () => {
    expect(
      otlpHeaders(
        {
          OTEL_EXPORTER_OTLP_HEADERS: 'Authorization=Bearer%20abc, x-a=1,broken,=v,b%ZZ=2',
          OTEL_EXPORTER_OTLP_TRACES_HEADERS: 'x-a=2',
        },
        'traces',
      ),
    ).toEqual({ authorization: 'Bearer abc', 'x-a': '2' });
    expect(otlpHeaders({ OTEL_EXPORTER_OTLP_TRACES_HEADERS: 'x-a=2' }, 'metrics')).toEqual({});
  });

  test('posts JSON with the headers; a refusal, a hang and a dead port are errors without credentials', async () => {
    const seen: { url?: string; type?: string; auth?: string; body: string }[] = [];
    let mode: 'ok' | 'refuse' | 'hang' = 'ok';
    const server = http.createServer((req, res) => {
      let body = '';
      req.on('data', (c: Buffer) => (body += c.toString()));
      req.on('end', () => {
        seen.push({ url: req.url, type: req.headers['content-type'], auth: req.headers.authorization, body });
        if (mode === 'hang') return;
        res.writeHead(mode === 'ok' ? 200 : 503).end();
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    const port = (server.address() as { port: number }).port;
    try {
      await postOtlpJson(`http://127.0.0.1:${port}/v1/traces`, { a: 1 }, { authorization: 'Bearer s3cret' });
      expect(seen[0]).toEqual({ url: '/v1/traces', type: 'application/json', auth: 'Bearer s3cret', body: '{"a":1}' });
      mode = 'refuse';
      const url = `http://user:pw@127.0.0.1:${port}/v1/traces?token=t0k`;
      const refused = await postOtlpJson(url, {}, { authorization: 'Bearer s3cret' }).catch((e: Error) => e);
      expect((refused as Error).message).toMatch(/HTTP 503/);
      for (const secret of ['pw', 't0k', 's3cret']) expect((refused as Error).message).not.toContain(secret);
      expect(seen[1].auth).toBe('Bearer s3cret'); // the caller's header wins over the URL's user:pw
      await postOtlpJson(`http://us%20er:p%40w@127.0.0.1:${port}/v1/traces`, {}, {}).catch(() => undefined);
      expect(seen[2].auth).toBe(`Basic ${Buffer.from('us er:p@w').toString('base64')}`);
      mode = 'hang';
      const hung = await postOtlpJson(`http://127.0.0.1:${port}/v1/traces`, {}, {}, 300).catch((e: Error) => e);
      expect((hung as Error).message).toMatch(/no answer within 300 ms/);
    } finally {
      server.closeAllConnections();
      server.close();
    }
    const closed = http.createServer();
    await new Promise<void>((r) => closed.listen(0, '127.0.0.1', () => r()));
    const deadPort = (closed.address() as { port: number }).port;
    await new Promise((r) => closed.close(r));
    const dead = await postOtlpJson(`http://127.0.0.1:${deadPort}/v1/traces`, {}, {}).catch((e: Error) => e);
    expect((dead as Error).message).toMatch(
      /OTLP export to http:\/\/127\.0\.0\.1:\d+\/v1\/traces failed: ECONNREFUSED/,
    );
  });
});

describe('collector edges (bounds, clocks, links, instruments)', () => {
  const ms = (h: [number, number]): number => h[0] * 1e3 + h[1] / 1e6;

  test('attributes: undefined and null are not set; at most 128 keys, an existing one may change', () => {
    const p = new CollectingTracerProvider();
    const s = p.getTracer('x').startSpan('s');
    s.setAttributes({ u: undefined, n: null as unknown as string });
    expect('u' in (s as unknown as { attributes: object }).attributes).toBe(false);
    expect('n' in (s as unknown as { attributes: object }).attributes).toBe(false);
    for (let i = 0; i < 130; i++) s.setAttribute(`k${i}`, i);
    s.setAttribute('k0', 'changed');
    s.end();
    const [r] = p.finishedSpans();
    expect(Object.keys(r.attributes)).toHaveLength(128);
    expect(r.attributes.k0).toBe('changed');
    expect(r.attributes.k128).toBeUndefined();
  });

  test('events: every time form; none after the end; a name change before it; exceptions as events', () => {
    const p = new CollectingTracerProvider();
    const s = p.getTracer('x').startSpan('old');
    s.addEvent('epoch', 1_790_000_000_000);
    s.addEvent('date', new Date(1_790_000_000_500));
    s.addEvent('hr', [1_790_000_001, 7]);
    s.addEvent('attrs-and-time', { a: 1 }, [1_790_000_002, 0]);
    s.recordException(new RangeError('bad range'));
    s.recordException('plain text');
    s.updateName('new');
    s.end();
    s.addEvent('late');
    const [r] = p.finishedSpans();
    expect(r.name).toBe('new');
    expect(r.events.map((e) => [e.name, e.time, e.attributes])).toEqual([
      ['epoch', [1_790_000_000, 0], undefined],
      ['date', [1_790_000_000, 500_000_000], undefined],
      ['hr', [1_790_000_001, 7], undefined],
      ['attrs-and-time', [1_790_000_002, 0], { a: 1 }],
      [
        'exception',
        expect.any(Array),
        expect.objectContaining({
          'exception.type': 'RangeError',
          'exception.message': 'bad range',
          'exception.stacktrace': expect.stringContaining('bad range'),
        }),
      ],
      ['exception', expect.any(Array), { 'exception.message': 'plain text' }],
    ]);
  });

  test('a number of 1e12 or more is epoch milliseconds; an invalid parent starts a new trace', () => {
    const p = new CollectingTracerProvider();
    const t = p.getTracer('x');
    t.startSpan('edge', { startTime: 1e12 }).end(1e12 + 1);
    const bad = trace.setSpanContext(
      context.active(),
      trace.wrapSpanContext({ traceId: '0'.repeat(32), spanId: '0'.repeat(16), traceFlags: 0 }).spanContext(),
    );
    t.startSpan('orphan', {}, bad).end();
    const [edge, orphan] = p.finishedSpans();
    expect(edge.startTime).toEqual([1e9, 0]);
    expect(ms(edge.endTime) - ms(edge.startTime)).toBeCloseTo(1, 6);
    expect(orphan.parentSpanContext).toBeUndefined();
    expect(orphan.spanContext().traceId).not.toBe('0'.repeat(32));
  });

  test('startActiveSpan in its three forms; at most 10,000 spans kept (the rest counted); reset()', () => {
    const p = new CollectingTracerProvider();
    const t = p.getTracer('x');
    const parent = t.startSpan('parent');
    const ctx = trace.setSpan(context.active(), parent);
    expect(t.startActiveSpan('a', (s) => (s.end(), 1))).toBe(1);
    expect(t.startActiveSpan('b', { attributes: { x: 1 } }, (s) => (s.end(), 2))).toBe(2);
    expect(t.startActiveSpan('c', {}, ctx, (s) => (s.end(), 3))).toBe(3);
    const [a, b, c] = p.finishedSpans();
    expect([a.name, b.name, c.name]).toEqual(['a', 'b', 'c']);
    expect(b.attributes).toEqual({ x: 1 });
    expect(c.parentSpanContext?.spanId).toBe(parent.spanContext().spanId);
    for (let i = 0; i < 10_000; i++) t.startSpan('many').end();
    expect(p.finishedSpans()).toHaveLength(10_000);
    expect(p.dropped).toBe(3);
    p.reset();
    expect(p.finishedSpans()).toHaveLength(0);
  });

  test('links: kept until the end, at most 128, in the OTLP/JSON', () => {
    const p = new CollectingTracerProvider();
    const t = p.getTracer('x');
    const other = t.startSpan('other');
    const link = { context: other.spanContext(), attributes: { why: 'retry' } };
    const s = t.startSpan('s', { links: [link] });
    s.addLinks(Array.from({ length: 200 }, () => ({ context: other.spanContext() })));
    s.end();
    s.addLink(link);
    const r = p.finishedSpans()[0];
    expect(r.links).toHaveLength(128);
    const body = spansToOtlpJson([r], {}) as { resourceSpans: { scopeSpans: { spans: { links: unknown[] }[] }[] }[] };
    expect(body.resourceSpans[0].scopeSpans[0].spans[0].links[0]).toEqual({
      traceId: other.spanContext().traceId,
      spanId: other.spanContext().spanId,
      attributes: [{ key: 'why', value: { stringValue: 'retry' } }],
    });
  });

  test('instruments: one per name and kind, shared by meters of one name; attribute order does not split a series', () => {
    const p = new CollectingMeterProvider();
    const c1 = p.getMeter('m').createCounter('n');
    const c2 = p.getMeter('m').createCounter('n', { unit: 'ignored' });
    const h = p.getMeter('m').createHistogram('n', { advice: { explicitBucketBoundaries: [1, 2] } });
    c1.add(0, { a: 1, b: 2 });
    c2.add(0.5, { b: 2, a: 1 });
    h.record(1.5);
    type Body = {
      resourceMetrics: {
        scopeMetrics: {
          metrics: {
            name: string;
            unit: string;
            description: string;
            sum?: { dataPoints: Record<string, unknown>[] };
            histogram?: { dataPoints: Record<string, unknown>[] };
          }[];
        }[];
      }[];
    };
    const body = JSON.parse(JSON.stringify(p.toOtlpJson({}))) as Body;
    const metrics = body.resourceMetrics[0].scopeMetrics[0].metrics;
    expect(body.resourceMetrics[0].scopeMetrics).toHaveLength(1);
    expect(metrics).toHaveLength(2);
    const [counter, hist] = metrics;
    expect([counter.unit, counter.description]).toEqual(['', '']);
    expect(counter.sum?.dataPoints).toHaveLength(1);
    expect(counter.sum?.dataPoints[0].asDouble).toBe(0.5);
    expect(counter.sum?.dataPoints[0].asInt).toBeUndefined();
    expect(hist.histogram?.dataPoints[0]).toMatchObject({ explicitBounds: [1, 2], bucketCounts: ['0', '1', '0'] });
  });

  test('an endpoint that is not a URL is an error that says so', async () => {
    await expect(postOtlpJson('not a url', {}, {})).rejects.toThrow('OTLP export failed: the endpoint is not a URL');
  });
});
