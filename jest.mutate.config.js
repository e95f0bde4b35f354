/**
 * The test set `npm run mutate` (StrykerJS) runs against each mutant of the core modules: the unit
 * and double-backed tests that exercise them. No real VM boots and no CLI processes (they would
 * make a run take hours), except what those files do themselves.
 * @type {import('jest').Config}
 */
const base = require('./jest.config.js');
module.exports = {
  ...base,
  testMatch: [
    '<rootDir>/test/state.test.ts',
    '<rootDir>/test/pipeline/run.test.ts',
    '<rootDir>/test/ssh/client.test.ts',
    '<rootDir>/test/image/oci.test.ts',
    '<rootDir>/test/rootfs-hooks.test.ts',
    '<rootDir>/test/telemetry.test.ts',
    '<rootDir>/test/telemetry-contract.test.ts',
    '<rootDir>/test/validate.test.ts',
    '<rootDir>/test/vm.test.ts',
    '<rootDir>/test/wait-for.test.ts',
  ],
};
