/** `microvm run --otlp URL` exports the spans and metrics over OTLP/HTTP to a receiver in this test. */
import { spawn } from 'node:child_process';
import * as http from 'node:http';
import * as path from 'node:path';
import { packageRoot } from '../lib/native';
import { layoutSkipReason, qemuRunArgs, scratch } from './helpers';

const layout = process.env.MICROVM_TEST_LAYOUT;

(layout ? test : test.skip)(`OTLP export${layout ? '' : ` [skipped: ${layoutSkipReason()}]`}`, async () => {
  const received: { service?: string; spans: string[] }[] = [];
  const metricNames: string[] = [];
  const stagePoints: { stage?: string; accel?: string }[] = [];
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      if (req.url === '/v1/traces' && String(req.headers['content-type']).includes('json')) {
        const body = JSON.parse(Buffer.concat(chunks).toString('utf8')) as {
          resourceSpans: {
            resource: { attributes: { key: string; value: { stringValue?: string } }[] };
            scopeSpans: { spans: { name: string }[] }[];
          }[];
        };
        for (const rs of body.resourceSpans) {
          received.push({
            service: rs.resource.attributes.find((a) => a.key === 'service.name')?.value.stringValue,
            spans: rs.scopeSpans.flatMap((ss) => ss.spans.map((sp) => sp.name)),
          });
        }
      }
      if (req.url === '/v1/metrics' && String(req.headers['content-type']).includes('json')) {
        type Attr = { key: string; value: { stringValue?: string } };
        const body = JSON.parse(Buffer.concat(chunks).toString('utf8')) as {
          resourceMetrics: {
            scopeMetrics: {
              metrics: { name: string; histogram?: { dataPoints: { attributes: Attr[] }[] } }[];
            }[];
          }[];
        };
        for (const rm of body.resourceMetrics)
          for (const sm of rm.scopeMetrics)
            for (const m of sm.metrics) {
              metricNames.push(m.name);
              for (const dp of m.histogram?.dataPoints ?? [])
                stagePoints.push({
                  stage: dp.attributes.find((a) => a.key === 'microvm.stage')?.value.stringValue,
                  accel: dp.attributes.find((a) => a.key === 'microvm.qemu.accel')?.value.stringValue,
                });
            }
      }
      res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as { port: number }).port;
  const s = scratch();
  try {
    const child = await new Promise<{ code: number | null }>((resolve) => {
      const p = spawn(
        process.execPath,
        [
          path.join(packageRoot, 'bin', 'microvm.js'),
          ...qemuRunArgs(layout, s.dir),
          '--rm',
          '--otlp',
          `http://127.0.0.1:${port}`,
          '--',
          '/bin/sh',
          '-c',
          'exit 0',
        ],
        {
          env: {
            ...process.env,
            OTEL_SERVICE_NAME: 'otlp-test',
            MICROVM_LIBKRUNFW_DIR: process.env.MICROVM_TEST_LIBKRUNFW_DIR,
          },
          stdio: 'ignore',
        },
      );
      p.on('exit', (code: number | null) => resolve({ code }));
    });
    expect(child.code).toBe(0);
    const names = received.flatMap((r) => r.spans);
    for (const n of ['microvm.Run', 'microvm.ImagePull', 'microvm.VMSpawn', 'microvm.backend.ResolveFirmware'])
      expect(names).toContain(n);
    expect(received.every((r) => r.service === 'otlp-test')).toBe(true);
    expect(metricNames).toEqual(expect.arrayContaining(['microvm.stage.duration', 'microvm.runs']));
    expect(stagePoints.find((p) => p.stage === 'microvm.VMSpawn')?.accel).toMatch(/^(tcg|kvm)$/);
  } finally {
    s.cleanup();
    server.close();
  }
});
