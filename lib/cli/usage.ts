/** The CLI's help texts, by command ('' is the overview). */
export const USAGE: Record<string, string> = {
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
  pause NAME...           stop VMs' vCPUs, keeping their state (QEMU backend); unpause NAME... resumes
  stats [NAME...]         CPU, memory, disk and network of running VMs (--no-stream: once)
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
  --idle              run no command: the VM serves exec and cp until stopped (the sandbox pattern:
                      microvm run -d --idle --name box IMAGE; microvm exec box -- CMD); exec runs
                      with the image's Env, WorkingDir and User
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
  pause: `microvm pause NAME... [--data-dir DIR] [--json]

Stops each VM's vCPUs; its memory, processes and connections stay as they are until
\`microvm unpause\`. ps shows it as paused; exec, cp and file requests on it fail with
ERR_MICROVM_VM_PAUSED; stop still works. QEMU backend (ERR_MICROVM_SNAPSHOT_UNSUPPORTED on libkrun).
--json: an array of {name, paused[, error]}.`,
  stats: `microvm stats [NAME...] [--no-stream] [--data-dir DIR] [--json]

What each running VM (all of them when no NAME is given) costs and uses, refreshed every second
until Ctrl-C (--no-stream, or --json: once, after a second for the CPU rate). Columns: CPU % of
one core (the VM's processes on the host: hypervisor and helpers), MEM (HOST): their resident
memory, GUEST MEM: used / total as the guest sees it, DISK: what the VM's directory takes,
NET RX / TX: the guest's counters, PIDS: its host processes. The guest columns come through its
agent ('-' without one, or while paused). --json: an array of {name, cpuPercent, host, disk, guest}.`,
  unpause: `microvm unpause NAME... [--data-dir DIR] [--json]

Lets paused VMs run again. --json: an array of {name, paused[, error]}.`,
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
