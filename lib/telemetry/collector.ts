/**
 * The CLI's own tracer and meter providers: they keep every span and metric point of one command
 * in memory (for `--trace`, `--trace-json` and `bench`) and export them once, at the end, as
 * OTLP/HTTP JSON (`--otlp`).
 *
 * Why not the OpenTelemetry SDK: npm has no dependencies for a package's CLI alone, so the SDK,
 * its exporters and their packages (23 in all) would be installed for every user of the library,
 * which needs @opentelemetry/api only. What the CLI needs is small: spans with W3C ids, a few
 * counters and one histogram, one POST per signal when the command ends. An application that wants
 * more (sampling, batching, other exporters) passes its own SDK provider to `run()`.
 */
import { randomBytes } from 'node:crypto';
import {
  type Attributes,
  type AttributeValue,
  type Context,
  type Counter,
  createNoopMeter,
  type Exception,
  type Histogram,
  type Link,
  type Meter,
  type MeterProvider,
  type MetricOptions,
  type Span,
  type SpanContext,
  SpanKind,
  type SpanOptions,
  type SpanStatus,
  SpanStatusCode,
  type TimeInput,
  trace,
  type Tracer,
  type TracerProvider,
} from '@opentelemetry/api';
import { redactedUrl } from '../image/http';

type HrTime = [number, number];

/** Bounds, as the SDK's defaults: a broken caller cannot grow a span or the collector without limit. */
const MAX_SPANS = 10_000;
const MAX_EVENTS = 128;
const MAX_LINKS = 128;
const MAX_ATTRIBUTES = 128;

const hr = (ms: number): HrTime => {
  const s = Math.floor(ms / 1e3);
  return [s, Math.round((ms - s * 1e3) * 1e6)];
};

/** One finished or running span, in the shape the SDK's ReadableSpan has where the CLI reads it. */
export class CollectedSpan implements Span {
  readonly kind: SpanKind;
  readonly startTime: HrTime;
  endTime: HrTime = [0, 0];
  ended = false;
  readonly attributes: Attributes = {};
  readonly events: { name: string; time: HrTime; attributes?: Attributes }[] = [];
  readonly links: Link[] = [];
  status: SpanStatus = { code: SpanStatusCode.UNSET };
  droppedEvents = 0;

  constructor(
    public name: string,
    readonly scope: string,
    private readonly ctx: SpanContext,
    readonly parentSpanContext: SpanContext | undefined,
    private readonly clock: (t?: TimeInput) => HrTime,
    options: SpanOptions,
    private readonly onEnd: (s: CollectedSpan) => void,
  ) {
    this.kind = options.kind ?? SpanKind.INTERNAL;
    this.startTime = clock(options.startTime);
    if (options.attributes) this.setAttributes(options.attributes);
    for (const l of options.links ?? []) this.addLink(l);
  }

  spanContext(): SpanContext {
    return this.ctx;
  }
  setAttribute(key: string, value: AttributeValue | undefined): this {
    if (this.ended || value === undefined || value === null) return this;
    if (key in this.attributes || Object.keys(this.attributes).length < MAX_ATTRIBUTES) this.attributes[key] = value;
    return this;
  }
  setAttributes(attributes: Attributes): this {
    for (const [k, v] of Object.entries(attributes)) this.setAttribute(k, v);
    return this;
  }
  addEvent(name: string, attributesOrTime?: Attributes | TimeInput, time?: TimeInput): this {
    if (this.ended) return this;
    if (this.events.length >= MAX_EVENTS) {
      this.droppedEvents++;
      return this;
    }
    const isTime =
      typeof attributesOrTime === 'number' || attributesOrTime instanceof Date || Array.isArray(attributesOrTime);
    this.events.push({
      name,
      time: this.clock(isTime ? attributesOrTime : time),
      attributes: isTime ? undefined : attributesOrTime,
    });
    return this;
  }
  addLink(link: Link): this {
    if (!this.ended && this.links.length < MAX_LINKS) this.links.push(link);
    return this;
  }
  addLinks(links: Link[]): this {
    for (const l of links) this.addLink(l);
    return this;
  }
  setStatus(status: SpanStatus): this {
    if (!this.ended) this.status = { ...status };
    return this;
  }
  updateName(name: string): this {
    if (!this.ended) this.name = name;
    return this;
  }
  end(endTime?: TimeInput): void {
    if (this.ended) return;
    this.ended = true;
    this.endTime = this.clock(endTime);
    this.onEnd(this);
  }
  isRecording(): boolean {
    return !this.ended;
  }
  recordException(exception: Exception, time?: TimeInput): void {
    const e = typeof exception === 'string' ? { message: exception } : exception;
    this.addEvent(
      'exception',
      {
        ...(e.name ? { 'exception.type': e.name } : {}),
        ...(e.message ? { 'exception.message': e.message } : {}),
        ...(e.stack ? { 'exception.stacktrace': e.stack } : {}),
      },
      time,
    );
  }
}

/**
 * Keeps the spans of this process. Times: epoch milliseconds from one anchor taken when the
 * provider is made (Date.now() - performance.now()), then performance.now(), as the SDK does per
 * trace; a number below 1e12 is a performance.now() value, above it epoch milliseconds.
 */
export class CollectingTracerProvider implements TracerProvider {
  readonly #finished: CollectedSpan[] = [];
  readonly #anchor = Date.now() - performance.now();
  dropped = 0;

  readonly #clock = (t?: TimeInput): HrTime => {
    if (t === undefined) return hr(this.#anchor + performance.now());
    if (typeof t === 'number') return hr(t < 1e12 ? this.#anchor + t : t);
    if (t instanceof Date) return hr(t.getTime());
    return [t[0], t[1]];
  };

  getTracer(name: string): Tracer {
    const startSpan = (spanName: string, options: SpanOptions = {}, ctx?: Context): Span => {
      const parent = options.root ? undefined : ctx ? trace.getSpanContext(ctx) : undefined;
      const valid = parent && trace.isSpanContextValid(parent) ? parent : undefined;
      const sc: SpanContext = {
        traceId: valid?.traceId ?? randomBytes(16).toString('hex'),
        spanId: randomBytes(8).toString('hex'),
        traceFlags: 1, // sampled: the CLI keeps every span it asked for
        traceState: valid?.traceState,
      };
      return new CollectedSpan(spanName, name, sc, valid, this.#clock, options, (s) => {
        if (this.#finished.length < MAX_SPANS) this.#finished.push(s);
        else this.dropped++;
      });
    };
    return {
      startSpan,
      startActiveSpan: <F extends (span: Span) => unknown>(spanName: string, ...args: unknown[]): ReturnType<F> => {
        const fn = args[args.length - 1] as F;
        const options = (args.length > 1 ? args[0] : undefined) as SpanOptions | undefined;
        const ctx = (args.length > 2 ? args[1] : undefined) as Context | undefined;
        return fn(startSpan(spanName, options, ctx)) as ReturnType<F>;
      },
    };
  }

  /** The spans that ended, in the order they ended. */
  finishedSpans(): readonly CollectedSpan[] {
    return this.#finished;
  }

  /** Forgets the spans that ended (bench: one run at a time). */
  reset(): void {
    this.#finished.length = 0;
  }
}

/** One histogram series or counter series: the points recorded under one set of attributes. */
interface Series {
  attributes: Attributes;
  count: number;
  sum: number;
  min: number;
  max: number;
  buckets: number[];
}

interface Instrument {
  name: string;
  kind: 'histogram' | 'counter';
  unit?: string;
  description?: string;
  bounds: number[];
  series: Map<string, Series>;
}

/** The SDK's default histogram boundaries are for milliseconds; ours records seconds. */
const SECONDS_BOUNDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
const MAX_SERIES = 2000;

/** Keeps counters and histograms (cumulative, like the SDK's default) for one export at the end. */
export class CollectingMeterProvider implements MeterProvider {
  readonly startTime = Date.now();
  readonly #meters = new Map<string, { version?: string; instruments: Instrument[] }>();

  getMeter(name: string, version?: string): Meter {
    let m = this.#meters.get(name);
    if (!m) this.#meters.set(name, (m = { version, instruments: [] }));
    const meter = m;
    const instrument = (kind: Instrument['kind'], n: string, o: MetricOptions = {}): Instrument => {
      const found = meter.instruments.find((i) => i.name === n && i.kind === kind);
      if (found) return found;
      const i: Instrument = {
        name: n,
        kind,
        unit: o.unit,
        description: o.description,
        bounds: kind === 'histogram' ? (o.advice?.explicitBucketBoundaries ?? SECONDS_BOUNDS) : [],
        series: new Map(),
      };
      meter.instruments.push(i);
      return i;
    };
    const record = (i: Instrument, value: number, attributes: Attributes = {}): void => {
      if (!Number.isFinite(value) || (i.kind === 'counter' && value < 0)) return; // as the API says: ignored
      const key = JSON.stringify(Object.entries(attributes).sort(([a], [b]) => (a < b ? -1 : 1)));
      let s = i.series.get(key);
      if (!s) {
        if (i.series.size >= MAX_SERIES) return;
        s = { attributes: { ...attributes }, count: 0, sum: 0, min: value, max: value, buckets: [] };
        s.buckets = new Array<number>(i.bounds.length + 1).fill(0);
        i.series.set(key, s);
      }
      s.count++;
      s.sum += value;
      s.min = Math.min(s.min, value);
      s.max = Math.max(s.max, value);
      if (i.kind === 'histogram') {
        const b = i.bounds.findIndex((x) => value <= x);
        s.buckets[b === -1 ? i.bounds.length : b]++;
      }
    };
    const noop = createNoopMeter();
    return Object.assign(Object.create(noop) as Meter, {
      createHistogram: (n: string, o?: MetricOptions): Histogram => {
        const i = instrument('histogram', n, o);
        return { record: (v: number, a?: Attributes) => record(i, v, a) };
      },
      createCounter: (n: string, o?: MetricOptions): Counter => {
        const i = instrument('counter', n, o);
        return { add: (v: number, a?: Attributes) => record(i, v, a) };
      },
    });
  }

  /** The OTLP/JSON body of everything recorded (ExportMetricsServiceRequest). */
  toOtlpJson(resource: Attributes): unknown {
    const start = nanos(hr(this.startTime));
    const now = nanos(hr(Date.now()));
    return {
      resourceMetrics: [
        {
          resource: { attributes: otlpAttributes(resource) },
          scopeMetrics: [...this.#meters].map(([name, m]) => ({
            scope: { name, ...(m.version ? { version: m.version } : {}) },
            metrics: m.instruments
              .filter((i) => i.series.size > 0)
              .map((i) => {
                const head = { name: i.name, unit: i.unit ?? '', description: i.description ?? '' };
                const points = [...i.series.values()];
                if (i.kind === 'counter')
                  return {
                    ...head,
                    sum: {
                      aggregationTemporality: 2, // cumulative
                      isMonotonic: true,
                      dataPoints: points.map((s) => ({
                        attributes: otlpAttributes(s.attributes),
                        startTimeUnixNano: start,
                        timeUnixNano: now,
                        ...(Number.isInteger(s.sum) ? { asInt: String(s.sum) } : { asDouble: s.sum }),
                      })),
                    },
                  };
                return {
                  ...head,
                  histogram: {
                    aggregationTemporality: 2,
                    dataPoints: points.map((s) => ({
                      attributes: otlpAttributes(s.attributes),
                      startTimeUnixNano: start,
                      timeUnixNano: now,
                      count: String(s.count),
                      sum: s.sum,
                      min: s.min,
                      max: s.max,
                      bucketCounts: s.buckets.map(String),
                      explicitBounds: i.bounds,
                    })),
                  },
                };
              }),
          })),
        },
      ],
    };
  }
}

/** Nanoseconds since the epoch as a decimal string (OTLP/JSON writes 64-bit integers as strings). */
const nanos = (t: HrTime): string => (BigInt(t[0]) * 1_000_000_000n + BigInt(t[1])).toString();

type AnyValue =
  | { stringValue: string }
  | { boolValue: boolean }
  | { intValue: string }
  | { doubleValue: number }
  | { arrayValue: { values: AnyValue[] } };

function anyValue(v: unknown): AnyValue {
  if (typeof v === 'string') return { stringValue: v };
  if (typeof v === 'boolean') return { boolValue: v };
  if (typeof v === 'number') return Number.isInteger(v) ? { intValue: String(v) } : { doubleValue: v };
  if (Array.isArray(v)) return { arrayValue: { values: v.filter((x) => x !== null && x !== undefined).map(anyValue) } };
  return { stringValue: String(v) };
}

function otlpAttributes(a: Attributes | undefined): { key: string; value: AnyValue }[] {
  return Object.entries(a ?? {})
    .filter(([, v]) => v !== undefined && v !== null)
    .map(([key, v]) => ({ key, value: anyValue(v) }));
}

/** The OTLP/JSON body of `spans` (ExportTraceServiceRequest), grouped by instrumentation scope. */
export function spansToOtlpJson(spans: readonly CollectedSpan[], resource: Attributes): unknown {
  const byScope = new Map<string, CollectedSpan[]>();
  for (const s of spans) {
    const list = byScope.get(s.scope);
    if (list) list.push(s);
    else byScope.set(s.scope, [s]);
  }
  return {
    resourceSpans: [
      {
        resource: { attributes: otlpAttributes(resource) },
        scopeSpans: [...byScope].map(([scope, list]) => ({
          scope: { name: scope },
          spans: list.map((s) => ({
            traceId: s.spanContext().traceId,
            spanId: s.spanContext().spanId,
            ...(s.parentSpanContext ? { parentSpanId: s.parentSpanContext.spanId } : {}),
            name: s.name,
            kind: s.kind + 1, // the API's INTERNAL is 0, OTLP's SPAN_KIND_INTERNAL is 1
            startTimeUnixNano: nanos(s.startTime),
            endTimeUnixNano: nanos(s.endTime),
            attributes: otlpAttributes(s.attributes),
            events: s.events.map((e) => ({
              timeUnixNano: nanos(e.time),
              name: e.name,
              attributes: otlpAttributes(e.attributes),
            })),
            droppedEventsCount: s.droppedEvents,
            links: s.links.map((l) => ({
              traceId: l.context.traceId,
              spanId: l.context.spanId,
              attributes: otlpAttributes(l.attributes),
            })),
            status: {
              code: s.status.code, // UNSET 0, OK 1, ERROR 2 in both
              ...(s.status.message ? { message: s.status.message } : {}),
            },
          })),
        })),
      },
    ],
  };
}

/**
 * `OTEL_EXPORTER_OTLP_HEADERS` / `OTEL_EXPORTER_OTLP_<SIGNAL>_HEADERS`: `key=value` pairs,
 * comma-separated, URL-encoded (the OpenTelemetry spec's format). Values are often credentials:
 * they are sent, never printed.
 */
export function otlpHeaders(env: NodeJS.ProcessEnv, signal: 'traces' | 'metrics'): Record<string, string> {
  const out: Record<string, string> = {};
  for (const raw of [env.OTEL_EXPORTER_OTLP_HEADERS, env[`OTEL_EXPORTER_OTLP_${signal.toUpperCase()}_HEADERS`]]) {
    for (const pair of (raw ?? '').split(',')) {
      const eq = pair.indexOf('=');
      if (eq <= 0) continue;
      try {
        const k = decodeURIComponent(pair.slice(0, eq).trim());
        const v = decodeURIComponent(pair.slice(eq + 1).trim());
        if (/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(k)) out[k.toLowerCase()] = v;
      } catch {
        // a pair that is not valid URL encoding is left out
      }
    }
  }
  return out;
}

/**
 * POSTs one OTLP/JSON body to `url` within `timeoutMs`. Rejects with an Error naming the URL and the
 * HTTP status (never the headers, which may hold credentials) when the receiver does not take it.
 */
export async function postOtlpJson(
  url: string,
  body: unknown,
  headers: Record<string, string>,
  timeoutMs = 10_000,
): Promise<void> {
  let target: URL;
  try {
    target = new URL(url);
  } catch {
    throw new Error('OTLP export failed: the endpoint is not a URL');
  }
  const shown = redactedUrl(target);
  const sent: Record<string, string> = { ...headers, 'content-type': 'application/json' };
  if (target.username || target.password) {
    // fetch refuses a URL with credentials: they become Basic authorization, as curl would send them.
    sent.authorization ??= `Basic ${Buffer.from(`${decodeURIComponent(target.username)}:${decodeURIComponent(target.password)}`).toString('base64')}`;
    target.username = '';
    target.password = '';
  }
  let res: Response;
  try {
    res = await fetch(target, {
      method: 'POST',
      headers: sent,
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(timeoutMs),
    });
  } catch (err) {
    const e = err as Error & { cause?: { code?: string; message?: string } };
    // The cause's code (ECONNREFUSED, ENOTFOUND, ...), not its message, which may quote the URL.
    const why = e.name === 'TimeoutError' ? `no answer within ${timeoutMs} ms` : (e.cause?.code ?? e.name);
    throw new Error(`OTLP export to ${shown} failed: ${why}`);
  }
  await res.arrayBuffer().catch(() => undefined); // drain: the connection can be reused or closed
  if (!res.ok) throw new Error(`OTLP export to ${shown} failed: HTTP ${res.status}`);
}
