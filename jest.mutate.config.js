/**
 * The test set `npm run mutate` (StrykerJS) runs against each mutant of the core modules: the unit
 * tests that exercise them directly. No real VM boots, no CLI processes and not the run() pipeline
 * tests (each spawns runner processes; with them a run takes hours on 2 cores). npm test runs all.
 * @type {import('jest').Config}
 */
const base = require('./jest.config.js');

// Tests that boot real VMs skip in this run (test/helpers.ts qemuSkipReason); npm test runs them.
process.env.MICROVM_MUTATION_RUN = '1';
module.exports = {
  ...base,
  testMatch: [
    '<rootDir>/test/state.test.ts',
    '<rootDir>/test/ssh/client.test.ts',
    '<rootDir>/test/image/oci.test.ts',
    '<rootDir>/test/rootfs-hooks.test.ts',
    '<rootDir>/test/telemetry.test.ts',
    '<rootDir>/test/telemetry-contract.test.ts',
    '<rootDir>/test/validate.test.ts',
    '<rootDir>/test/vm.test.ts',
    '<rootDir>/test/vm-agent.test.ts',
    '<rootDir>/test/agent/client.test.ts',
    '<rootDir>/test/stats.test.ts',
    '<rootDir>/test/wait-for.test.ts',
  ],
};
