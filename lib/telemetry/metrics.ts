/**
 * Metrics of run(): a histogram of each pipeline stage's duration and counters of runs and
 * failures, from `run({ meterProvider })` or the global one (no-op unless an application
 * registered one, like tracing). Instrument names and attribute keys are in docs/telemetry.md.
 */
import { type Attributes, type Counter, type Histogram, type MeterProvider, metrics } from '@opentelemetry/api';
// eslint-disable-next-line @typescript-eslint/no-require-imports
const pkg = require('../../package.json') as { name: string; version: string };

export const METRIC = {
  /** Seconds each pipeline stage took (attributes: microvm.stage, microvm.backend, microvm.image.cache_hit where known, error.type on failure). */
  STAGE_DURATION: 'microvm.stage.duration',
  /** run() calls that ended (attributes: microvm.backend, microvm.outcome ok|error). */
  RUNS: 'microvm.runs',
  /** run() calls that failed (attributes: microvm.backend, error.type: the error's code). */
  FAILURES: 'microvm.run.failures',
  /** Connections an egress allow-list's relays made (attribute: microvm.network.outcome connected|failed). */
  CONNECTIONS: 'microvm.network.connections',
} as const;

/** The instruments one run() records to. */
export interface RunMetrics {
  stage: Histogram;
  runs: Counter;
  failures: Counter;
  connections: Counter;
}

export function runMetrics(provider?: MeterProvider): RunMetrics {
  const meter = (provider ?? metrics.getMeterProvider()).getMeter(pkg.name, pkg.version);
  return {
    stage: meter.createHistogram(METRIC.STAGE_DURATION, {
      unit: 's',
      description: 'Duration of one stage of run() (the span of the same name)',
    }),
    runs: meter.createCounter(METRIC.RUNS, { unit: '{run}', description: 'run() calls that ended' }),
    failures: meter.createCounter(METRIC.FAILURES, { unit: '{run}', description: 'run() calls that failed' }),
    connections: meter.createCounter(METRIC.CONNECTIONS, {
      unit: '{connection}',
      description: "Connections an egress allow-list's relays made or tried",
    }),
  };
}

/** The `error.type` of a failure: its code, else its class name. */
export function errorType(err: unknown): string {
  const code = (err as { code?: unknown } | undefined)?.code;
  if (typeof code === 'string' && code) return code;
  return err instanceof Error ? err.name : 'Error';
}

/** Records one stage that took `seconds`. */
export function recordStage(
  m: RunMetrics,
  stage: string,
  seconds: number,
  attributes: Attributes,
  err?: unknown,
): void {
  m.stage.record(seconds, {
    'microvm.stage': stage,
    ...attributes,
    ...(err === undefined ? {} : { 'error.type': errorType(err) }),
  });
}
