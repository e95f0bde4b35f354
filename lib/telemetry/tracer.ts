/**
 * Tracing helpers. The library depends only on @opentelemetry/api: with no provider registered
 * every call is a no-op costing nanoseconds. Parent links are passed explicitly (a Context argument),
 * so spans nest correctly even when the application registered no context manager.
 */
import {
  type Attributes,
  type Context,
  context,
  type Span,
  SpanStatusCode,
  isSpanContextValid,
  trace,
  type Tracer,
  type TracerProvider,
} from '@opentelemetry/api';
import { ATTR } from './attributes';

// eslint-disable-next-line @typescript-eslint/no-require-imports
const pkg = require('../../package.json') as { name: string; version: string };

const tracers = new WeakMap<TracerProvider, Tracer>();

/**
 * The tracer: from `provider` or the global one, named by this package and its version. Kept per
 * provider (an SDK provider's getTracer costs tens of µs; a run asks a few times).
 */
export function getTracer(provider?: TracerProvider): Tracer {
  const p = provider ?? trace.getTracerProvider();
  let t = tracers.get(p);
  if (!t) {
    t = p.getTracer(pkg.name, pkg.version);
    tracers.set(p, t);
  }
  return t;
}

/**
 * `TRACEPARENT`/`TRACESTATE` (W3C) entries naming `span` as the parent, for a process in the guest
 * to continue the trace; none for a no-op span.
 */
export function traceEnv(span: Span): string[] {
  const sc = span.spanContext();
  if (!isSpanContextValid(sc)) return [];
  const flags = sc.traceFlags.toString(16).padStart(2, '0');
  const env = [`TRACEPARENT=00-${sc.traceId}-${sc.spanId}-${flags}`];
  const state = sc.traceState?.serialize();
  if (state) env.push(`TRACESTATE=${state}`);
  return env;
}

/** Ends `span`; with an error: status ERROR with the message, `error.type`, and the exception. */
export function endSpan(span: Span, err?: unknown): void {
  if (err !== undefined) {
    const e =
      err instanceof Error ? err : new Error(typeof err === 'string' ? err : (JSON.stringify(err) ?? 'undefined'));
    const type = (e as { code?: unknown }).code;
    span.setStatus({ code: SpanStatusCode.ERROR, message: e.message });
    span.setAttribute(ATTR.ERROR_TYPE, typeof type === 'string' ? type : e.name);
    span.recordException(e);
  }
  span.end();
}

/** Where a child span goes: a tracer and the parent context. */
export interface SpanScope {
  tracer: Tracer;
  ctx: Context;
}

/**
 * Runs `fn` inside a child span of `scope`. The span ends when `fn` settles; a rejection marks it
 * ERROR and is re-thrown. `fn` gets the span and a scope for its own children.
 */
export async function inSpan<T>(
  scope: SpanScope,
  name: string,
  attributes: Attributes | undefined,
  fn: (span: Span, scope: SpanScope) => Promise<T> | T,
): Promise<T> {
  const span = scope.tracer.startSpan(name, { attributes }, scope.ctx);
  const child: SpanScope = { tracer: scope.tracer, ctx: trace.setSpan(scope.ctx, span) };
  try {
    const result = await context.with(child.ctx, () => fn(span, child));
    endSpan(span);
    return result;
  } catch (err) {
    endSpan(span, err);
    throw err;
  }
}
