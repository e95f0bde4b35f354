/** `microvm run`: its options, turned into run()'s, and what it prints and exits with. */

import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  type CollectedSpan,
  CollectingMeterProvider,
  CollectingTracerProvider,
  otlpHeaders,
  postOtlpJson,
  spansToOtlpJson,
} from '../telemetry/collector';
import { chooseBackend, run, type RunOptions } from '../run';
import type { Backend } from '../backends/types';
import { defaultDataRoot } from '../paths';
import { parsePullPolicy, type PullPolicy } from '../image/pull';
import { IDLE_COMMAND } from '../backends/guest-init';
import { libkrunBackend } from '../backends/libkrun';
import { qemuBackend } from '../backends/qemu';
import { parseEgress } from '../network/egress';
import { readAppended } from '../file-tail';
import { type AccelChoice, parseAccel } from '../host/kvm';
import { describeExit, type MicroVM } from '../vm';
import { formatSpanTree } from '../telemetry/tree';
import { attach, terminalSize } from './agent-commands';
import { type CommandContext, UsageError, signalNumber, parseStrict, spansJson } from './common';

/** `--allow-host`/`--deny-host`: HOST, *.HOST, HOST:PORT[/udp] or HOST:PORT=ADDRESS. */
function hostRule(flag: string, spec: string): Record<string, unknown> {
  const m = /^([^:=\s/]+)(?::(\d{1,5})(?:\/(tcp|udp))?)?(?:=(.+))?$/.exec(spec);
  if (!m)
    throw new UsageError(
      `--${flag} takes HOST, *.HOST, HOST:PORT[/udp] or HOST:PORT=ADDRESS, not ${JSON.stringify(spec)}`,
    );
  return {
    host: m[1],
    ...(m[2] ? { port: Number(m[2]) } : {}),
    ...(m[3] ? { protocol: m[3] } : {}),
    ...(m[4] ? { address: m[4] } : {}),
  };
}

/** `--allow-cidr`/`--deny-cidr`: CIDR, CIDR:PORT[/udp] (IPv4), or [CIDR]:PORT[/udp] (IPv6). */
function cidrRule(flag: string, spec: string): Record<string, unknown> {
  const m = /^(?:\[([^\]]+)\]|([^:\s[\]]+))(?::(\d{1,5})(?:\/(tcp|udp))?)?$/.exec(spec);
  const cidr = m?.[1] ?? m?.[2] ?? (/^[0-9a-fA-F:./]+$/.test(spec) && spec.includes(':') ? spec : undefined);
  if (!cidr)
    throw new UsageError(
      `--${flag} takes CIDR, CIDR:PORT[/udp] or [IPV6-CIDR]:PORT[/udp], not ${JSON.stringify(spec)}`,
    );
  const bareV6 = !m || (m[2] === undefined && m[1] === undefined);
  return {
    cidr,
    ...(!bareV6 && m?.[3] ? { port: Number(m[3]) } : {}),
    ...(!bareV6 && m?.[4] ? { protocol: m[4] } : {}),
  };
}

/**
 * For --detach: the VM must not die with this CLI process, so the backend is made here, with the
 * accelerator when the choice takes one (`accelTaken`: run() must not get it again).
 */
async function detachedBackend(
  choice: string,
  accel: AccelChoice | undefined,
  dataRoot: string,
): Promise<{ backend: Backend; accelTaken: boolean }> {
  // [make it, whether it took the accelerator]
  const factories: Record<string, [() => Promise<Backend> | Backend, boolean]> = {
    qemu: [() => qemuBackend({ accel }), true],
    libkrun: [() => libkrunBackend(), false],
    auto: [() => chooseBackend({ accel, dataRoot }), true],
  };
  const factory = Object.hasOwn(factories, choice) ? factories[choice] : undefined;
  if (!factory) throw new UsageError(`--backend takes auto, libkrun or qemu, not ${JSON.stringify(choice)}`);
  const b = await factory[0]();
  return { backend: b.detached?.() ?? b, accelTaken: factory[1] };
}

/** A console stream with CRLF made LF (a CR held back until the next chunk shows what follows). */
function crlfToLf(sink: (buf: Buffer) => void): { write: (buf: Buffer) => void; end: () => void } {
  let held = false;
  return {
    write(buf) {
      let text = (held ? '\r' : '') + buf.toString('latin1');
      held = text.endsWith('\r');
      if (held) text = text.slice(0, -1);
      sink(Buffer.from(text.replace(/\r\n/g, '\n'), 'latin1'));
    },
    end() {
      if (held) sink(Buffer.from('\r'));
      held = false;
    },
  };
}

export async function cmdRun(c: CommandContext): Promise<number> {
  const { args: argv, out } = c;
  const dash = argv.indexOf('--');
  const cmd = dash >= 0 ? argv.slice(dash + 1) : [];
  const { values, positionals } = parseStrict({
    args: dash >= 0 ? argv.slice(0, dash) : argv,
    allowPositionals: true,
    options: {
      name: { type: 'string' },
      cpus: { type: 'string' },
      memory: { type: 'string' },
      p: { type: 'string', short: 'p', multiple: true },
      e: { type: 'string', short: 'e', multiple: true },
      v: { type: 'string', short: 'v', multiple: true },
      backend: { type: 'string' },
      'data-dir': { type: 'string' },
      rm: { type: 'boolean' },
      ssh: { type: 'boolean' },
      detach: { type: 'boolean', short: 'd' },
      idle: { type: 'boolean' },
      interactive: { type: 'boolean', short: 'i' },
      tty: { type: 'boolean', short: 't' },
      trace: { type: 'boolean' },
      'trace-json': { type: 'string' },
      'log-level': { type: 'string' },
      otlp: { type: 'string' },
      json: { type: 'boolean' },
      accel: { type: 'string' },
      'boot-timeout': { type: 'string' },
      'log-max-bytes': { type: 'string' },
      pull: { type: 'string' },
      egress: { type: 'string' },
      'allow-host': { type: 'string', multiple: true },
      'allow-cidr': { type: 'string', multiple: true },
      'deny-host': { type: 'string', multiple: true },
      'deny-cidr': { type: 'string', multiple: true },
      dns: { type: 'string' },
    },
  });
  if (positionals.length !== 1) throw new UsageError('run takes one IMAGE (then -- CMD...)');
  if (values.egress !== undefined && values.egress !== 'allow' && values.egress !== 'deny')
    throw new UsageError(`--egress takes allow or deny, not ${JSON.stringify(values.egress)}`);
  let egress: RunOptions['egress'] = values.egress;
  const ruleFlags = ['allow-host', 'allow-cidr', 'deny-host', 'deny-cidr'] as const;
  if (ruleFlags.some((f) => values[f]?.length) || values.dns !== undefined) {
    const hasAllow = Boolean(values['allow-host']?.length || values['allow-cidr']?.length);
    if (values.egress === 'deny' || (values.egress === 'allow' && hasAllow))
      throw new UsageError(`--egress ${values.egress} and rules: drop --egress (allow rules make an allow-list)`);
    const policy: { allow?: unknown[]; deny?: unknown[]; dns?: string } = {};
    if (hasAllow) policy.allow = [];
    if (values['deny-host']?.length || values['deny-cidr']?.length) policy.deny = [];
    for (const flag of ruleFlags) {
      const verdict = flag.startsWith('allow') ? 'allow' : 'deny';
      for (const spec of values[flag] ?? []) {
        const rule = flag.endsWith('host') ? hostRule(flag, spec) : cidrRule(flag, spec);
        (policy[verdict] as unknown[]).push(rule);
      }
    }
    if (values.dns !== undefined) policy.dns = values.dns;
    try {
      egress = parseEgress(policy);
    } catch (err) {
      // Rules are numbered as given, --allow-host before --allow-cidr (egress.allow[0] is the first).
      throw new UsageError(`egress rules: ${(err as Error).message}`);
    }
  }
  // -i/-t: the VM idles and CMD (default /bin/sh) runs through its agent, attached to this terminal.
  const attached = values.interactive === true || values.tty === true;
  if (attached && values.detach) throw new UsageError('-i/-t attach to the VM; -d detaches: use one');
  if (values.idle && !attached && cmd.length)
    throw new UsageError('--idle runs no command of its own: drop -- CMD (use microvm exec NAME -- CMD)');
  let pullPolicy: PullPolicy | undefined;
  try {
    pullPolicy = values.pull === undefined ? undefined : parsePullPolicy('--pull', values.pull);
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  let accel: AccelChoice | undefined;
  try {
    accel = values.accel === undefined ? undefined : parseAccel('--accel', values.accel);
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const dataRoot = values['data-dir'] ? path.resolve(values['data-dir']) : defaultDataRoot();
  // Spans and metrics are kept in memory (the tree, --trace-json) and, with an OTLP endpoint,
  // exported once when the command ends (lib/telemetry/collector.ts says why not the SDK).
  const tracerProvider = new CollectingTracerProvider();
  // --otlp BASE, else the signal's own OTEL_EXPORTER_OTLP_*_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT.
  const otlpUrl = (signal: 'traces' | 'metrics'): string | undefined => {
    const base = values.otlp ?? process.env.OTEL_EXPORTER_OTLP_ENDPOINT;
    const own = values.otlp ? undefined : process.env[`OTEL_EXPORTER_OTLP_${signal.toUpperCase()}_ENDPOINT`];
    return own ?? (base ? `${base.replace(/\/+$/, '')}/v1/${signal}` : undefined);
  };
  const tracesUrl = otlpUrl('traces');
  const metricsUrl = otlpUrl('metrics');
  // Metrics (microvm.stage.duration, microvm.runs, microvm.run.failures) go where the spans go.
  const meterProvider = metricsUrl ? new CollectingMeterProvider() : undefined;
  const resource = { 'service.name': process.env.OTEL_SERVICE_NAME ?? 'microvm' };
  let exported = false;
  const flush = async (): Promise<void> => {
    if (exported) return;
    exported = true;
    const sends: Promise<void>[] = [];
    if (tracesUrl && tracerProvider.finishedSpans().length > 0)
      sends.push(
        postOtlpJson(
          tracesUrl,
          spansToOtlpJson(tracerProvider.finishedSpans(), resource),
          otlpHeaders(process.env, 'traces'),
        ),
      );
    if (metricsUrl && meterProvider)
      sends.push(postOtlpJson(metricsUrl, meterProvider.toOtlpJson(resource), otlpHeaders(process.env, 'metrics')));
    for (const r of await Promise.allSettled(sends))
      if (r.status === 'rejected')
        process.stderr.write(`microvm: exporting telemetry failed: ${(r.reason as Error).message}\n`);
  };
  const num = (name: string, v: string | undefined): number | undefined => {
    if (v === undefined) return undefined;
    if (!/^\d+$/.test(v)) throw new UsageError(`--${name} takes a whole number, not ${JSON.stringify(v)}`);
    return Number(v);
  };
  const detached = values.detach ? await detachedBackend(values.backend ?? 'auto', accel, dataRoot) : undefined;
  const backend: RunOptions['backend'] =
    detached?.backend ?? (attached ? 'qemu' : ((values.backend ?? 'auto') as RunOptions['backend']));
  const opts: RunOptions = {
    name: values.name,
    cpus: num('cpus', values.cpus),
    memoryMiB: num('memory', values.memory),
    ports: (values.p ?? []).map((s) => {
      const m = /^(?:(\d+):)?(\d+)$/.exec(s);
      if (!m) throw new UsageError(`-p takes [HOST:]GUEST, not ${JSON.stringify(s)}`);
      return { host: m[1] === undefined ? 0 : Number(m[1]), guest: Number(m[2]) };
    }),
    env: values.e ?? [],
    virtiofs: (values.v ?? []).map((spec, i) => {
      const m = /^([^:]+):(\/[^:]*)(?::(ro|rw))?$/.exec(spec);
      if (!m) throw new UsageError(`-v takes HOST:GUEST[:ro], not ${JSON.stringify(spec)}`);
      return { tag: `vol${i}`, hostPath: path.resolve(m[1]), guestPath: m[2], readOnly: m[3] === 'ro' };
    }),
    backend,
    // A detached backend was made with the accelerator already (libkrun takes none: run() gets it
    // and refuses it with the reason).
    accel: detached?.accelTaken ? undefined : accel,
    timeouts: values['boot-timeout'] === undefined ? undefined : { boot: num('boot-timeout', values['boot-timeout']) },
    logMaxBytes: values['log-max-bytes'] === undefined ? undefined : num('log-max-bytes', values['log-max-bytes']),
    dataDir: values['data-dir'] ? path.resolve(values['data-dir']) : undefined,
    initOverride: attached ? [...IDLE_COMMAND] : values.idle ? undefined : cmd.length ? cmd : undefined,
    idle: !attached && values.idle === true ? true : undefined,
    ssh: values.ssh ? {} : undefined,
    egress,
    logLevel: values['log-level'] as RunOptions['logLevel'],
    tracerProvider,
    meterProvider,
    autoRemove: values.rm === true,
    pull: pullPolicy,
  };
  // Ctrl-C / SIGTERM: abort the start, or stop the running VM; then exit 128+N (never 0).
  const ac = new AbortController();
  let interrupted: NodeJS.Signals | undefined;
  let vm: MicroVM | undefined;
  const onSignal = (sig: NodeJS.Signals): void => {
    interrupted ??= sig;
    ac.abort();
    void vm?.stop();
  };
  const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
  for (const sig of signals) process.on(sig, onSignal);
  const unlisten = (): void => {
    for (const sig of signals) process.removeListener(sig, onSignal);
  };
  opts.signal = ac.signal;
  let finished: readonly CollectedSpan[] = [];
  const emitTrace = async (): Promise<void> => {
    const spans = (finished = [...tracerProvider.finishedSpans()]);
    await flush();
    if (values.trace) process.stderr.write(`${formatSpanTree(spans)}\n`);
    if (values['trace-json']) fs.writeFileSync(values['trace-json'], `${JSON.stringify(spansJson(spans), null, 2)}\n`);
  };
  try {
    vm = await run(positionals[0], opts);
  } catch (err) {
    unlisten();
    await emitTrace();
    if (interrupted) {
      process.stderr.write(`microvm: interrupted by ${interrupted} while starting; nothing is left running\n`);
      return 128 + signalNumber(interrupted);
    }
    throw err;
  }
  if (values.detach) {
    unlisten();
    vm.ssh?.close(); // the readiness connection would keep this process alive
    await emitTrace();
    out({ name: vm.name, id: vm.id, pid: vm.pid, backend: vm.backend, dataDir: vm.dataDir, ports: vm.ports }, vm.name);
    return 0;
  }
  if (interrupted) void vm.stop(); // the signal came as run() resolved
  if (attached) {
    unlisten(); // attach() forwards signals to the guest command now
    const session = vm;
    let code = 1;
    try {
      const proc = await session.spawn(cmd.length ? cmd : ['/bin/sh'], {
        tty: values.tty ? terminalSize() : undefined,
        stdin: values.interactive === true,
      });
      code = await attach(proc, { stdin: values.interactive === true, tty: values.tty === true });
    } finally {
      await session.stop();
      await emitTrace();
      if (values.rm) await session.remove();
    }
    return code;
  }
  // Stream the guest command's output while it runs: its stdout to ours, its stderr to ours (QEMU
  // keeps them apart from the console); with libkrun both are on the console.
  const started = vm;
  const streams: { file: string; offset: number; write: (b: Buffer) => void; end?: () => void }[] = [];
  if (!values.json) {
    if (started.stdoutPath && started.stderrPath) {
      streams.push({ file: started.stdoutPath, offset: 0, write: (b) => process.stdout.write(b) });
      streams.push({ file: started.stderrPath, offset: 0, write: (b) => process.stderr.write(b) });
    } else {
      const conv = crlfToLf((b) => process.stdout.write(b));
      streams.push({ file: started.consoleLogPath, offset: 0, write: conv.write, end: conv.end });
    }
  }
  const pump = (): void => {
    for (const st of streams) st.offset = readAppended(st.file, st.offset, st.write);
  };
  const timer = setInterval(pump, 50);
  const exit = await started.wait();
  clearInterval(timer);
  pump();
  for (const st of streams) st.end?.();
  unlisten();
  await emitTrace();
  const read = (file: string | undefined): string =>
    values.json && file && fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
  const captured = {
    stdout: read(started.stdoutPath),
    stderr: read(started.stderrPath),
    console: read(started.consoleLogPath),
  };
  // Output the host did not keep: cut at the limit (said), or lost to a full disk (an error).
  const cut = Object.entries(started.outputStatus() ?? {}).filter(
    ([k, st]) => ['stdout', 'stderr', 'console'].includes(k) && st.state !== 'ok',
  );
  for (const [k, st] of cut)
    process.stderr.write(
      st.state === 'lost'
        ? `microvm: [ERR_MICROVM_NO_SPACE] the guest's ${k} was cut after ${st.bytes} bytes: the disk of ${started.dataDir} is full (${st.discardedBytes} bytes lost)\n`
        : `microvm: the guest's ${k} reached its limit (--log-max-bytes, ${st.bytes} bytes kept); ${st.discardedBytes} bytes were discarded\n`,
    );
  const lost = cut.some(([, st]) => st.state === 'lost');
  if (values.rm) await started.remove();
  let code: number;
  if (exit.reason === 'exited') code = lost && exit.exitCode === 0 ? 1 : exit.exitCode;
  else if (interrupted) code = 128 + signalNumber(interrupted);
  else if (exit.reason === 'stopped') code = 128 + signalNumber(exit.signal);
  else code = 1;
  if (values.json) {
    out(
      {
        name: started.name,
        backend: started.backend,
        reason: exit.reason,
        exitCode: exit.exitCode,
        signal: exit.signal,
        interruptedBy: interrupted ?? null,
        error: exit.error ? { code: exit.error.code, message: exit.error.message } : null,
        ...captured,
        spans: spansJson(finished),
      },
      '',
    );
  } else if (exit.reason === 'failed') {
    process.stderr.write(`microvm: [${exit.error.code}] ${exit.error.message}\n`);
  } else if (exit.reason === 'stopped' && !interrupted) {
    process.stderr.write(`microvm: ${describeExit(exit)}\n`);
  }
  return code;
}
