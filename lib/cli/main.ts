/**
 * The `microvm` command line. Exit codes: the guest command's own code for `run -- CMD` (and for
 * `exec`), 128+N after signal N (an interrupted `run`, or a VM stopped by a signal), 1 with a coded
 * message when the hypervisor failed; otherwise 0 success, 1 failure (the message carries the error
 * code), 2 usage error.
 */
import { VM_FILE, VM_NAME, VM_NAME_PART, vmDir as vmDirOf, vmFile, vmsDir } from '../vm-dir';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import {
  type CollectedSpan,
  CollectingMeterProvider,
  CollectingTracerProvider,
  otlpHeaders,
  postOtlpJson,
  spansToOtlpJson,
} from '../telemetry/collector';
import { chooseBackend, run, type RunOptions } from '../run';
import { defaultCacheDir, defaultDataRoot } from '../paths';
import { gc, list, purge } from '../image/cache';
import { parsePullPolicy, pull, type PullPolicy } from '../image/pull';
import { diskSpaceCheck, kvmCheck, type PreflightCheck, probeCheck, userNamespacesCheck } from '../preflight/checks';
import { IDLE_COMMAND } from '../backends/guest-init';
import { libkrunBackend } from '../backends/libkrun';
import { checkFileServer, netGuardPath, qemuBackend, readExitPort, resolveQemuRuntime } from '../backends/qemu';
import { parseEgress } from '../network/egress';
import { copyAppended, readAppended } from '../file-tail';
import {
  GUEST_CLOCK_FILE,
  OUTPUT_TIMES_FILE,
  jsonLinesOffsetSince,
  offsetsSince,
  parseSince,
  readGuestClock,
} from '../log-times';
import { type AccelChoice, parseAccel, probeKvm } from '../host/kvm';
import { describeExit, type MicroVM } from '../vm';
import { resolveFirmware, FIRMWARE_INSTALL_HINT } from '../resolve/firmware';
import { LIBKRUN_INSTALL_HINT, resolveRuntime } from '../resolve/runtime';
import { isRecordedProcess, readState, sweepVms, terminateRecorded } from '../state';
import { SshClient } from '../ssh/client';
import { asNoSpace } from '../errors';
import { formatSpanTree } from '../telemetry/tree';
import { ATTR, SPAN } from '../telemetry/attributes';
import type { MicrovmErrorCode } from '../error-codes';
import { packageRoot } from '../native';
import { attach, connectVmAgent, copyBetween, envFromArgs, parseCpSide, terminalSize } from './agent-commands';

const USAGE: Record<string, string> = {
  '': `microvm — boot OCI images as lightweight VMs

Usage: microvm <command> [options]

Commands:
  run IMAGE [-- CMD...]   boot IMAGE (optionally running CMD as its init) and wait for it
  pull IMAGE              pull IMAGE into the cache
  images                  list cached images
  cache gc|purge          remove unreferenced entries and downloads / everything
  prune                   remove stopped VMs' data, then what the image cache no longer needs
  ps [-a] [-q]            list running VMs (-a: all)
  inspect NAME...         print what is known about VMs (JSON)
  port NAME [GUEST]       print a VM's forwarded ports (host 127.0.0.1:PORT -> guest port)
  logs NAME [-f] [-n N]   print a VM's output
  exec [-i] [-t] NAME -- CMD...
                          run a command in a VM (exit code: the command's)
  cp SRC DST              copy files or trees between a VM and the host (NAME:/path on one side)
  stop [-t S] NAME...     stop VMs
  rm [-f] NAME...         remove stopped VMs' data (-f: stop running ones first)
  doctor                  check this machine and say how to fix what is missing
  setup                   fetch libkrunfw into the data dir when the system has none (Debian/Ubuntu)
  bench IMAGE [-n N] [--backend B] [-- CMD...]
                          boot IMAGE N times (5); per-stage p50/p90 from the spans

Global options: --data-dir DIR (default $MICROVM_DATA_DIR or ~/.local/share/node-microvm), --json, --help
microvm --version (-V) prints the version.
Exit codes: run -> the guest command's exit code (128+N after signal N, 1 when the hypervisor
failed); otherwise 0 ok, 1 failed, 2 usage error.`,
  run: `microvm run IMAGE [-- CMD...]

IMAGE is a registry reference (busybox, 127.0.0.1:5000/app:1) or an OCI layout (oci:DIR:TAG).
Options:
  --name NAME         VM name (default vm-<id>)
  --cpus N            vCPUs (1)            --memory MIB   memory in MiB (512)
  -p [HOST:]GUEST     forward a TCP port on 127.0.0.1 (repeatable); without HOST (or HOST 0) a free
                      port is picked: \`microvm port NAME\` shows it
  -e KEY=VALUE        guest environment (repeatable)
  -v HOST:GUEST[:ro]  share a host directory at GUEST over virtio-fs (repeatable; the QEMU backend
                      mounts it; with libkrun mount tag volN yourself)
  --backend B         auto | libkrun | qemu (auto)
  --accel A           QEMU accelerator: auto | kvm | tcg (auto: hardware KVM when usable, else TCG;
                      also MICROVM_ACCEL)
  --boot-timeout MS   fail when the guest shows no sign of life within MS (60000)
  --log-max-bytes N   keep at most N bytes of each of the console, stdout and stderr (64 MiB); the
                      rest is discarded after a marker line (QEMU backend)
  --rm                remove the VM's data when it exits (if microvm is killed, the next run or
                      \`microvm prune\` removes it)
  --pull POLICY       missing | always | never (missing): when to ask the registry or layout what
                      IMAGE's tag names now; always picks up a re-tagged image
  --ssh               inject a key and wait for SSH on guest port 22
  --egress POLICY     allow | deny (allow): deny cuts the guest off every network, the host's
                      included, enforced by QEMU on the host; -p ports still answer (QEMU backend)
  --allow-host H:P[=ADDR]  (repeatable) an allow-list: the guest reaches only host name H on TCP
                      port P (at ADDR instead of H's DNS answer), nothing else; connections are
                      logged to the VM's egress.log (QEMU backend). H, *.H or H:P/udp: by DNS,
                      the addresses answered for H (or any name below it) on any port (or P)
  --allow-cidr NET    (repeatable) the guest reaches addresses in NET (10.0.0.0/8, NET:443,
                      NET:53/udp, [2001:db8::/32]:443)
  --deny-host H, --deny-cidr NET  (repeatable) refused even where an allow rule matches; with
                      only deny rules, everything else is allowed
  --dns IP[:PORT]     the resolver DNS questions for allowed names go to
  -d, --detach        return once the VM started (print its name)
  -i, -t              interactive: run CMD (default /bin/sh) attached to this terminal (-i: stdin,
                      -t: a tty) through the guest agent, then stop the VM (QEMU backend)
  --trace             print the startup span tree to stderr
  --trace-json FILE   write the spans as JSON
  --otlp URL          export spans and metrics over OTLP/HTTP to URL (base, e.g. http://127.0.0.1:4318);
                      also OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_SERVICE_NAME
  --log-level L       libkrun log level (off, error, warn, info, debug, trace)
  --json              print one JSON object instead of text: with --detach {name, id, pid, backend,
                      dataDir, ports}; otherwise {name, backend, reason, exitCode, signal,
                      interruptedBy, error, stdout, stderr, console, spans}
stdout carries only the command's stdout (QEMU backend; with libkrun the console, CRLF made LF),
stderr the command's stderr and microvm's own messages.
Exit code: the guest command's; 128+N when microvm was interrupted by signal N (SIGINT: 130) or the
VM was stopped by signal N; 1 with a coded message when the hypervisor failed.`,
  pull: `microvm pull IMAGE [--data-dir DIR] [--json]

Pulls IMAGE (registry reference or oci:DIR:TAG) into <data-dir>/cache. A tag is resolved anew every
time (one manifest request, or the layout's index): a re-tagged image is pulled, and the digest the
tag named before is printed. Progress bars per layer on a terminal, one line per finished layer
otherwise, nothing but JSON with --json: {reference, digest, path, fromCache, warnings,
previousDigest?}.`,
  images: `microvm images [-q] [--data-dir DIR] [--json]

Lists cached images under a header line: digest, size, last use, references; an image a tag named
before it moved says which tag and when. -q: digests only. --json: an array of {digest, bytes,
references, formerReferences, createdAt, lastUsedAt, path, ...}.`,
  cache: `microvm cache gc|purge [--data-dir DIR] [--json]

gc: remove unreferenced or incomplete entries (never one a running VM uses), downloaded blobs no
kept image needs, and what killed pulls left. purge: remove the whole cache.`,
  prune: `microvm prune [--data-dir DIR] [--json]

Removes the data of every VM that is not running (and whose microvm process is gone), then runs
\`cache gc\`. Running VMs are never touched.`,
  ps: `microvm ps [-a] [-q] [--data-dir DIR] [--json]

Lists running VMs under a header line (NAME STATUS BACKEND PID PORTS IMAGE); -a lists stopped ones
too; -q prints names only. Running means the recorded PID is alive and still that VM (start time and
executable checked). --json: an array of {name, running, backend, pid, image, ports, createdAt}.`,
  inspect: `microvm inspect NAME... [--data-dir DIR]

Prints a JSON array, one object per VM: its recorded state (id, backend, pid, image, image digest,
cpus, memory, ports, root, clone strategy, creation time), whether it runs, and its files (console,
stdout, stderr, hypervisor log, egress log and policy, output arrival times; null when absent).
Exit 1 when a NAME is unknown (the others are still printed).`,
  port: `microvm port NAME [GUEST] [--data-dir DIR] [--json]

Prints each forwarded port as "GUEST -> 127.0.0.1:HOST" (with GUEST: that one's host port only).
--json: an array of {host, guest}.`,
  logs: `microvm logs NAME [-f] [-n N] [--since T] [--console | --network] [--data-dir DIR]

Prints the guest command's stdout (to stdout) and stderr (to stderr); with the libkrun backend, or
with --console, the VM's console (kernel and init messages too); with --network, the egress
policy's log (one JSON object per line: time, host, port, address, ok, error; bytesIn, bytesOut
for relayed connections; kind, rule, protocol for the egress filter's decisions). -n/--tail N: only the last N lines of each. --since T: only what arrived at or
after T: an ISO 8601 time (2026-12-03T14:00:00Z; no zone: local time), Unix seconds, or a duration
back from now (90s, 10m, 1h30m); by the time each chunk of output reached the guest's init (lines
written together share it); the command's output on QEMU VMs and --network only
(ERR_MICROVM_LOG_TIMES otherwise). With both, the last N lines of what is that recent. -f follows.`,
  stop: `microvm stop [-t SECONDS] NAME... [--data-dir DIR] [--json]

SIGTERM to each VM, SIGKILL after -t SECONDS (5) (only if its PID still is that VM).
--json: an array of {name, stopped}.`,
  rm: `microvm rm [-f] NAME... [--data-dir DIR] [--json]

Removes each VM's data directory (never the image cache). A running VM is refused
(ERR_MICROVM_VM_RUNNING) unless -f, which stops it first. --json: an array of {name, stopped, removed}.`,
  exec: `microvm exec [-i] [-t] [-e KEY=VALUE]... [-w DIR] [-u USER] NAME [--data-dir DIR] [--json] -- CMD...

Runs CMD (an argv, no shell) in a running VM through its guest agent (any image; no SSH server
needed) and exits with its exit code (128+N when signal N killed it).
  -i, --interactive   forward this process's stdin (EOF closes the command's)
  -t, --tty           a terminal: raw mode, window size and resizes; stdout and stderr merged
  -e, --env K=V       environment (after the image's Env and run's -e)
  -w, --workdir DIR   working directory (default: the image's)
  -u, --user USER     name, UID or UID:GID from the guest's /etc/passwd
Ctrl-C/SIGTERM are forwarded to the command. VMs without an agent (libkrun) fall back to SSH when
started with --ssh. --json: {stdout, stderr, exitCode, signal} once it ended.`,
  cp: `microvm cp SRC DST [--data-dir DIR] [--json]

Copies a file or directory tree between a running VM and the host; one side is NAME:/path, the
other a host path. Into DST when it is an existing directory. Modes and symlinks (as links) are kept,
owners when run as root. Atomic: built under a temporary name and renamed; nothing is left on
failure. Names sent by the guest are checked (no .., no writes through links).`,
  setup: `microvm setup [--data-dir DIR] [--json]

Makes sure libkrunfw 5 (the guest kernel both backends boot) can be found: when it is not installed,
fetches Debian's libkrunfw5 package with apt-get download (no system change) and unpacks it into
<data-dir>/libkrunfw, where the library looks. Prints where it is. On distributions without
apt-get, install their libkrunfw package instead. Also run \`microvm doctor\`.`,
  doctor: `microvm doctor [--data-dir DIR] [--json]

Checks KVM, libkrun, libkrunfw, QEMU, user namespaces and disk space; says how to fix what is
missing and which backend 'auto' will use. Exit 0 when some backend can run.`,
  bench: `microvm bench IMAGE [-n N] [--backend B] [--data-dir DIR] [--json] [-- CMD...]

Boots IMAGE N times (5) running CMD (default: echo ready; it must exit 0) and prints p50/p90 per
span, including the guest's own (kernel, mounts, network, config, exec; QEMU backend), plus
"run() to the command's first output" (QEMU: its stdout is watched) and "run() to the command's
exit"; microvm.Run is run() until it resolved (the guest agent answered). The header names the
backend and accelerator used.`,
};

class UsageError extends Error {
  readonly code = 'ERR_MICROVM_USAGE';
}

type ParseConfig = {
  args: string[];
  options: Record<string, { type: 'string' | 'boolean'; short?: string; multiple?: boolean }>;
  allowPositionals: true;
};

/**
 * parseArgs (strict), and an option that takes one value given twice (`--name a --name b`) is a
 * usage error rather than the last one silently winning.
 */
function parseStrict<T extends ParseConfig>(config: T) {
  const r = parseArgs({ ...config, strict: true, tokens: true });
  const seen = new Set<string>();
  for (const t of r.tokens ?? []) {
    if (t.kind !== 'option' || config.options[t.name]?.multiple) continue;
    if (seen.has(t.name)) throw new UsageError(`--${t.name} was given twice`);
    seen.add(t.name);
  }
  return r;
}

/** Options every command takes, when given before the command (`microvm --data-dir X ps`). */
const LEADING_GLOBALS = new Set(['--data-dir', '--json']);

/** argv with global options given before the command moved after it. */
function commandFirst(argv: string[]): string[] {
  const globals: string[] = [];
  let i = 0;
  while (i < argv.length && argv[i].startsWith('--')) {
    const name = argv[i].split('=')[0];
    if (!LEADING_GLOBALS.has(name)) break;
    const takesValue = name === '--data-dir' && !argv[i].includes('=');
    globals.push(...argv.slice(i, i + (takesValue ? 2 : 1)));
    i += takesValue ? 2 : 1;
  }
  return i < argv.length ? [argv[i], ...globals, ...argv.slice(i + 1)] : argv;
}

/** The code a usage error prints: node:util's ERR_PARSE_ARGS_* as it is, else ERR_MICROVM_USAGE. */
function usageCode(err: unknown): string {
  const c = (err as { code?: unknown }).code;
  return typeof c === 'string' && c.startsWith('ERR_PARSE_ARGS') ? c : 'ERR_MICROVM_USAGE';
}

/** An Error with a code (the CLI's own conditions). */
function coded(code: MicrovmErrorCode, message: string): Error & { code: MicrovmErrorCode } {
  return Object.assign(new Error(message), { code });
}

/** Columns padded to their widest cell, under a header line; no trailing spaces. */
function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  return [header, ...rows]
    .map((r) =>
      r
        .map((c, i) => c.padEnd(widths[i]))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

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

/** VM names in the data dir, sorted. */
function vmNames(dataDir: string): string[] {
  const dir = vmsDir(dataDir);
  return fs.existsSync(dir) ? fs.readdirSync(dir).sort() : [];
}

/** The offset in `file` where its last `lines` lines start (reads from the end only). */
function tailOffset(file: string, lines: number): number {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch {
    return 0;
  }
  try {
    const size = fs.fstatSync(fd).size;
    if (lines === 0) return size;
    const chunk = Buffer.alloc(64 * 1024);
    let pos = size;
    let seen = 0;
    while (pos > 0) {
      const n = Math.min(chunk.length, pos);
      pos -= n;
      fs.readSync(fd, chunk, 0, n, pos);
      for (let i = n - 1; i >= 0; i--) {
        // The newline at the very end closes the last line; it does not start another.
        if (chunk[i] !== 0x0a || pos + i === size - 1) continue;
        if (++seen === lines) return pos + i + 1;
      }
    }
    return 0;
  } finally {
    fs.closeSync(fd);
  }
}

function spansJson(spans: readonly CollectedSpan[]): unknown[] {
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

/** The exit code a VM's guest reported (QEMU backend: its exit port's file), or null. */
function reportedExit(dir: string): number | null {
  try {
    const fd = fs.openSync(path.join(dir, 'exit-status'), 'r');
    try {
      const buf = Buffer.alloc(4096); // what readExitPort reads of it (the guest wrote it: hostile)
      const n = fs.readSync(fd, buf, 0, buf.length, 0);
      return readExitPort(buf.subarray(0, n).toString('utf8')).code ?? null;
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return null;
  }
}

function vmDir(dataDir: string, name: string): string {
  if (!VM_NAME.test(name)) throw new UsageError(`bad VM name ${JSON.stringify(name)}`);
  return vmDirOf(dataDir, name);
}

/** For --detach: the VM must not die with this CLI process. */
async function detachedBackend(
  choice: string,
  accel: AccelChoice | undefined,
  dataRoot: string,
): Promise<RunOptions['backend']> {
  const b =
    choice === 'qemu'
      ? qemuBackend({ accel })
      : choice === 'libkrun'
        ? libkrunBackend()
        : await chooseBackend({ accel, dataRoot });
  return b.detached?.() ?? b;
}

const signalNumber = (sig: NodeJS.Signals): number => os.constants.signals[sig] ?? 9;

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

async function cmdRun(argv: string[], out: (o: unknown, text: string) => void): Promise<number> {
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
    backend: values.detach
      ? await detachedBackend(values.backend ?? 'auto', accel, dataRoot)
      : attached
        ? 'qemu'
        : ((values.backend ?? 'auto') as RunOptions['backend']),
    accel: values.detach && (values.backend ?? 'auto') !== 'libkrun' ? undefined : accel,
    timeouts: values['boot-timeout'] === undefined ? undefined : { boot: num('boot-timeout', values['boot-timeout']) },
    logMaxBytes: values['log-max-bytes'] === undefined ? undefined : num('log-max-bytes', values['log-max-bytes']),
    dataDir: values['data-dir'] ? path.resolve(values['data-dir']) : undefined,
    initOverride: attached ? [...IDLE_COMMAND] : cmd.length ? cmd : undefined,
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

async function cmdBench(argv: string[], dataDir: string, out: (o: unknown, text: string) => void): Promise<number> {
  const dash = argv.indexOf('--');
  const cmd = dash >= 0 ? argv.slice(dash + 1) : ['/bin/sh', '-c', 'echo ready'];
  const { values, positionals } = parseStrict({
    args: dash >= 0 ? argv.slice(0, dash) : argv,
    allowPositionals: true,
    options: {
      n: { type: 'string', short: 'n' },
      backend: { type: 'string' },
      'data-dir': { type: 'string' },
      json: { type: 'boolean' },
    },
  });
  if (positionals.length !== 1) throw new UsageError('bench takes one IMAGE');
  const n = values.n === undefined ? 5 : Number(values.n);
  if (!Number.isInteger(n) || n < 1 || n > 1000) throw new UsageError('-n takes a whole number 1-1000');
  const samples = new Map<string, number[]>();
  const ms = (h: [number, number]): number => h[0] * 1e3 + h[1] / 1e6;
  let used = '';
  for (let i = 0; i < n; i++) {
    const tracerProvider = new CollectingTracerProvider();
    const t0 = performance.now();
    const vm = await run(positionals[0], {
      dataDir,
      name: `bench-${process.pid}-${i}`,
      initOverride: cmd,
      backend: (values.backend ?? 'auto') as RunOptions['backend'],
      tracerProvider,
    });
    // The command's first output byte (where the backend keeps its stdout apart: QEMU), watched
    // while it runs; the wait ends with the VM.
    let firstOutput: number | undefined;
    const stdoutPath = vm.stdoutPath;
    const watch = stdoutPath
      ? setInterval(() => {
          if (firstOutput === undefined && (fs.statSync(stdoutPath, { throwIfNoEntry: false })?.size ?? 0) > 0)
            firstOutput = performance.now() - t0;
        }, 2)
      : undefined;
    const exit = await vm.wait();
    const toExit = performance.now() - t0;
    clearInterval(watch);
    if (firstOutput === undefined && stdoutPath && (fs.statSync(stdoutPath, { throwIfNoEntry: false })?.size ?? 0) > 0)
      firstOutput = toExit; // printed in the last moment before the exit
    await vm.remove();
    if (exit.reason !== 'exited' || exit.exitCode !== 0) {
      throw Object.assign(
        new Error(`bench run ${i + 1}: ${describeExit(exit)}; a benchmark of failing boots measures nothing`),
        { code: exit.error?.code ?? 'ERR_MICROVM_BENCH_RUN_FAILED' },
      );
    }
    // run() called -> the command's first output, and -> its exit (microvm.Run ends when run()
    // resolves: the agent's or SSH's readiness; the command's life goes on after).
    const add = (row: string, v: number): void => {
      samples.set(row, [...(samples.get(row) ?? []), v]);
    };
    if (firstOutput !== undefined) add("(run() to the command's first output)", firstOutput);
    add("(run() to the command's exit)", toExit);
    for (const sp of tracerProvider.finishedSpans()) {
      if (sp.name === SPAN.BACKEND_START) {
        const accel = sp.attributes[ATTR.QEMU_ACCEL];
        used = `${vm.backend}${accel ? ` (accel ${String(accel)})` : ''}`;
      }
      if (sp.name === 'microvm.preflight.Check') continue;
      const list = samples.get(sp.name) ?? [];
      list.push(ms(sp.endTime) - ms(sp.startTime));
      samples.set(sp.name, list);
    }
  }
  const pct = (xs: number[], p: number): number =>
    [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((xs.length - 1) * p))];
  const rows = [...samples.entries()].map(([name, xs]) => ({
    span: name,
    runs: xs.length,
    p50: pct(xs, 0.5),
    p90: pct(xs, 0.9),
  }));
  const text = [
    `${positionals[0]}, ${n} runs, backend ${used || (values.backend ?? 'auto')}`,
    '| span | p50 ms | p90 ms |',
    '|---|---:|---:|',
    ...rows.map((r) => `| ${r.span} | ${r.p50.toFixed(1)} | ${r.p90.toFixed(1)} |`),
  ].join('\n');
  out(rows, text);
  return 0;
}

async function cmdDoctor(dataDir: string, out: (o: unknown, text: string) => void): Promise<number> {
  const checks: PreflightCheck[] = [
    kvmCheck(),
    probeCheck('libkrun', 'libkrun 1.x can be loaded (backend libkrun)', LIBKRUN_INSTALL_HINT, () => resolveRuntime()),
    probeCheck('libkrunfw', 'libkrunfw 5 can be loaded (both backends)', FIRMWARE_INSTALL_HINT, () =>
      resolveFirmware(),
    ),
    probeCheck(
      'qemu',
      'QEMU, virtiofsd and the guest init are present (backend qemu)',
      'apt-get install qemu-system-x86',
      async () => resolveQemuRuntime(),
    ),
    // Not required to boot: only egress rules beyond relayed names need it.
    {
      ...probeCheck(
        'egress-filter',
        'the egress filter is present (egress rules by address or DNS)',
        'npm rebuild node-microvm (in a checkout: npm run build:native)',
        async () => netGuardPath(),
      ),
      required: false,
    },
    userNamespacesCheck(),
    // What a boot needs of virtiofsd on this host, as this user (setgroups, /run, its sandbox).
    probeCheck(
      'file-server',
      "virtiofsd serves a VM's files as this user (backend qemu)",
      process.getuid?.() === 0
        ? 'apt-get install qemu-system-x86'
        : 'enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu also kernel.apparmor_restrict_unprivileged_userns=0), or run as root',
      () => checkFileServer(),
    ),
    diskSpaceCheck(fs.existsSync(dataDir) ? dataDir : path.dirname(dataDir)),
  ];
  const results = [];
  for (const c of checks) results.push({ name: c.name, description: c.description, ...(await c.run()) });
  const backend = await chooseBackend({ dataRoot: dataDir }).then(
    (b) => b.name,
    () => 'none',
  );
  let accel: { accel: string; reason: string } | undefined;
  try {
    const rt = resolveQemuRuntime({}, dataDir);
    accel = { accel: rt.accel, reason: rt.reason };
  } catch {
    accel = undefined;
  }
  const lines = results.map(
    (r) =>
      `${r.ok ? 'ok  ' : 'MISS'} ${r.name.padEnd(16)} ${r.ok ? (r.message ?? r.description) : `${r.message ?? ''}${r.remediation ? `\n     fix: ${r.remediation}` : ''}`}`,
  );
  const usable =
    results.find((r) => r.name === 'libkrunfw')?.ok &&
    (results.find((r) => r.name === 'qemu')?.ok ||
      (results.find((r) => r.name === 'kvm')?.ok && results.find((r) => r.name === 'libkrun')?.ok));
  lines.push(
    '',
    `backend 'auto' will use: ${backend}${backend === 'qemu' && accel ? ` with ${accel.accel.toUpperCase()} (${accel.accel === 'tcg' ? `${accel.reason}` : accel.reason})` : ''}`,
  );
  out({ checks: results, backend, accel: accel ?? null, kvm: probeKvm(), ready: !!usable }, lines.join('\n'));
  return usable ? 0 : 1;
}

/** Runs the CLI; returns the exit code. */
/** Options every command takes. */
const GLOBAL_OPTIONS = {
  'data-dir': { type: 'string' },
  json: { type: 'boolean' },
  help: { type: 'boolean' },
} as const;
/** Each command's own options (run and bench parse theirs in cmdRun/cmdBench). */
const COMMAND_OPTIONS: Record<
  string,
  Record<string, { type: 'string' | 'boolean'; short?: string; multiple?: boolean }>
> = {
  pull: {},
  images: { quiet: { type: 'boolean', short: 'q' } },
  cache: {},
  prune: {},
  ps: { all: { type: 'boolean', short: 'a' }, quiet: { type: 'boolean', short: 'q' } },
  inspect: {},
  port: {},
  stop: { time: { type: 'string', short: 't' } },
  rm: { force: { type: 'boolean', short: 'f' } },
  exec: {
    interactive: { type: 'boolean', short: 'i' },
    tty: { type: 'boolean', short: 't' },
    env: { type: 'string', short: 'e', multiple: true },
    workdir: { type: 'string', short: 'w' },
    user: { type: 'string', short: 'u' },
  },
  cp: {},
  doctor: {},
  setup: {},
  logs: {
    follow: { type: 'boolean', short: 'f' },
    console: { type: 'boolean' },
    network: { type: 'boolean' },
    tail: { type: 'string', short: 'n' },
    since: { type: 'string' },
  },
};

/**
 * One parser for every command (node:util parseArgs, strict): `--opt=value` and `--opt value` mean
 * the same, an unknown option is a usage error, and nothing after `--` is ever read as ours.
 */
function parseCommand(
  command: string,
  args: string[],
): { values: Record<string, string | boolean | string[] | undefined>; positionals: string[]; after: string[] } {
  const dash = args.indexOf('--');
  const own = COMMAND_OPTIONS[command] ?? {};
  const { values, positionals } = parseStrict({
    args: dash >= 0 ? args.slice(0, dash) : args,
    allowPositionals: true,
    options: { ...GLOBAL_OPTIONS, ...own },
  });
  return {
    values,
    positionals,
    after: dash >= 0 ? args.slice(dash + 1) : [],
  };
}

/** Runs the CLI; returns the exit code. */
export async function main(args: string[]): Promise<number> {
  const argv = commandFirst(args);
  const command = argv[0] ?? '';
  const rest = argv.slice(1);
  const ours = rest.indexOf('--') >= 0 ? rest.slice(0, rest.indexOf('--')) : rest;
  const json = ours.includes('--json');
  const out = (o: unknown, text: string): void => {
    process.stdout.write(json ? `${JSON.stringify(o)}\n` : text ? `${text}\n` : '');
  };
  if (command === '--version' || command === '-V' || command === 'version') {
    const pkg = JSON.parse(fs.readFileSync(path.join(packageRoot, 'package.json'), 'utf8')) as { version: string };
    out({ version: pkg.version, node: process.versions.node }, pkg.version);
    return 0;
  }
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(`${USAGE['']}\n`);
    return command ? 0 : 2;
  }
  if (ours.includes('--help')) {
    process.stdout.write(`${USAGE[command] ?? USAGE['']}\n`);
    return 0;
  }
  let values: Record<string, string | boolean | string[] | undefined> = {};
  let positional: string[] = [];
  let after: string[] = [];
  if (command !== 'run' && command !== 'bench') {
    try {
      ({ values, positionals: positional, after } = parseCommand(command, rest));
    } catch (err) {
      process.stderr.write(
        `microvm: [${usageCode(err)}] ${(err as Error).message}\nRun 'microvm ${command} --help'.\n`,
      );
      return 2;
    }
  } else {
    // run and bench parse everything themselves; the data dir is read the same way.
    const m = /^--data-dir(?:=(.*))?$/;
    ours.forEach((a, i) => {
      const hit = m.exec(a);
      if (hit) values['data-dir'] = hit[1] ?? ours[i + 1];
    });
  }
  const dataDir =
    typeof values['data-dir'] === 'string' && values['data-dir'] ? path.resolve(values['data-dir']) : defaultDataRoot();
  const cacheDir = defaultCacheDir(dataDir);
  try {
    switch (command) {
      case 'run':
        return await cmdRun(rest, out);
      case 'pull': {
        if (positional.length !== 1) throw new UsageError('pull takes one IMAGE');
        const tty = process.stderr.isTTY && !json;
        const doneLayers = new Set<number>();
        // Ctrl-C / SIGTERM: the pull stops (nothing half-stored) and we exit 128+N.
        const ac = new AbortController();
        let interrupted: NodeJS.Signals | undefined;
        const onSignal = (sig: NodeJS.Signals): void => {
          interrupted ??= sig;
          ac.abort();
        };
        const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
        for (const sig of signals) process.on(sig, onSignal);
        const r = await pull(positional[0], {
          cacheDir,
          signal: ac.signal,
          onProgress: (p) => {
            const pct = p.total > 0 ? Math.min(100, Math.floor((p.bytes / p.total) * 100)) : 0;
            const bar = `${'#'.repeat(Math.floor(pct / 5)).padEnd(20, '.')}`;
            if (tty) process.stderr.write(`\rlayer ${p.layer}/${p.layers} [${bar}] ${pct}%   `);
            else if (!json && p.bytes >= p.total && !doneLayers.has(p.layer)) {
              doneLayers.add(p.layer);
              process.stderr.write(
                `layer ${p.layer}/${p.layers} ${p.digest.slice(0, 19)} ${(p.total / 1e6).toFixed(1)} MB\n`,
              );
            }
          },
        })
          .catch((err: unknown) => {
            if (!interrupted) throw err;
            if (tty) process.stderr.write('\n');
            process.stderr.write(`microvm: pull interrupted by ${interrupted}; nothing was stored\n`);
            return undefined;
          })
          .finally(() => {
            for (const sig of signals) process.removeListener(sig, onSignal);
          });
        if (!r) return 128 + signalNumber(interrupted as NodeJS.Signals);
        if (tty) process.stderr.write('\n');
        out(
          {
            reference: r.reference,
            digest: r.digest,
            path: r.path,
            fromCache: r.fromCache,
            warnings: r.warnings,
            ...(r.previousDigest ? { previousDigest: r.previousDigest } : {}),
          },
          `${r.digest}  ${r.fromCache ? '(cached)' : 'pulled'}  ${r.path}${r.previousDigest ? `\n${r.reference} moved: it named ${r.previousDigest} before` : ''}`,
        );
        return 0;
      }
      case 'images': {
        if (positional.length) throw new UsageError('images takes no arguments');
        const imgs = list(cacheDir);
        if (values.quiet) {
          out(
            imgs.map((i) => i.digest),
            imgs.map((i) => i.digest).join('\n'),
          );
          return 0;
        }
        const when = (iso: string): string => iso.slice(0, 16).replace('T', ' ');
        out(
          imgs,
          table(
            ['DIGEST', 'SIZE', 'LAST USED', 'REFERENCES'],
            imgs.map((i) => [
              i.digest.slice(0, 19),
              `${(i.bytes / 1e6).toFixed(1)} MB`,
              when(i.lastUsedAt),
              [
                ...i.references,
                ...i.formerReferences.map((f) => `(${f.reference} until ${when(f.until)}, now ${f.now.slice(0, 19)})`),
              ].join(', '),
            ]),
          ),
        );
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
      case 'prune': {
        if (positional.length) throw new UsageError('prune takes no arguments');
        const vms = await sweepVms(dataDir, true);
        const cache = await gc(cacheDir);
        out(
          { vms, cache },
          `removed ${vms.length} VM${vms.length === 1 ? '' : 's'}${vms.length ? ` (${vms.join(', ')})` : ''} and ${cache.length} cache entr${cache.length === 1 ? 'y' : 'ies'}`,
        );
        return 0;
      }
      case 'ps': {
        if (positional.length) throw new UsageError('ps takes no arguments');
        // A detached --rm VM that ended by itself (nobody watched it) goes now, as run() would.
        await sweepVms(dataDir);
        const rows = vmNames(dataDir)
          .map((name) => {
            const dir = vmDirOf(dataDir, name);
            const st = readState(dir);
            const running = st ? isRecordedProcess(st) : false;
            return {
              name,
              running,
              backend: st?.backend ?? null,
              pid: st?.pid ?? null,
              image: st?.image ?? null,
              ports: st?.ports ?? [],
              createdAt: st?.createdAt ?? null,
              exitCode: running ? null : reportedExit(dir),
            };
          })
          .filter((r) => values.all || r.running);
        if (values.quiet) {
          out(
            rows.map((r) => r.name),
            rows.map((r) => r.name).join('\n'),
          );
          return 0;
        }
        out(
          rows,
          table(
            ['NAME', 'STATUS', 'BACKEND', 'PID', 'PORTS', 'IMAGE'],
            rows.map((r) => [
              r.name,
              r.running ? 'running' : r.exitCode !== null ? `exited (${r.exitCode})` : 'stopped',
              r.backend ?? '',
              r.running ? String(r.pid) : '',
              r.ports.map((p) => `${p.host}->${p.guest}`).join(','),
              r.image ?? '',
            ]),
          ),
        );
        return 0;
      }
      case 'inspect': {
        if (positional.length === 0) throw new UsageError('inspect takes one or more NAMEs');
        const found: unknown[] = [];
        const missing: string[] = [];
        for (const name of positional) {
          const dir = vmDir(dataDir, name);
          const st = readState(dir);
          if (!st) {
            missing.push(name);
            continue;
          }
          const file = (f: string): string | null => (fs.existsSync(path.join(dir, f)) ? path.join(dir, f) : null);
          found.push({
            ...st,
            running: isRecordedProcess(st),
            dataDir: dir,
            files: {
              console: file(VM_FILE.console),
              stdout: file(VM_FILE.stdout),
              stderr: file(VM_FILE.stderr),
              log: file(VM_FILE.vmm),
              egress: file(VM_FILE.egressLog),
              egressPolicy: file('egress-policy'),
              outputTimes: file(OUTPUT_TIMES_FILE),
            },
          });
        }
        process.stdout.write(`${JSON.stringify(found, null, 2)}\n`);
        if (missing.length) throw coded('ERR_MICROVM_VM_NOT_FOUND', `no VM named ${missing.join(', ')}`);
        return 0;
      }
      case 'port': {
        if (positional.length < 1 || positional.length > 2) throw new UsageError('port takes NAME [GUEST]');
        const st = readState(vmDir(dataDir, positional[0]));
        if (!st) throw coded('ERR_MICROVM_VM_NOT_FOUND', `no VM named ${positional[0]}`);
        let ports = st.ports;
        if (positional[1] !== undefined) {
          if (!/^\d+$/.test(positional[1])) throw new UsageError(`GUEST must be a port number, not ${positional[1]}`);
          ports = ports.filter((p) => p.guest === Number(positional[1]));
          if (!ports.length)
            throw coded(
              'ERR_MICROVM_PORT_NOT_FORWARDED',
              `${positional[0]} forwards no host port to guest port ${positional[1]}`,
            );
          out(ports, ports.map((p) => `127.0.0.1:${p.host}`).join('\n'));
          return 0;
        }
        out(ports, ports.map((p) => `${p.guest} -> 127.0.0.1:${p.host}`).join('\n'));
        return 0;
      }
      case 'logs': {
        if (positional.length !== 1) throw new UsageError('logs takes one NAME');
        const dir = vmDir(dataDir, positional[0]);
        if (!fs.existsSync(vmFile(dir, 'console')) && !fs.existsSync(vmFile(dir, 'stdout')))
          throw coded('ERR_MICROVM_VM_NOT_FOUND', `no VM named ${positional[0]}`);
        let tail: number | undefined;
        if (values.tail !== undefined) {
          if (!/^\d+$/.test(String(values.tail)))
            throw new UsageError(`--tail takes a number of lines, not ${JSON.stringify(values.tail)}`);
          tail = Number(values.tail);
        }
        if (values.console && values.network) throw new UsageError('logs: --console or --network, not both');
        let since: number | undefined;
        if (values.since !== undefined) {
          since = parseSince(String(values.since));
          if (since === undefined)
            throw new UsageError(
              `--since takes a time (2026-12-03T14:00:00Z), Unix seconds or a duration back (10m, 1h30m), not ${JSON.stringify(values.since)}`,
            );
        }
        // The command's stdout and stderr where the backend kept them apart (QEMU), else the console.
        const separate = !values.console && fs.existsSync(vmFile(dir, 'stdout'));
        const streams: { file: string; offset: number; out: NodeJS.WritableStream }[] = values.network
          ? [{ file: vmFile(dir, 'egressLog'), offset: 0, out: process.stdout }]
          : separate
            ? [
                { file: vmFile(dir, 'stdout'), offset: 0, out: process.stdout },
                { file: vmFile(dir, 'stderr'), offset: 0, out: process.stderr },
              ]
            : [{ file: vmFile(dir, 'console'), offset: 0, out: process.stdout }];
        if (since !== undefined) {
          if (values.network) streams[0].offset = jsonLinesOffsetSince(streams[0].file, since);
          else {
            // Chunk times exist for the command's own stdout and stderr on the QEMU backend.
            const zero = readGuestClock(path.join(dir, GUEST_CLOCK_FILE));
            const times = path.join(dir, OUTPUT_TIMES_FILE);
            if (!separate || zero === undefined || !fs.existsSync(times))
              throw coded(
                'ERR_MICROVM_LOG_TIMES',
                `${positional[0]} has no arrival times for ${separate ? 'its output' : 'the console'}: --since works on the command's stdout and stderr of VMs the QEMU backend started`,
              );
            const size = (f: string): number => (fs.existsSync(f) ? fs.statSync(f).size : 0);
            const offsets = offsetsSince(times, zero, since, [size(streams[0].file), size(streams[1].file)]);
            streams[0].offset = offsets[0];
            streams[1].offset = offsets[1];
          }
        }
        // -n with --since: the last N lines of what is that recent.
        if (tail !== undefined) for (const st of streams) st.offset = Math.max(st.offset, tailOffset(st.file, tail));
        // Streamed in pieces, waiting for the terminal or pipe to take each: constant memory.
        const pump = async (): Promise<void> => {
          for (const st of streams) st.offset = await copyAppended(st.file, st.offset, st.out);
        };
        await pump();
        for (; values.follow; await new Promise((r) => setTimeout(r, 200))) await pump();
        return 0;
      }
      case 'stop':
      case 'rm': {
        if (positional.length === 0) throw new UsageError(`${command} takes one or more NAMEs`);
        let timeoutMs = 5000;
        if (values.time !== undefined) {
          if (!/^\d+$/.test(String(values.time)) || Number(values.time) > 3600)
            throw new UsageError(`-t takes whole seconds 0-3600, not ${JSON.stringify(values.time)}`);
          timeoutMs = Number(values.time) * 1000;
        }
        const results: { name: string; stopped: boolean; removed?: boolean }[] = [];
        const failed: string[] = [];
        for (const name of positional) {
          const dir = vmDir(dataDir, name);
          try {
            if (!fs.existsSync(dir)) throw coded('ERR_MICROVM_VM_NOT_FOUND', `no VM named ${name}`);
            if (command === 'rm') {
              const st = readState(dir);
              if (st && isRecordedProcess(st) && !values.force)
                throw coded('ERR_MICROVM_VM_RUNNING', `${name} is running; stop it first or use rm -f`);
            }
            const stopped = await terminateRecorded(dir, timeoutMs);
            if (command === 'rm') fs.rmSync(dir, { recursive: true, force: true });
            results.push(command === 'rm' ? { name, stopped, removed: true } : { name, stopped });
            if (!json) process.stdout.write(`${name}\n`);
          } catch (err) {
            const e = err as Error & { code?: string };
            failed.push(name);
            if (!json) process.stderr.write(`microvm: [${e.code ?? 'ERR_MICROVM_USAGE'}] ${e.message}\n`);
            else
              results.push({
                name,
                stopped: false,
                ...(command === 'rm' ? { removed: false } : {}),
                error: { code: e.code, message: e.message },
              } as never);
          }
        }
        if (json) out(results, '');
        return failed.length ? 1 : 0;
      }
      case 'doctor':
        return await cmdDoctor(dataDir, out);
      case 'setup': {
        if (positional.length) throw new UsageError('setup takes no arguments');
        const env = { ...process.env, MICROVM_DATA_DIR: dataDir };
        const found = await resolveFirmware({ env }).catch(() => undefined);
        if (found) {
          out({ libkrunfw: found.path, fetched: false }, `libkrunfw found: ${found.path}`);
          return 0;
        }
        const script = path.join(packageRoot, 'scripts', 'fetch-libkrunfw.sh');
        const dest = path.join(dataDir, 'libkrunfw');
        if (!json) process.stderr.write(`microvm: fetching Debian's libkrunfw5 into ${dest}\n`);
        const r = spawnSync('bash', [script, dest], {
          encoding: 'utf8',
          stdio: ['ignore', 'pipe', json ? 'pipe' : 'inherit'],
          timeout: 600_000,
        });
        if (r.status !== 0)
          throw coded(
            'ERR_MICROVM_LIBKRUNFW_NOT_FOUND',
            `fetching libkrunfw failed (${r.error ? r.error.message : `exit ${String(r.status)}`}). ${FIRMWARE_INSTALL_HINT}`,
          );
        const fw = await resolveFirmware({ env });
        out({ libkrunfw: fw.path, fetched: true }, `libkrunfw fetched: ${fw.path}`);
        return 0;
      }
      case 'bench':
        return await cmdBench(rest, dataDir, out);
      case 'exec': {
        const name = positional[0];
        const words = after;
        if (positional.length !== 1 || words.length === 0) throw new UsageError('exec takes NAME -- CMD...');
        const dir = vmDir(dataDir, name);
        const st = readState(dir);
        if (!st || !isRecordedProcess(st)) throw coded('ERR_MICROVM_VM_NOT_FOUND', `no running VM named ${name}`);
        const env = envFromArgs((values.env as string[] | undefined) ?? [], (m) => new UsageError(m));
        const agent = await connectVmAgent(dir, st.agentAcceptsLate === true);
        if (agent) {
          const tty = values.tty === true;
          const proc = agent.spawn(words, {
            env,
            cwd: values.workdir as string | undefined,
            user: values.user as string | undefined,
            tty: tty ? terminalSize() : undefined,
            stdin: values.interactive === true,
          });
          try {
            if (json) {
              const outs: Buffer[] = [];
              const errs: Buffer[] = [];
              proc.stdout.on('data', (d: Buffer) => outs.push(d));
              proc.stderr.on('data', (d: Buffer) => errs.push(d));
              proc.stdin?.end();
              const exit = await proc.exited;
              out({ stdout: Buffer.concat(outs).toString(), stderr: Buffer.concat(errs).toString(), ...exit }, '');
              return exit.exitCode ?? 128 + signalNumber(exit.signal as NodeJS.Signals);
            }
            return await attach(proc, { stdin: values.interactive === true, tty });
          } finally {
            agent.close();
          }
        }
        // No agent (a libkrun VM): SSH, when it was started with --ssh.
        const port = st.ports.find((p) => p.guest === 22)?.host;
        const keyFile = path.join(dir, 'ssh', 'id_ed25519');
        if (!port || !fs.existsSync(keyFile))
          throw coded('ERR_MICROVM_SSH_UNAVAILABLE', `${name} has no guest agent and was not started with --ssh`);
        if (values.interactive || values.tty || values.workdir || values.user)
          throw new UsageError('-i, -t, -w and -u need the guest agent (QEMU backend); this VM has SSH only');
        const client = await SshClient.connect({
          host: '127.0.0.1',
          port,
          username: 'root',
          privateKey: fs.readFileSync(keyFile, 'utf8'),
          hostKey: { knownHostsFile: path.join(dir, 'ssh', 'known_hosts') },
        });
        try {
          const quoted = words
            .map((w) => (/^[A-Za-z0-9_./:=@%+-]+$/.test(w) ? w : `'${w.replace(/'/g, `'\\''`)}'`))
            .join(' ');
          const r = await client.exec(quoted, { env });
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
      case 'cp': {
        if (positional.length !== 2) throw new UsageError('cp takes SRC DST, one of them NAME:/path');
        const isVm = (n: string): boolean => fs.existsSync(vmDirOf(dataDir, n));
        const [src, dst] = positional.map((p) => parseCpSide(p, isVm));
        if ('vm' in src === 'vm' in dst) {
          // NAME:/path where no VM has that name: say so rather than "one side is NAME:/path".
          const named = positional.map((p) => new RegExp(`^(${VM_NAME_PART}):/`).exec(p)?.[1]).find(Boolean);
          if (named && !('vm' in src) && !('vm' in dst))
            throw coded('ERR_MICROVM_VM_NOT_FOUND', `no VM named ${named} (cp ${positional.join(' ')})`);
          throw new UsageError('cp copies between a VM and the host: one side is NAME:/path');
        }
        // Ctrl-C / SIGTERM: the copy ends at once (whatever the agent does), nothing partial is
        // left, and we exit 128+N.
        const ac = new AbortController();
        let interrupted: NodeJS.Signals | undefined;
        const onSignal = (sig: NodeJS.Signals): void => {
          interrupted ??= sig;
          ac.abort();
        };
        const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
        for (const sig of signals) process.on(sig, onSignal);
        try {
          await copyBetween(
            src,
            dst,
            async (name) => {
              const dir = vmDir(dataDir, name);
              const st = readState(dir);
              if (!st || !isRecordedProcess(st)) throw coded('ERR_MICROVM_VM_NOT_FOUND', `no running VM named ${name}`);
              const agent = await connectVmAgent(dir, st.agentAcceptsLate === true);
              if (!agent) throw coded('ERR_MICROVM_AGENT_UNAVAILABLE', `${name} has no guest agent`);
              return agent;
            },
            ac.signal,
          );
        } catch (err) {
          if (!interrupted) throw err;
          process.stderr.write(`microvm: cp interrupted by ${interrupted}; nothing partial was left\n`);
          return 128 + signalNumber(interrupted);
        } finally {
          for (const sig of signals) process.removeListener(sig, onSignal);
        }
        out({ copied: true }, '');
        return 0;
      }
      default:
        throw new UsageError(`unknown command ${JSON.stringify(command)}`);
    }
  } catch (err) {
    if (err instanceof UsageError || (err as { code?: string }).code?.startsWith?.('ERR_PARSE_ARGS')) {
      if (json)
        process.stdout.write(
          `${JSON.stringify({ error: { code: usageCode(err), message: (err as Error).message } })}\n`,
        );
      process.stderr.write(
        `microvm: [${usageCode(err)}] ${(err as Error).message}\nRun 'microvm ${command} --help'.\n`,
      );
      return 2;
    }
    const e = asNoSpace(err, `microvm ${command}`) as Error & { code?: string };
    if (json) process.stdout.write(`${JSON.stringify({ error: { code: e.code ?? e.name, message: e.message } })}\n`);
    else process.stderr.write(`microvm: ${e.code ? `[${e.code}] ` : ''}${e.message}\n`);
    return 1;
  }
}
