/**
 * An egress policy's decisions in the trace and the metrics: while the VM runs, the lines its
 * relays (lib/network/relay.ts) and the egress filter in QEMU (native/preload/net_guard.cc: connects,
 * datagrams and DNS questions, each with the rule that decided) append to `egress.log` become `microvm.network.connection`
 * events on a `microvm.network.Egress` span (a child of microvm.Run that lives as long as the VM)
 * and a `microvm.network.connections` count by outcome. The log is ours but read as untrusted:
 * lines are capped in length and checked field by field; at most MAX_EVENTS events, then only the
 * totals grow (`microvm.network.events_dropped` says how many were left out).
 */
import type { Counter, Span } from '@opentelemetry/api';
import { readAppended } from '../file-tail';
import { ATTR, EVENT, SPAN } from '../telemetry/attributes';
import { endSpan, type SpanScope } from '../telemetry/tracer';

const MAX_EVENTS = 128; // the SDK's default event limit per span: beyond it, it would drop the oldest
const MAX_LINE = 4096;
const POLL_MS = 250;

export interface EgressAudit {
  /** Reads what is left, ends the span; the VM has ended. */
  close(): void;
}

interface Entry {
  host: string;
  port: number;
  ok: boolean;
  /** The egress filter's lines (native/preload/net_guard.cc): what was decided, and by which rule. */
  kind?: 'connect' | 'datagram' | 'dns';
  rule?: string;
  error?: string;
  bytesIn?: number;
  bytesOut?: number;
  timeMs: number;
}

function parse(line: string): Entry | undefined {
  if (line.length > MAX_LINE) return undefined;
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(line) as Record<string, unknown>;
  } catch {
    return undefined;
  }
  if (typeof o?.host !== 'string' || o.host.length > 253 || !Number.isInteger(o.port) || typeof o.ok !== 'boolean')
    return undefined;
  const n = (x: unknown): number | undefined =>
    Number.isSafeInteger(x) && (x as number) >= 0 ? (x as number) : undefined;
  const t = typeof o.time === 'string' ? Date.parse(o.time) : NaN;
  return {
    host: o.host,
    port: o.port as number,
    ok: o.ok,
    error: typeof o.error === 'string' ? o.error.slice(0, 64) : undefined,
    kind: o.kind === 'connect' || o.kind === 'datagram' || o.kind === 'dns' ? o.kind : undefined,
    rule: typeof o.rule === 'string' && /^[a-z0-9.[\]-]{1,64}$/.test(o.rule) ? o.rule : undefined,
    bytesIn: n(o.bytesIn),
    bytesOut: n(o.bytesOut),
    timeMs: Number.isFinite(t) ? t : Date.now(),
  };
}

/** Starts following `file` (it may not exist yet). */
export function startEgressAudit(file: string, scope: SpanScope, connections: Counter): EgressAudit {
  const span: Span = scope.tracer.startSpan(SPAN.NETWORK_EGRESS, {}, scope.ctx);
  let offset = 0;
  let rest = '';
  let events = 0;
  let dropped = 0;
  let total = 0;
  let failures = 0;
  const take = (e: Entry): void => {
    total++;
    if (!e.ok) failures++;
    // A relay's line: connected or failed; the filter's: connected, resolved (DNS) or refused.
    const outcome =
      e.kind === undefined
        ? e.ok
          ? 'connected'
          : 'failed'
        : !e.ok
          ? 'refused'
          : e.kind === 'dns'
            ? 'resolved'
            : 'connected';
    connections.add(1, { [ATTR.NETWORK_OUTCOME]: outcome });
    if (events >= MAX_EVENTS) {
      dropped++;
      return;
    }
    events++;
    span.addEvent(
      EVENT.NETWORK_CONNECTION,
      {
        [ATTR.SERVER_ADDRESS]: e.host,
        [ATTR.SERVER_PORT]: e.port,
        [ATTR.NETWORK_OUTCOME]: outcome,
        ...(e.kind ? { [ATTR.NETWORK_KIND]: e.kind } : {}),
        ...(e.rule ? { [ATTR.NETWORK_RULE]: e.rule } : {}),
        ...(e.error ? { [ATTR.ERROR_TYPE]: e.error } : {}),
        ...(e.bytesIn !== undefined ? { [ATTR.NETWORK_BYTES_IN]: e.bytesIn } : {}),
        ...(e.bytesOut !== undefined ? { [ATTR.NETWORK_BYTES_OUT]: e.bytesOut } : {}),
      },
      e.timeMs,
    );
  };
  const read = (): void => {
    offset = readAppended(
      file,
      offset,
      (chunk) => {
        const lines = (rest + chunk.toString('utf8')).split('\n');
        rest = lines.pop() ?? '';
        if (rest.length > MAX_LINE) rest = ''; // an endless line: skipped
        for (const l of lines) {
          const e = parse(l);
          if (e) take(e);
        }
      },
      1 << 20,
    );
  };
  const timer = setInterval(read, POLL_MS);
  timer.unref();
  let closed = false;
  return {
    close(): void {
      if (closed) return;
      closed = true;
      clearInterval(timer);
      read();
      span.setAttributes({
        [ATTR.NETWORK_CONNECTIONS]: total,
        [ATTR.NETWORK_CONNECTION_FAILURES]: failures,
        [ATTR.NETWORK_EVENTS_DROPPED]: dropped,
      });
      endSpan(span);
    },
  };
}
