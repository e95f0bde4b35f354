#!/usr/bin/env node
'use strict';
// A closed stdout (`microvm logs -f NAME | head`) ends the command quietly, as in other CLIs.
process.stdout.on('error', (err) => {
  if (err.code === 'EPIPE') process.exit(0);
  throw err;
});
require('../dist/cli/main.js')
  .main(process.argv.slice(2))
  .then((code) => {
    process.exitCode = code;
  });
