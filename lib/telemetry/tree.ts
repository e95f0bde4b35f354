/**
 * Renders finished spans as an indented tree with aligned durations — the table from
 * go-microvm's tracing change, produced by the tool:
 *
 *   microvm.Run                      2.315 s
 *     microvm.Preflight              0.004 s
 *     ...
 *     microvm.PostBoot               1.870 s  ◀ largest stage
 *       microvm.SSHWaitReady         1.869 s  probes=9
 */

/** The parts of a finished span the tree needs (structurally compatible with the SDK's ReadableSpan). */
export interface SpanLike {
  name: string;
  spanContext(): { spanId: string };
  parentSpanContext?: { spanId: string } | undefined;
  startTime: [number, number];
  endTime: [number, number];
  attributes: Record<string, unknown>;
  status: { code: number; message?: string };
}

const SHOWN: [string, string][] = [
  ['microvm.image.cache_hit', 'cache_hit'],
  ['microvm.image.layered', 'layered'],
  ['microvm.rootfs.clone_strategy', 'clone'],
  ['microvm.backend', 'backend'],
  ['microvm.qemu.accel', 'accel'],
  ['ssh.probes_total', 'probes'],
  ['preflight.check.name', 'check'],
  ['preflight.check.passed', 'passed'],
];

const seconds = (t: [number, number]): number => t[0] + t[1] / 1e9;

/** One line per span, children under parents in start order; the largest child of the root marked. */
export function formatSpanTree(spans: readonly SpanLike[]): string {
  const ids = new Set(spans.map((s) => s.spanContext().spanId));
  const children = new Map<string | undefined, SpanLike[]>();
  for (const s of spans) {
    const p = s.parentSpanContext?.spanId;
    const key = p && ids.has(p) ? p : undefined;
    const list = children.get(key) ?? [];
    list.push(s);
    children.set(key, list);
  }
  for (const list of children.values()) list.sort((a, b) => seconds(a.startTime) - seconds(b.startTime));
  const rows: { label: string; dur: number; note: string }[] = [];
  const walk = (s: SpanLike, depth: number, largest: SpanLike | undefined): void => {
    const notes = SHOWN.filter(([k]) => s.attributes[k] !== undefined).map(
      ([k, short]) => `${short}=${String(s.attributes[k])}`,
    );
    if (s === largest) notes.unshift('◀ largest stage');
    if (s.status.code === 2) notes.unshift(`ERROR${s.status.message ? `: ${s.status.message.split('\n')[0]}` : ''}`);
    rows.push({
      label: `${'  '.repeat(depth)}${s.name}`,
      dur: seconds(s.endTime) - seconds(s.startTime),
      note: notes.join('  '),
    });
    const kids = children.get(s.spanContext().spanId) ?? [];
    const big =
      depth === 0
        ? kids.reduce<SpanLike | undefined>(
            (m, k) =>
              !m || seconds(k.endTime) - seconds(k.startTime) > seconds(m.endTime) - seconds(m.startTime) ? k : m,
            undefined,
          )
        : undefined;
    for (const k of kids) walk(k, depth + 1, big);
  };
  for (const r of children.get(undefined) ?? []) walk(r, 0, undefined);
  const width = Math.max(0, ...rows.map((r) => r.label.length)) + 2;
  return rows
    .map((r) => `${r.label.padEnd(width)}${r.dur.toFixed(3).padStart(8)} s${r.note ? `  ${r.note}` : ''}`)
    .join('\n');
}
