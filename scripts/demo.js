#!/usr/bin/env node
// The README's main command (after scripts/setup.sh): builds a small OCI image (busybox-static +
// dropbear from this machine's Debian packages, packed by umoci), boots a VM from it, waits for
// SSH, runs a command in it (through the guest agent; SSH stays up beside it), and prints the
// output and the startup trace. Backend: libkrun with KVM when available, otherwise QEMU (software
// emulation when there is no KVM).
//
//   node scripts/demo.js [command...]      default command: uname -a; cat /etc/layer2
'use strict';
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } = require('@opentelemetry/sdk-trace-base');

const root = path.resolve(__dirname, '..');
const m = require(root);

(async () => {
  const tree = path.join(root, '.demo', 'rootfs');
  const layout = path.join(root, '.demo', 'oci');
  if (!fs.existsSync(layout)) {
    fs.mkdirSync(path.dirname(tree), { recursive: true });
    if (!fs.existsSync(tree))
      execFileSync('bash', [path.join(__dirname, 'make-test-image.sh'), tree], {
        stdio: ['ignore', 'ignore', 'inherit'],
      });
    execFileSync('bash', [path.join(__dirname, 'make-test-layout.sh'), tree, layout, 'demo'], {
      stdio: ['ignore', 'ignore', 'inherit'],
    });
  }
  const command = process.argv.slice(2).join(' ') || 'uname -a; cat /etc/layer2';
  const exporter = new InMemorySpanExporter();
  const tracerProvider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
  const vm = await m.run(`oci:${layout}:demo`, {
    dataDir: path.join(root, '.demo', 'data'),
    name: 'demo',
    cleanDataDir: true,
    initOverride: ['/usr/sbin/dropbear', '-F', '-E', '-r', '/etc/dropbear/dropbear_ed25519_host_key', '-p', '22'],
    ssh: { timeoutMs: 120000 },
    tracerProvider,
  });
  try {
    console.log(`VM ${vm.name} is up (backend ${vm.backend}, rootfs clone ${vm.cloneStrategy}); running: ${command}\n`);
    const r = await vm.exec(command);
    process.stdout.write(r.stdout);
    process.stderr.write(r.stderr);
    console.log(`\nexit code: ${r.exitCode}\n\nStartup trace:\n${m.formatSpanTree(exporter.getFinishedSpans())}`);
    process.exitCode = r.exitCode ?? 1;
  } finally {
    await vm.remove();
  }
})().catch((err) => {
  console.error(`demo failed: ${err.code ? `[${err.code}] ` : ''}${err.message}`);
  process.exit(1);
});
