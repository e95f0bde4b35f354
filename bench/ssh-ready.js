#!/usr/bin/env node
// SSH readiness detection latency: the time waitForReady() returns minus the moment the server
// starts accepting, over N trials with a random start delay of 0.2–3 s, against a real ssh2 server
// on 127.0.0.1. Compared in the same run with fixed 2 s and 200 ms poll intervals (the anchor's
// style). Also reports the most probes ever in flight at once. Prints a table; asserts nothing.
//
// Usage: node bench/ssh-ready.js [trials=20]      (after `npm run build:ts`)
'use strict';
const net = require('node:net');
const { Server, utils } = require('ssh2');

const { root, main, pct, small } = require('./common');

const m = require(root);
const trials = Number(process.argv[2] || 20);
const key = m.generateKeyPair();
const host = utils.generateKeyPairSync('ed25519');

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
  });
}

function startServerAt(port) {
  return new Promise((resolve) => {
    const server = new Server({ hostKeys: [host.private] }, (client) => {
      client.setNoDelay(true); // as OpenSSH and dropbear do
      client.on('error', () => undefined);
      client.on('authentication', (ctx) => ctx.accept());
      client.on('ready', () => undefined);
    });
    server.listen(port, '127.0.0.1', () => resolve({ server, acceptingAt: performance.now() }));
  });
}

async function trial(schedule) {
  const port = await freePort();
  const delay = 200 + Math.random() * 2800;
  let started;
  const timer = setTimeout(() => {
    started = startServerAt(port);
  }, delay);
  let inFlight = 0;
  let maxInFlight = 0;
  const connect = async (o) => {
    inFlight++;
    maxInFlight = Math.max(maxInFlight, inFlight);
    try {
      return await m.SshClient.connect(o);
    } finally {
      inFlight--;
    }
  };
  const client = await m.waitForReady({
    host: '127.0.0.1',
    port,
    username: 'bench',
    privateKey: key.privateKey,
    hostKey: { insecureAcceptAny: true },
    timeoutMs: 20000,
    connect,
    ...schedule,
  });
  const readyAt = performance.now();
  clearTimeout(timer);
  const { server, acceptingAt } = await started;
  client.close();
  server.close();
  return { latency: readyAt - acceptingAt, maxInFlight };
}

main(async () => {
  const schedules = [
    ['node-microvm default (10 ms growing to 50 ms)', {}],
    ['fixed 200 ms interval', { initialIntervalMs: 200, maxIntervalMs: 200, backoff: 1 }],
    // (left out of the smoke run: each trial waits up to 2 s)
    ...(small
      ? []
      : [['fixed 2 s interval (seed trace)', { initialIntervalMs: 2000, maxIntervalMs: 2000, backoff: 1 }]]),
  ];
  const rows = [];
  for (const [label, schedule] of schedules) {
    const lat = [];
    let maxInFlight = 0;
    for (let i = 0; i < trials; i++) {
      const r = await trial(schedule);
      lat.push(r.latency);
      maxInFlight = Math.max(maxInFlight, r.maxInFlight);
    }
    rows.push({ label, p50: pct(lat, 0.5), p90: pct(lat, 0.9), max: Math.max(...lat), maxInFlight });
  }
  const base = rows[0].p50;
  console.log(
    `SSH readiness detection latency, ${trials} trials each, server start delay 0.2-3 s (ssh2 server, 127.0.0.1)`,
  );
  console.log('| schedule | median ms | p90 ms | max ms | vs default | max probes in flight |');
  console.log('|---|---:|---:|---:|---:|---:|');
  for (const r of rows)
    console.log(
      `| ${r.label} | ${r.p50.toFixed(1)} | ${r.p90.toFixed(1)} | ${r.max.toFixed(1)} | ${(r.p50 / base).toFixed(1)}x | ${r.maxInFlight} |`,
    );
});
