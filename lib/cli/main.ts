/**
 * The `microvm` command line. Exit codes: the guest command's own code for `run -- CMD` (and for
 * `exec`); otherwise 0 success, 1 failure (the message carries the error code), 2 usage error.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { BasicTracerProvider, BatchSpanProcessor, InMemorySpanExporter, type ReadableSpan, SimpleSpanProcessor, type SpanProcessor } from '@opentelemetry/sdk-trace-base';
import { chooseBackend, defaultDataRoot, run, type RunOptions } from '../run';
import { gc, list, purge } from '../image/cache';
import { pull } from '../image/pull';
import { diskSpaceCheck, kvmCheck, type PreflightCheck, probeCheck, userNamespacesCheck } from '../preflight/checks';
import { qemuBackend, resolveQemuRuntime } from '../backends/qemu';
import { resolveFirmware, FIRMWARE_INSTALL_HINT } from '../resolve/firmware';
import { LIBKRUN_INSTALL_HINT, resolveRuntime } from '../resolve/runtime';
import { isRecordedProcess, readState, terminateRecorded } from '../state';
import { SshClient } from '../ssh/client';
import { formatSpanTree } from '../telemetry/tree';

const USAGE: Record<string, string> = {
  '': `microvm — boot OCI images as lightweight VMs

Usage: microvm <command> [options]

Commands:
  run IMAGE [-- CMD...]   boot IMAGE (optionally running CMD as its init) and wait for it
  pull IMAGE              pull IMAGE into the cache
  images                  list cached images
  cache gc|purge          remove unreferenced entries / everything
  ps                      list VMs
  logs NAME [-f]          print a VM's console output
  exec NAME -- CMD...     run a command in a VM started with --ssh (exit code: the command's)
  stop NAME               stop a VM
  rm NAME                 stop a VM and remove its data
  doctor                  check this machine and say how to fix what is missing
  bench IMAGE [-n N] [--backend B] [-- CMD...]
                          boot IMAGE N times (5); per-stage p50/p90 from the spans

Global options: --data-dir DIR (default $MICROVM_DATA_DIR or ~/.local/share/node-microvm), --json, --help
Exit codes: run -> the guest command's exit code; otherwise 0 ok, 1 failed, 2 usage error.`,
  run: `microvm run IMAGE [-- CMD...]

IMAGE is a registry reference (busybox, 127.0.0.1:5000/app:1) or an OCI layout (oci:DIR:TAG).
Options:
  --name NAME         VM name (default vm-<id>)
  --cpus N            vCPUs (1)            --memory MIB   memory in MiB (512)
  -p HOST:GUEST       forward a TCP port on 127.0.0.1 (repeatable)
  -e KEY=VALUE        guest environment (repeatable)
  -v HOST:GUEST[:ro]  share a host directory at GUEST over virtio-fs (repeatable; the QEMU backend
                      mounts it; with libkrun mount tag volN yourself)
  --backend B         auto | libkrun | qemu (auto)
  --rm                remove the VM's data when it exits
  --ssh               inject a key and wait for SSH on guest port 22
  --detach            return once the VM started (print its name)
  --trace             print the startup span tree to stderr
  --trace-json FILE   write the spans as JSON
  --otlp URL          export spans over OTLP/HTTP to URL (base, e.g. http://127.0.0.1:4318);
                      also OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_SERVICE_NAME
  --log-level L       libkrun log level (off, error, warn, info, debug, trace)
  --json              print one JSON object instead of text
The exit code is the guest command's.`,
  pull: `microvm pull IMAGE [--data-dir DIR] [--json]

Pulls IMAGE (registry reference or oci:DIR:TAG) into <data-dir>/images. Progress bars per layer on a
terminal, one line per finished layer otherwise, nothing but JSON with --json.`,
  images: `microvm images [--data-dir DIR] [--json]

Lists cached images: digest, size, references.`,
  cache: `microvm cache gc|purge [--data-dir DIR] [--json]

gc: remove unreferenced or incomplete entries and abandoned temporary extractions. purge: remove the whole cache.`,
  ps: `microvm ps [--data-dir DIR] [--json]

Lists VMs in the data dir and whether each is running (PID and start time checked).`,
  logs: `microvm logs NAME [-f] [--data-dir DIR]

Prints the VM's console output; -f follows it.`,
  stop: `microvm stop NAME [--data-dir DIR] [--json]

SIGTERM to the VM, SIGKILL after 5 s (only if its PID still is that VM).`,
  rm: `microvm rm NAME [--data-dir DIR] [--json]

Stops the VM and removes its data directory (never the image cache).`,
  exec: `microvm exec NAME [--data-dir DIR] [--json] -- CMD...

Runs CMD over SSH in a VM started with --ssh; exits with its exit code.`,
  doctor: `microvm doctor [--data-dir DIR] [--json]

Checks KVM, libkrun, libkrunfw, QEMU, user namespaces and disk space; says how to fix what is
missing and which backend 'auto' will use. Exit 0 when some backend can run.`,
  bench: `microvm bench IMAGE [-n N] [--backend B] [--data-dir DIR] [--json] [-- CMD...]

Boots IMAGE N times (5) running CMD (exit 0) and prints p50/p90 per span.`,
};

class UsageError extends Error {}

function spansJson(spans: readonly ReadableSpan[]): unknown[] {
  const t = (h: [number, number]): number => h[0] * 1e3 + h[1] / 1e6;
  return spans.map((s) => ({
    name: s.name,
    spanId: s.spanContext().spanId,
    parentSpanId: s.parentSpanContext?.spanId,
    traceId: s.spanContext().traceId,
    startMs: t(s.startTime),
    durationMs: t(s.endTime) - t(s.startTime),
    status: s.status,
    attributes: s.attributes,
    events: s.events.map((e) => ({ name: e.name, attributes: e.attributes })),
  }));
}

function vmDir(dataDir: string, name: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/.test(name)) throw new UsageError(`bad VM name ${JSON.stringify(name)}`);
  return path.join(dataDir, 'vms', name);
}

/** For --detach: a QEMU VM must not die with this CLI process. */
async function detachedBackend(choice: string): Promise<RunOptions['backend']> {
  const b = choice === 'qemu' ? qemuBackend() : await chooseBackend();
  return b.name === 'qemu' ? qemuBackend({ dieWithParent: false }) : b;
}

async function cmdRun(argv: string[], out: (o: unknown, text: string) => void): Promise<number> {
  const dash = argv.indexOf('--');
  const cmd = dash >= 0 ? argv.slice(dash + 1) : [];
  const { values, positionals } = parseArgs({
    args: dash >= 0 ? argv.slice(0, dash) : argv,
    allowPositionals: true,
    options: {
      name: { type: 'string' }, cpus: { type: 'string' }, memory: { type: 'string' }, p: { type: 'string', short: 'p', multiple: true },
      e: { type: 'string', short: 'e', multiple: true }, v: { type: 'string', short: 'v', multiple: true }, backend: { type: 'string' }, 'data-dir': { type: 'string' }, rm: { type: 'boolean' },
      ssh: { type: 'boolean' }, detach: { type: 'boolean' }, trace: { type: 'boolean' }, 'trace-json': { type: 'string' }, 'log-level': { type: 'string' }, otlp: { type: 'string' },
      json: { type: 'boolean' },
    },
  });
  if (positionals.length !== 1) throw new UsageError('run takes one IMAGE (then -- CMD...)');
  const exporter = new InMemorySpanExporter();
  const processors: SpanProcessor[] = [new SimpleSpanProcessor(exporter)];
  const tracesUrl = values.otlp
    ? `${values.otlp.replace(/\/+$/, '')}/v1/traces`
    : process.env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT ?? (process.env.OTEL_EXPORTER_OTLP_ENDPOINT ? `${process.env.OTEL_EXPORTER_OTLP_ENDPOINT.replace(/\/+$/, '')}/v1/traces` : undefined);
  if (tracesUrl) {
    // Loaded only when asked for: the library itself depends on @opentelemetry/api alone.
    const { OTLPTraceExporter } = await import('@opentelemetry/exporter-trace-otlp-http');
    processors.push(new BatchSpanProcessor(new OTLPTraceExporter({ url: tracesUrl })));
  }
  const { resourceFromAttributes } = await import('@opentelemetry/resources');
  const tracerProvider = new BasicTracerProvider({ spanProcessors: processors, resource: resourceFromAttributes({ 'service.name': process.env.OTEL_SERVICE_NAME ?? 'microvm' }) });
  const flush = (): Promise<void> => tracerProvider.forceFlush().then(() => tracerProvider.shutdown()).catch((e: Error) => {
    process.stderr.write(`microvm: exporting spans failed: ${e.message}\n`);
  });
  const num = (name: string, v: string | undefined): number | undefined => {
    if (v === undefined) return undefined;
    if (!/^\d+$/.test(v)) throw new UsageError(`--${name} takes a whole number, not ${JSON.stringify(v)}`);
    return Number(v);
  };
  const opts: RunOptions = {
    name: values.name,
    cpus: num('cpus', values.cpus),
    memoryMiB: num('memory', values.memory),
    ports: (values.p ?? []).map((s) => {
      const m = /^(\d+):(\d+)$/.exec(s);
      if (!m) throw new UsageError(`-p takes HOST:GUEST, not ${JSON.stringify(s)}`);
      return { host: Number(m[1]), guest: Number(m[2]) };
    }),
    env: values.e ?? [],
    virtiofs: (values.v ?? []).map((spec, i) => {
      const m = /^([^:]+):(\/[^:]*)(?::(ro|rw))?$/.exec(spec);
      if (!m) throw new UsageError(`-v takes HOST:GUEST[:ro], not ${JSON.stringify(spec)}`);
      return { tag: `vol${i}`, hostPath: path.resolve(m[1]), guestPath: m[2], readOnly: m[3] === 'ro' };
    }),
    backend: values.detach && (values.backend === 'qemu' || (values.backend ?? 'auto') === 'auto')
      ? await detachedBackend(values.backend ?? 'auto')
      : ((values.backend ?? 'auto') as RunOptions['backend']),
    dataDir: values['data-dir'] ? path.resolve(values['data-dir']) : undefined,
    initOverride: cmd.length ? cmd : undefined,
    ssh: values.ssh ? {} : undefined,
    logLevel: values['log-level'] as RunOptions['logLevel'],
    tracerProvider,
  };
  const ac = new AbortController();
  const onSignal = (): void => ac.abort();
  process.once('SIGINT', onSignal);
  opts.signal = ac.signal;
  const vm = await run(positionals[0], opts);
  process.removeListener('SIGINT', onSignal);
  let finished: ReadableSpan[] = [];
  const emitTrace = async (): Promise<void> => {
    const spans = (finished = [...exporter.getFinishedSpans()]); // before shutdown clears them
    await flush();
    if (values.trace) process.stderr.write(`${formatSpanTree(spans)}\n`);
    if (values['trace-json']) fs.writeFileSync(values['trace-json'], `${JSON.stringify(spansJson(spans), null, 2)}\n`);
  };
  if (values.detach) {
    vm.ssh?.close(); // the readiness connection would keep this process alive
    await emitTrace();
    out({ name: vm.name, id: vm.id, pid: vm.pid, backend: vm.backend, dataDir: vm.dataDir, ports: vm.ports }, vm.name);
    return 0;
  }
  // Stream the console while the guest runs; stop the VM on Ctrl-C.
  let offset = 0;
  const pump = (): void => {
    try {
      const fd = fs.openSync(vm.consoleLogPath, 'r');
      const size = fs.fstatSync(fd).size;
      if (size > offset) {
        const buf = Buffer.alloc(size - offset);
        fs.readSync(fd, buf, 0, buf.length, offset);
        offset = size;
        if (!values.json) process.stdout.write(buf);
      }
      fs.closeSync(fd);
    } catch {
      /* not there yet */
    }
  };
  const timer = setInterval(pump, 50);
  const stopOnSignal = (): void => void vm.stop();
  process.once('SIGINT', stopOnSignal);
  process.once('SIGTERM', stopOnSignal);
  const code = await vm.wait();
  clearInterval(timer);
  pump();
  process.removeListener('SIGINT', stopOnSignal);
  process.removeListener('SIGTERM', stopOnSignal);
  await emitTrace();
  const status = vm.status();
  const consoleText = values.json && fs.existsSync(vm.consoleLogPath) ? fs.readFileSync(vm.consoleLogPath, 'utf8') : '';
  if (values.rm) await vm.remove();
  if (values.json) {
    out({ name: vm.name, backend: vm.backend, exitCode: code, signal: status.signal, console: consoleText, spans: spansJson(finished) }, '');
  }
  return code ?? 128 + 9;
}

async function cmdBench(argv: string[], dataDir: string, out: (o: unknown, text: string) => void): Promise<number> {
  const dash = argv.indexOf('--');
  const cmd = dash >= 0 ? argv.slice(dash + 1) : ['/bin/sh', '-c', 'exit 0'];
  const { values, positionals } = parseArgs({
    args: dash >= 0 ? argv.slice(0, dash) : argv,
    allowPositionals: true,
    options: { n: { type: 'string', short: 'n' }, backend: { type: 'string' }, 'data-dir': { type: 'string' }, json: { type: 'boolean' } },
  });
  if (positionals.length !== 1) throw new UsageError('bench takes one IMAGE');
  const n = values.n === undefined ? 5 : Number(values.n);
  if (!Number.isInteger(n) || n < 1 || n > 1000) throw new UsageError('-n takes a whole number 1-1000');
  const samples = new Map<string, number[]>();
  const ms = (h: [number, number]): number => h[0] * 1e3 + h[1] / 1e6;
  for (let i = 0; i < n; i++) {
    const exporter = new InMemorySpanExporter();
    const tracerProvider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
    const vm = await run(positionals[0], { dataDir, name: `bench-${process.pid}-${i}`, initOverride: cmd, backend: (values.backend ?? 'auto') as RunOptions['backend'], tracerProvider });
    await vm.wait();
    await vm.remove();
    for (const sp of exporter.getFinishedSpans()) {
      if (sp.name === 'microvm.preflight.Check') continue;
      const list = samples.get(sp.name) ?? [];
      list.push(ms(sp.endTime) - ms(sp.startTime));
      samples.set(sp.name, list);
    }
  }
  const pct = (xs: number[], p: number): number => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((xs.length - 1) * p))];
  const rows = [...samples.entries()].map(([name, xs]) => ({ span: name, runs: xs.length, p50: pct(xs, 0.5), p90: pct(xs, 0.9) }));
  const text = [`${positionals[0]}, ${n} runs, backend ${values.backend ?? 'auto'}`, '| span | p50 ms | p90 ms |', '|---|---:|---:|', ...rows.map((r) => `| ${r.span} | ${r.p50.toFixed(1)} | ${r.p90.toFixed(1)} |`)].join('\n');
  out(rows, text);
  return 0;
}

async function cmdDoctor(dataDir: string, out: (o: unknown, text: string) => void): Promise<number> {
  const checks: PreflightCheck[] = [
    kvmCheck(),
    probeCheck('libkrun', 'libkrun 1.x can be loaded (backend libkrun)', LIBKRUN_INSTALL_HINT, () => resolveRuntime()),
    probeCheck('libkrunfw', 'libkrunfw 5 can be loaded (both backends)', FIRMWARE_INSTALL_HINT, () => resolveFirmware()),
    probeCheck('qemu', 'QEMU, virtiofsd and the guest init are present (backend qemu)', 'apt-get install qemu-system-x86', async () => resolveQemuRuntime()),
    userNamespacesCheck(),
    diskSpaceCheck(fs.existsSync(dataDir) ? dataDir : path.dirname(dataDir)),
  ];
  const results = [];
  for (const c of checks) results.push({ name: c.name, description: c.description, ...(await c.run()) });
  const backend = await chooseBackend().then((b) => b.name, () => 'none');
  const lines = results.map((r) => `${r.ok ? 'ok  ' : 'MISS'} ${r.name.padEnd(16)} ${r.ok ? r.description : `${r.message ?? ''}${r.remediation ? `\n     fix: ${r.remediation}` : ''}`}`);
  const usable = results.find((r) => r.name === 'libkrunfw')?.ok && (results.find((r) => r.name === 'qemu')?.ok || (results.find((r) => r.name === 'kvm')?.ok && results.find((r) => r.name === 'libkrun')?.ok));
  lines.push('', `backend 'auto' will use: ${backend}${backend === 'qemu' && !results[0].ok ? ' (no KVM: software emulation, slower but works)' : ''}`);
  out({ checks: results, backend, ready: !!usable }, lines.join('\n'));
  return usable ? 0 : 1;
}

/** Runs the CLI; returns the exit code. */
export async function main(argv: string[]): Promise<number> {
  const json = argv.includes('--json');
  const out = (o: unknown, text: string): void => {
    process.stdout.write(json ? `${JSON.stringify(o)}\n` : text ? `${text}\n` : '');
  };
  const command = argv[0] ?? '';
  const rest = argv.slice(1);
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(`${USAGE['']}\n`);
    return command ? 0 : 2;
  }
  if (rest.includes('--help') && (rest.indexOf('--') < 0 || rest.indexOf('--help') < rest.indexOf('--'))) {
    process.stdout.write(`${USAGE[command] ?? USAGE['']}\n`);
    return 0;
  }
  const dataIdx = rest.indexOf('--data-dir');
  const dataDir = dataIdx >= 0 && rest[dataIdx + 1] ? path.resolve(rest[dataIdx + 1]) : defaultDataRoot();
  const cacheDir = path.join(dataDir, 'images');
  const positional = rest.filter((a, i) => !a.startsWith('-') && rest[i - 1] !== '--data-dir');
  try {
    switch (command) {
      case 'run':
        return await cmdRun(rest, out);
      case 'pull': {
        if (positional.length !== 1) throw new UsageError('pull takes one IMAGE');
        const tty = process.stderr.isTTY && !json;
        const doneLayers = new Set<number>();
        const r = await pull(positional[0], {
          cacheDir,
          onProgress: (p) => {
            const pct = p.total > 0 ? Math.min(100, Math.floor((p.bytes / p.total) * 100)) : 0;
            const bar = `${'#'.repeat(Math.floor(pct / 5)).padEnd(20, '.')}`;
            if (tty) process.stderr.write(`\rlayer ${p.layer}/${p.layers} [${bar}] ${pct}%   `);
            else if (!json && p.bytes >= p.total && !doneLayers.has(p.layer)) {
              doneLayers.add(p.layer);
              process.stderr.write(`layer ${p.layer}/${p.layers} ${p.digest.slice(0, 19)} ${(p.total / 1e6).toFixed(1)} MB\n`);
            }
          },
        });
        if (tty) process.stderr.write('\n');
        out({ reference: r.reference, digest: r.digest, path: r.path, fromCache: r.fromCache, warnings: r.warnings }, `${r.digest}  ${r.fromCache ? '(cached)' : 'pulled'}  ${r.path}`);
        return 0;
      }
      case 'images': {
        const imgs = list(cacheDir);
        out(imgs, imgs.map((i) => `${i.digest.slice(0, 19)}  ${(i.bytes / 1e6).toFixed(1).padStart(8)} MB  ${i.references.join(', ')}`).join('\n') || '(no images)');
        return 0;
      }
      case 'cache': {
        if (positional[0] === 'gc') {
          const removed = await gc(cacheDir);
          out({ removed }, `removed ${removed.length} entr${removed.length === 1 ? 'y' : 'ies'}`);
        } else if (positional[0] === 'purge') {
          purge(cacheDir);
          out({ purged: cacheDir }, `removed ${cacheDir}`);
        } else throw new UsageError('cache takes gc or purge');
        return 0;
      }
      case 'ps': {
        const dir = path.join(dataDir, 'vms');
        const rows = (fs.existsSync(dir) ? fs.readdirSync(dir) : []).map((name) => {
          const st = readState(path.join(dir, name));
          return { name, image: st?.image, backend: st?.backend, pid: st?.pid, running: st ? isRecordedProcess(st) : false, ports: st?.ports ?? [] };
        });
        out(rows, rows.map((r) => `${r.name.padEnd(20)} ${r.running ? 'running' : 'stopped'}  ${String(r.backend ?? '').padEnd(8)} ${r.image ?? ''}`).join('\n') || '(no VMs)');
        return 0;
      }
      case 'logs': {
        if (positional.length !== 1) throw new UsageError('logs takes one NAME');
        const file = path.join(vmDir(dataDir, positional[0]), 'console.log');
        if (!fs.existsSync(file)) throw Object.assign(new Error(`no VM named ${positional[0]}`), { code: 'ERR_MICROVM_VM_NOT_FOUND' });
        process.stdout.write(fs.readFileSync(file));
        if (rest.includes('-f')) {
          let offset = fs.statSync(file).size;
          await new Promise<void>(() => {
            setInterval(() => {
              const size = fs.statSync(file).size;
              if (size > offset) {
                const fd = fs.openSync(file, 'r');
                const buf = Buffer.alloc(size - offset);
                fs.readSync(fd, buf, 0, buf.length, offset);
                fs.closeSync(fd);
                offset = size;
                process.stdout.write(buf);
              }
            }, 200);
          });
        }
        return 0;
      }
      case 'stop':
      case 'rm': {
        if (positional.length !== 1) throw new UsageError(`${command} takes one NAME`);
        const dir = vmDir(dataDir, positional[0]);
        if (!fs.existsSync(dir)) throw Object.assign(new Error(`no VM named ${positional[0]}`), { code: 'ERR_MICROVM_VM_NOT_FOUND' });
        const signalled = await terminateRecorded(dir);
        if (command === 'rm') fs.rmSync(dir, { recursive: true, force: true });
        out({ name: positional[0], stopped: signalled, removed: command === 'rm' }, `${positional[0]}: ${signalled ? 'stopped' : 'not running'}${command === 'rm' ? ', removed' : ''}`);
        return 0;
      }
      case 'doctor':
        return await cmdDoctor(dataDir, out);
      case 'bench':
        return await cmdBench(rest, dataDir, out);
      case 'exec': {
        const dash = rest.indexOf('--');
        const name = rest.slice(0, dash < 0 ? undefined : dash).filter((a, i, arr) => !a.startsWith('-') && arr[i - 1] !== '--data-dir')[0];
        const words = dash < 0 ? [] : rest.slice(dash + 1);
        if (!name || words.length === 0) throw new UsageError('exec takes NAME -- CMD...');
        const dir = vmDir(dataDir, name);
        const st = readState(dir);
        if (!st || !isRecordedProcess(st)) throw Object.assign(new Error(`no running VM named ${name}`), { code: 'ERR_MICROVM_VM_NOT_FOUND' });
        const port = st.ports.find((p) => p.guest === 22)?.host;
        const keyFile = path.join(dir, 'ssh', 'id_ed25519');
        if (!port || !fs.existsSync(keyFile)) throw Object.assign(new Error(`${name} was not started with --ssh`), { code: 'ERR_MICROVM_SSH_UNAVAILABLE' });
        const client = await SshClient.connect({ host: '127.0.0.1', port, username: 'root', privateKey: fs.readFileSync(keyFile, 'utf8'), hostKey: { knownHostsFile: path.join(dir, 'ssh', 'known_hosts') } });
        try {
          const quoted = words.map((w) => (/^[A-Za-z0-9_./:=@%+-]+$/.test(w) ? w : `'${w.replace(/'/g, `'\\''`)}'`)).join(' ');
          const r = await client.exec(quoted);
          if (json) out(r, '');
          else {
            process.stdout.write(r.stdout);
            process.stderr.write(r.stderr);
          }
          return r.exitCode ?? 128 + 15;
        } finally {
          client.close();
        }
      }
      default:
        throw new UsageError(`unknown command ${JSON.stringify(command)}`);
    }
  } catch (err) {
    if (err instanceof UsageError || (err as { code?: string }).code?.startsWith?.('ERR_PARSE_ARGS')) {
      process.stderr.write(`microvm: ${(err as Error).message}\nRun 'microvm ${command} --help'.\n`);
      return 2;
    }
    const e = err as Error & { code?: string };
    if (json) process.stdout.write(`${JSON.stringify({ error: { code: e.code ?? e.name, message: e.message } })}\n`);
    else process.stderr.write(`microvm: ${e.code ? `[${e.code}] ` : ''}${e.message}\n`);
    return 1;
  }
}
