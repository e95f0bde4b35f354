/**
 * lib/network/egress-audit.ts on a log this test writes as the relays would (no VM): events on
 * microvm.network.Egress, the counter, the caps, and hostile lines skipped.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { context, trace, type Tracer } from '@opentelemetry/api';
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  type ReadableSpan,
  SimpleSpanProcessor,
} from '@opentelemetry/sdk-trace-base';
import { startEgressAudit } from '../lib/network/egress-audit';
import { scratch } from './helpers';

/** A tracer whose finished spans the test reads. */
function capture(): { exporter: InMemorySpanExporter; tracer: Tracer } {
  const exporter = new InMemorySpanExporter();
  return {
    exporter,
    tracer: new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] }).getTracer('t'),
  };
}

/**
 * The audit over a log holding `text` (none when undefined), read to its end: its span and what the
 * counter was given.
 */
function auditOnce(text: string | undefined): { span: ReadableSpan; counted: unknown[]; before: number } {
  const s = scratch('microvm-audit-');
  try {
    const { exporter, tracer } = capture();
    const counted: unknown[] = [];
    const file = path.join(s.dir, 'egress.log');
    const before = Date.now();
    if (text !== undefined) fs.writeFileSync(file, text);
    const audit = startEgressAudit(file, { tracer, ctx: context.active() }, { add: (_n, a) => void counted.push(a) });
    audit.close();
    const [span] = exporter.getFinishedSpans();
    return { span, counted, before };
  } finally {
    s.cleanup();
  }
}

test('each line is an event at its time; failures counted; after 128 events only the totals grow; bad lines skipped', () => {
  const s = scratch('microvm-audit-');
  try {
    const { exporter, tracer } = capture();
    const root = tracer.startSpan('microvm.Run');
    const counted: [number, unknown][] = [];
    const file = path.join(s.dir, 'egress.log');
    const audit = startEgressAudit(
      file,
      { tracer, ctx: trace.setSpan(context.active(), root) },
      { add: (n: number, a?: unknown) => void counted.push([n, a]) },
    );
    const line = (o: Record<string, unknown>): string => `${JSON.stringify(o)}\n`;
    fs.writeFileSync(
      file,
      line({ time: '2026-12-03T10:00:00.000Z', host: 'svc.test', port: 8080, ok: true, bytesIn: 120, bytesOut: 40 }) +
        line({ time: '2026-12-03T10:00:01.000Z', host: 'svc.test', port: 8080, ok: false, error: 'ECONNREFUSED' }) +
        'not json\n' +
        line({ host: 'x'.repeat(300), port: 1, ok: true }) + // a name no rule can have
        line({ host: 'svc.test', port: 'eighty', ok: true }) +
        `${'{'.repeat(5000)}\n`,
    );
    // More than the cap, written in pieces (a line split across two reads still counts once).
    let more = '';
    for (let i = 0; i < 300; i++) more += line({ host: 'bulk.test', port: 443, ok: true, bytesIn: i });
    fs.appendFileSync(file, more.slice(0, 1000));
    fs.appendFileSync(file, more.slice(1000));
    audit.close();
    audit.close(); // once only
    root.end();
    const egress = exporter.getFinishedSpans().filter((x) => x.name === 'microvm.network.Egress');
    expect(egress).toHaveLength(1);
    const sp = egress[0];
    expect(sp.parentSpanContext?.spanId).toBe(root.spanContext().spanId);
    expect(sp.events).toHaveLength(128);
    expect(sp.events[0].name).toBe('microvm.network.connection');
    expect(sp.events[0].attributes).toEqual({
      'server.address': 'svc.test',
      'server.port': 8080,
      'microvm.network.outcome': 'connected',
      'microvm.network.bytes_in': 120,
      'microvm.network.bytes_out': 40,
    });
    expect(sp.events[0].time).toEqual([Date.parse('2026-12-03T10:00:00.000Z') / 1000, 0]);
    expect(sp.events[1].attributes).toMatchObject({
      'microvm.network.outcome': 'failed',
      'error.type': 'ECONNREFUSED',
    });
    expect(sp.attributes).toMatchObject({
      'microvm.network.connections': 302,
      'microvm.network.connection_failures': 1,
      'microvm.network.events_dropped': 174,
    });
    expect(counted).toHaveLength(302);
    expect(
      counted.filter(([, a]) => (a as Record<string, string>)['microvm.network.outcome'] === 'failed'),
    ).toHaveLength(1);
  } finally {
    s.cleanup();
  }
});

test('no log at all (no connection was made): the span ends with zero counts', () => {
  const { span: sp } = auditOnce(undefined);
  expect(sp.name).toBe('microvm.network.Egress');
  expect(sp.events).toHaveLength(0);
  expect(sp.attributes).toMatchObject({ 'microvm.network.connections': 0, 'microvm.network.events_dropped': 0 });
});

test('fields are checked one by one: bad byte counts left out, long errors cut, a missing time is now', () => {
  const {
    span: sp,
    counted,
    before,
  } = auditOnce(
    `${JSON.stringify({ host: 'a.test', port: 1, ok: false, error: 'E'.repeat(100), bytesIn: -1, bytesOut: 1.5 })}\n` +
      `${JSON.stringify({ host: 'a.test', port: 1, ok: true, bytesIn: 0, time: 'not a time' })}\n` +
      `${JSON.stringify({ host: 'a.test', port: 1, ok: 'yes' })}\n` +
      `${JSON.stringify({ host: 7, port: 1, ok: true })}\n` +
      `${JSON.stringify({ host: 'a.test', port: 1, ok: true }).padEnd(5000, ' ')}\n` +
      '{"host": "cut.test", "port": 1, "ok": true',
  );
  expect(sp.events.map((e) => e.attributes)).toEqual([
    {
      'server.address': 'a.test',
      'server.port': 1,
      'microvm.network.outcome': 'failed',
      'error.type': 'E'.repeat(64),
    },
    {
      'server.address': 'a.test',
      'server.port': 1,
      'microvm.network.outcome': 'connected',
      'microvm.network.bytes_in': 0,
    },
  ]);
  const ms = (h: [number, number]): number => h[0] * 1e3 + h[1] / 1e6;
  expect(ms(sp.events[1].time)).toBeGreaterThanOrEqual(before - 1);
  expect(counted).toEqual([{ 'microvm.network.outcome': 'failed' }, { 'microvm.network.outcome': 'connected' }]);
  expect(sp.attributes).toMatchObject({ 'microvm.network.connections': 2, 'microvm.network.connection_failures': 1 });
});

test("the filter's lines: refused and resolved outcomes, what was decided and by which rule; a rule that is not one is left out", () => {
  const line = (o: Record<string, unknown>): string =>
    `${JSON.stringify({ time: '2026-12-03T15:00:00.000Z', address: null, protocol: 'any', ...o })}\n`;
  const { span: sp, counted } = auditOnce(
    line({ host: 'a.svc.test', port: 53, ok: true, rule: 'egress.allow[0]', kind: 'dns' }) +
      line({ host: 'bad.test', port: 53, ok: false, error: 'ENOTFOUND', rule: 'egress.deny[0]', kind: 'dns' }) +
      line({ host: '10.0.0.3', port: 80, ok: false, error: 'ECONNREFUSED', rule: 'default', kind: 'connect' }) +
      line({ host: 'a.svc.test', port: 80, ok: true, rule: 'egress.allow[0]', kind: 'connect' }) +
      line({ host: '10.0.0.3', port: 9, ok: false, error: 'EACCES', rule: '"><script>', kind: 'udp-ish' }),
  );
  expect(sp.events.map((e) => e.attributes)).toEqual([
    expect.objectContaining({
      'microvm.network.outcome': 'resolved',
      'microvm.network.kind': 'dns',
      'microvm.network.rule': 'egress.allow[0]',
    }),
    expect.objectContaining({
      'server.address': 'bad.test',
      'microvm.network.outcome': 'refused',
      'error.type': 'ENOTFOUND',
    }),
    expect.objectContaining({
      'microvm.network.outcome': 'refused',
      'microvm.network.rule': 'default',
      'microvm.network.kind': 'connect',
    }),
    expect.objectContaining({ 'microvm.network.outcome': 'connected', 'microvm.network.kind': 'connect' }),
    // Neither kind nor rule is one the filter writes: a plain failure.
    { 'server.address': '10.0.0.3', 'server.port': 9, 'microvm.network.outcome': 'failed', 'error.type': 'EACCES' },
  ]);
  expect(counted.map((a) => (a as Record<string, string>)['microvm.network.outcome'])).toEqual([
    'resolved',
    'refused',
    'refused',
    'connected',
    'failed',
  ]);
});
