/**
 * Guest-side spans: the guest init (QEMU backend) reports milestones on its CLOCK_MONOTONIC as
 * "T <name> <ns>" lines; this turns them into spans on the host's clock, joined to microvm.Run.
 *
 * Clock mapping: the init writes "UP" right after its "mounts" milestone; the host notes when it
 * first sees "UP" (inotify on the port's file, and a 10–20 ms poll besides). A guest time g maps
 * to upSeenAt - (mounts - g). The mapped times are late by the delay between the guest's write and
 * the host's read, at most one poll interval (20 ms; typically under 1 ms with inotify), and never
 * early. The host's own spans are on Date.now() (the SDK anchors each there and measures on from
 * it with performance.now()); the guest's are anchored at Date.now() too, once for all of them, so
 * they line up with the host's within Date.now()'s 1 ms resolution. (Epoch times from
 * performance.timeOrigin drift from Date.now() over a process's life.) Guest lines are hostile input: only known names, each once, bounded numbers, in order.
 */
import { EXIT_LINE } from '../guest/protocol';
import { type Attributes, type Span, trace } from '@opentelemetry/api';
import { ATTR, SPAN } from './attributes';
import type { SpanScope } from './tracer';

/** The milestones, in the order the init reaches them. */
export const GUEST_MILESTONES = ['init', 'mounts', 'network', 'config', 'exec'] as const;
export type GuestMilestone = (typeof GUEST_MILESTONES)[number];

/** The span that ends at each milestone (it starts at the one before; the kernel's at 0). */
const SPAN_OF: Record<GuestMilestone, string> = {
  init: SPAN.GUEST_KERNEL,
  mounts: SPAN.GUEST_MOUNTS,
  network: SPAN.GUEST_NETWORK,
  config: SPAN.GUEST_CONFIG,
  exec: SPAN.GUEST_EXEC,
};

/** Upper bound of the mapping error documented above (the slower poll interval), in ms. */
export const GUEST_CLOCK_ERROR_MS = 20;

/** Parses "T <name> <ns>" lines; the first value of each known name wins. */
export function parseMilestones(text: string): Partial<Record<GuestMilestone, number>> {
  const out: Partial<Record<GuestMilestone, number>> = {};
  for (const line of text.slice(0, 8192).split('\n')) {
    const m = line.startsWith(`${EXIT_LINE.milestone} `) ? /^\S+ ([a-z]{1,16}) (\d{1,16})$/.exec(line) : null;
    if (!m || !(GUEST_MILESTONES as readonly string[]).includes(m[1])) continue;
    const name = m[1] as GuestMilestone;
    out[name] ??= Number(m[2]);
  }
  return out;
}

/**
 * Emits microvm.guest.Boot (guest time 0 → the last milestone) and one child per consecutive pair
 * of milestones, under `scope`. `upSeenAt`: performance.now() when "UP" was first read. Returns false
 * (and emits nothing) when the milestones are out of order or the mounts one is missing.
 */
export function emitGuestSpans(
  scope: SpanScope,
  milestones: Partial<Record<GuestMilestone, number>>,
  upSeenAt: number,
  attributes: Attributes = {},
): boolean {
  const mounts = milestones.mounts;
  if (mounts === undefined) return false;
  const seen = GUEST_MILESTONES.filter((n) => milestones[n] !== undefined);
  const values = seen.map((n) => milestones[n] as number);
  if (values.some((x, i) => i > 0 && x < values[i - 1])) return false;
  // One anchor for all of them (the SDK anchors each span of its own at Date.now(), a clock
  // performance.timeOrigin drifts from). Epoch milliseconds: the SDK takes them as they are.
  const anchor = Date.now() - performance.now();
  const at = (ns: number): number => anchor + upSeenAt - (mounts - ns) / 1e6;
  const last = values[values.length - 1];
  const boot: Span = scope.tracer.startSpan(
    SPAN.GUEST_BOOT,
    {
      startTime: at(0),
      attributes: {
        ...attributes,
        [ATTR.GUEST_UPTIME_MS]: last / 1e6,
        [ATTR.GUEST_CLOCK_ERROR_MS]: GUEST_CLOCK_ERROR_MS,
        [ATTR.GUEST_MILESTONES]: seen.join(','),
      },
    },
    scope.ctx,
  );
  const ctx = { tracer: scope.tracer, ctx: trace.setSpan(scope.ctx, boot) };
  let prev = 0;
  for (const name of GUEST_MILESTONES) {
    const ns = milestones[name];
    if (ns === undefined) continue;
    const sp = ctx.tracer.startSpan(SPAN_OF[name], { startTime: at(prev) }, ctx.ctx);
    sp.end(at(ns));
    prev = ns;
  }
  boot.end(at(last));
  return true;
}
