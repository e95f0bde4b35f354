#!/usr/bin/env node
// The cost of recording output arrival times (run({ outputTimes }), for `microvm logs --since`):
// the guest init relays the command's stdout/stderr through pipes (splice) and notes each chunk's
// time, against the command writing straight to the ports. Same run, alternating, QEMU backend
// (TCG when there is no KVM). Two commands: 32 MiB in large writes, and 20,000 lines from a shell
// loop (one write each). Measures run() start to the VM's exit. Prints a table; asserts nothing.
//
// Usage: node bench/output.js [rounds=5]     (after scripts/setup.sh)
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { setup, median, main, small } = require('./common');

const rounds = Number(process.argv[2] || 5);
const { m, work, image, done } = setup('output');
const [MIB, LINES] = small ? [2, 1000] : [32, 20000];
const COMMANDS = {
  [`${MIB} MiB, large writes`]: ['/bin/sh', '-c', `head -c ${MIB * 1048576} /dev/zero`],
  [`${LINES.toLocaleString('en')} lines, one write each`]: [
    '/bin/sh',
    '-c',
    `i=0; while [ $i -lt ${LINES} ]; do echo line $i; i=$((i+1)); done`,
  ],
};

main(async () => {
  const times = {};
  for (let r = 0; r < rounds; r++) {
    for (const [label, cmd] of Object.entries(COMMANDS)) {
      // Alternate which goes first, so a drift of the machine's speed hits both alike.
      const order = r % 2 ? [true, false] : [false, true];
      for (const outputTimes of order) {
        const t0 = performance.now();
        const vm = await m.run('bench', {
          rootfsPath: image,
          backend: 'qemu',
          dataDir: path.join(work, 'data'),
          name: `o${r}${outputTimes ? 't' : 'n'}`,
          initOverride: cmd,
          agent: false,
          outputTimes,
        });
        const end = await vm.wait();
        const ms = performance.now() - t0;
        const bytes = fs.statSync(vm.stdoutPath).size;
        await vm.remove();
        if (end.reason !== 'exited' || end.exitCode !== 0) throw new Error(`${label}: ${JSON.stringify(end)}`);
        ((times[label] ??= {})[outputTimes] ??= []).push(ms);
        process.stderr.write(`${label} outputTimes=${outputTimes}: ${Math.round(ms)} ms, ${bytes} bytes\n`);
      }
    }
  }
  console.log(`\nrun() start -> exit, median of ${rounds} (QEMU backend)\n`);
  console.log(`${'command'.padEnd(30)} ${'straight'.padStart(10)} ${'relayed'.padStart(10)} ${'ratio'.padStart(7)}`);
  for (const [label, t] of Object.entries(times)) {
    const a = median(t.false);
    const b = median(t.true);
    console.log(
      `${label.padEnd(30)} ${`${Math.round(a)} ms`.padStart(10)} ${`${Math.round(b)} ms`.padStart(10)} ${(b / a).toFixed(2).padStart(6)}x`,
    );
  }
}, done);
