/**
 * The flight recorder: a failed run() leaves `<dataRoot>/failed/<name>-<time>/` with what explains
 * it, although the VM's own directory is removed:
 *   spans.json   every span of the run (name, parent, times, attributes, events, status), recorded
 *                whether or not the caller registered a tracer provider;
 *   error.json   the error's code, message and stack;
 *   console.log, vm.log, stdout.log, stderr.log   the last 64 KiB of each the VM wrote;
 *   record.json  the VM's name, id, backend, image, and the data dir.
 * Spans never carry secrets (docs/telemetry.md), the run's environment and credentials are not
 * written, files are 0600 in a 0700 directory. The newest `keep` records are kept.
 *
 * The recorder is a Tracer that wraps the real one (a no-op one without a provider): each span it
 * starts is the real span plus a plain record of what was set on it. Children are started from a
 * context holding the wrapper, whose span context is the real span's, so the real tree is intact.
 */
import { VM_FILE } from '../vm-dir';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  type Attributes,
  type AttributeValue,
  type Context,
  type Exception,
  type Link,
  type Span,
  type SpanContext,
  type SpanOptions,
  type SpanStatus,
  type TimeInput,
  trace,
  type Tracer,
} from '@opentelemetry/api';
import { readTail } from '../file-tail';

/** What the recorder keeps of one span. */
export interface RecordedSpan {
  name: string;
  spanId: string;
  parentSpanId?: string;
  startMs: number;
  endMs?: number;
  attributes: Attributes;
  events: { name: string; timeMs: number; attributes?: Attributes }[];
  status?: SpanStatus;
}

/** Bounds: a run has a few dozen spans; a hostile or broken caller cannot grow this without limit. */
const MAX_SPANS = 2000;
const MAX_EVENTS = 200;

const toMs = (t: TimeInput | undefined): number => {
  if (t === undefined) return performance.timeOrigin + performance.now();
  if (typeof t === 'number') return t < 1e12 ? performance.timeOrigin + t : t; // performance.now() or epoch ms
  if (t instanceof Date) return t.getTime();
  return t[0] * 1e3 + t[1] / 1e6;
};

let localIds = 0;

class RecordingSpan implements Span {
  constructor(
    readonly inner: Span,
    readonly rec: RecordedSpan,
  ) {}
  spanContext(): SpanContext {
    return this.inner.spanContext();
  }
  setAttribute(key: string, value: AttributeValue): this {
    this.rec.attributes[key] = value;
    this.inner.setAttribute(key, value);
    return this;
  }
  setAttributes(attributes: Attributes): this {
    Object.assign(this.rec.attributes, attributes);
    this.inner.setAttributes(attributes);
    return this;
  }
  addEvent(name: string, attributesOrStartTime?: Attributes | TimeInput, startTime?: TimeInput): this {
    const attrs =
      attributesOrStartTime !== undefined &&
      typeof attributesOrStartTime === 'object' &&
      !Array.isArray(attributesOrStartTime) &&
      !(attributesOrStartTime instanceof Date)
        ? attributesOrStartTime
        : undefined;
    if (this.rec.events.length < MAX_EVENTS)
      this.rec.events.push({
        name,
        timeMs: toMs(attrs ? startTime : (attributesOrStartTime as TimeInput)),
        attributes: attrs,
      });
    this.inner.addEvent(name, attributesOrStartTime, startTime);
    return this;
  }
  addLink(link: Link): this {
    this.inner.addLink(link);
    return this;
  }
  addLinks(links: Link[]): this {
    this.inner.addLinks(links);
    return this;
  }
  setStatus(status: SpanStatus): this {
    this.rec.status = status;
    this.inner.setStatus(status);
    return this;
  }
  updateName(name: string): this {
    this.rec.name = name;
    this.inner.updateName(name);
    return this;
  }
  end(endTime?: TimeInput): void {
    this.rec.endMs = toMs(endTime);
    this.inner.end(endTime);
  }
  isRecording(): boolean {
    return this.inner.isRecording();
  }
  recordException(exception: Exception, time?: TimeInput): void {
    this.inner.recordException(exception, time);
  }
}

/** A Tracer that records every span it starts (see the module comment). */
export class RecordingTracer implements Tracer {
  readonly spans: RecordedSpan[] = [];
  readonly #ids = new WeakMap<Span, string>();

  constructor(readonly inner: Tracer) {}

  startSpan(name: string, options?: SpanOptions, ctx?: Context): Span {
    const span = this.inner.startSpan(name, options, ctx);
    const parent = ctx ? trace.getSpan(ctx) : undefined;
    const rec: RecordedSpan = {
      name,
      // The no-op tracer's spans share an all-zero id: number them here instead.
      spanId: trace.isSpanContextValid(span.spanContext()) ? span.spanContext().spanId : `local-${++localIds}`,
      parentSpanId: parent ? (this.#ids.get(parent) ?? parent.spanContext().spanId) : undefined,
      startMs: toMs(options?.startTime),
      attributes: { ...(options?.attributes ?? {}) },
      events: [],
    };
    const wrapped = new RecordingSpan(span, rec);
    this.#ids.set(wrapped, rec.spanId);
    if (this.spans.length < MAX_SPANS) this.spans.push(rec);
    return wrapped;
  }

  startActiveSpan<F extends (span: Span) => unknown>(name: string, ...args: unknown[]): ReturnType<F> {
    const fn = args[args.length - 1] as F;
    const options = (args.length > 1 ? args[0] : undefined) as SpanOptions | undefined;
    const ctx = (args.length > 2 ? args[1] : undefined) as Context | undefined;
    const span = this.startSpan(name, options, ctx);
    return fn(span) as ReturnType<F>;
  }
}

/** Keeps at most this many bytes of each log. */
const TAIL_BYTES = 64 * 1024;

/** What the flight record says about the run. */
export interface FlightRecordInput {
  dataRoot: string;
  name: string;
  id: string;
  backend: string;
  image: string;
  vmDir: string;
  error: unknown;
  spans: readonly RecordedSpan[];
  keep: number;
}

/**
 * Writes the record; returns its directory, or why it could not be written (a full disk, say): a
 * failing recorder never hides the run's own error, and leaves no half-written record behind.
 */
export function writeFlightRecord(r: FlightRecordInput): { dir: string } | { skipped: string } {
  let made: string | undefined;
  try {
    const base = path.join(r.dataRoot, 'failed');
    fs.mkdirSync(base, { recursive: true, mode: 0o700 });
    const stamp = new Date().toISOString().replace(/[:.]/g, '-');
    const dir = path.join(base, `${r.name}-${stamp}`);
    fs.mkdirSync(dir, { mode: 0o700 });
    made = dir;
    const write = (file: string, data: string | Buffer): void =>
      fs.writeFileSync(path.join(dir, file), data, { mode: 0o600, flag: 'wx' });
    const e = r.error as { code?: unknown; message?: unknown; stack?: unknown; name?: unknown };
    write(
      'error.json',
      `${JSON.stringify({ code: e?.code ?? null, name: e?.name ?? null, message: typeof e?.message === 'string' ? e.message : (JSON.stringify(r.error) ?? null), stack: e?.stack ?? null }, null, 2)}\n`,
    );
    write('spans.json', `${JSON.stringify(r.spans, null, 2)}\n`);
    write(
      'record.json',
      `${JSON.stringify({ name: r.name, id: r.id, backend: r.backend, image: r.image, vmDir: r.vmDir, at: new Date().toISOString() }, null, 2)}\n`,
    );
    for (const f of [VM_FILE.console, VM_FILE.vmm, VM_FILE.stdout, VM_FILE.stderr]) {
      const t = readTail(path.join(r.vmDir, f), TAIL_BYTES);
      if (t) write(f, t);
    }
    // The newest `keep` records stay (names sort by time within a VM name; order by mtime overall).
    const all = fs
      .readdirSync(base)
      .map((n) => ({ n, t: fs.statSync(path.join(base, n)).mtimeMs }))
      .sort((a, b) => b.t - a.t || (a.n < b.n ? 1 : -1));
    for (const old of all.slice(r.keep)) fs.rmSync(path.join(base, old.n), { recursive: true, force: true });
    return fs.existsSync(dir) ? { dir } : { skipped: 'it was removed at once (flightRecorder.keep)' };
  } catch (err) {
    if (made) fs.rmSync(made, { recursive: true, force: true });
    const code = (err as NodeJS.ErrnoException).code;
    return {
      skipped: code === 'ENOSPC' || code === 'EDQUOT' ? `the disk is full (${code})` : (code ?? (err as Error).message),
    };
  }
}
