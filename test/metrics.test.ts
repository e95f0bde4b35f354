/**
 * run()'s metrics (microvm.stage.duration, microvm.runs, microvm.run.failures) read back through
 * the OpenTelemetry metrics SDK, over the libkrun RECORDING ABI TEST DOUBLE (no VM boots).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  AggregationTemporality,
  MeterProvider,
  MetricReader,
  type DataPoint,
  type Histogram,
} from '@opentelemetry/sdk-metrics';
import { libkrunBackend, run, type RunOptions } from '../lib';
import { doubleDir, firmwareDir, scratch } from './helpers';

class TestReader extends MetricReader {
  constructor() {
    super({ aggregationTemporalitySelector: () => AggregationTemporality.CUMULATIVE });
  }
  protected async onForceFlush(): Promise<void> {}
  protected async onShutdown(): Promise<void> {}
}

let s: ReturnType<typeof scratch>;
beforeEach(() => {
  s = scratch('microvm-metrics-');
});
afterEach(() => s.cleanup());

function options(meterProvider: MeterProvider, extra: RunOptions = {}): RunOptions {
  const img = path.join(s.dir, 'image');
  fs.mkdirSync(path.join(img, 'etc'), { recursive: true });
  fs.writeFileSync(path.join(img, 'etc', 'passwd'), 'root:x:0:0:root:/root:/bin/sh\n');
  return {
    rootfsPath: img,
    dataDir: path.join(s.dir, 'data'),
    initOverride: ['/bin/sh', '-c', 'echo hi'],
    preflight: [],
    // This double runs no guest (no KRUN_DOUBLE_RUN_GUEST): nothing would answer as the agent.
    agent: false,
    backend: libkrunBackend({
      runtime: { libDir: doubleDir(), pkgConfig: false, systemDirs: [], loaderSearch: false },
      firmware: { dir: firmwareDir(), systemDirs: [], loaderSearch: false },
      env: { PATH: process.env.PATH },
    }),
    meterProvider,
    ...extra,
  };
}

async function collect(reader: TestReader): Promise<Map<string, DataPoint<unknown>[]>> {
  const { resourceMetrics } = await reader.collect();
  const out = new Map<string, DataPoint<unknown>[]>();
  for (const sm of resourceMetrics.scopeMetrics) for (const m of sm.metrics) out.set(m.descriptor.name, m.dataPoints);
  return out;
}

test('each stage is a microvm.stage.duration point (seconds, stage and backend); runs and failures are counted by outcome and error code', async () => {
  const reader = new TestReader();
  const provider = new MeterProvider({ readers: [reader] });
  const vm = await run('img', options(provider));
  await vm.remove();
  await expect(run('img', options(provider, { rootfsPath: path.join(s.dir, 'nope') }))).rejects.toMatchObject({
    code: 'ERR_MICROVM_ROOTFS_NOT_FOUND',
  });
  const m = await collect(reader);
  const stages = (m.get('microvm.stage.duration') ?? []) as DataPoint<Histogram>[];
  const byStage = new Map(
    stages.map((p) => [`${String(p.attributes['microvm.stage'])}${p.attributes['error.type'] ? ' !' : ''}`, p]),
  );
  for (const st of [
    'microvm.Preflight',
    'microvm.ImagePull',
    'microvm.RootfsClone',
    'microvm.BackendPrepare',
    'microvm.VMSpawn',
    'microvm.PostBoot',
  ]) {
    const p = byStage.get(st);
    // Preflight ran (and passed) in the failed run too: same attributes, one more point.
    expect([st, p?.value.count]).toEqual([st, st === 'microvm.Preflight' ? 2 : 1]);
    expect(p?.attributes['microvm.backend']).toBe('libkrun');
    expect(p?.value.sum).toBeGreaterThanOrEqual(0);
    expect(p?.value.sum).toBeLessThan(60); // seconds, not milliseconds
  }
  // The failed run's ImagePull is its own point, with the error's code.
  expect(byStage.get('microvm.ImagePull !')?.attributes['error.type']).toBe('ERR_MICROVM_ROOTFS_NOT_FOUND');
  const runs = m.get('microvm.runs') ?? [];
  expect(runs.map((p) => [p.attributes['microvm.outcome'], p.value]).sort()).toEqual([
    ['error', 1],
    ['ok', 1],
  ]);
  expect((m.get('microvm.run.failures') ?? []).map((p) => [p.attributes['error.type'], p.value])).toEqual([
    ['ERR_MICROVM_ROOTFS_NOT_FOUND', 1],
  ]);
  await provider.shutdown();
});
