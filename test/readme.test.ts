/**
 * README code blocks marked `<!-- runnable ... -->` run as written on this Node (the engines floor
 * is Node 20), from an app whose node_modules/node-microvm is this checkout, booting a real VM.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { packageRoot } from '../lib/native';
import { layoutSkipReason, qemuSkipReason, scratch } from './helpers';

const readme = fs.readFileSync(path.join(packageRoot, 'README.md'), 'utf8');
const blocks = [...readme.matchAll(/<!-- runnable[^>]*-->\n```js\n([\s\S]*?)\n```/g)].map((m) => m[1]);
const skip = qemuSkipReason() ?? (process.env.MICROVM_TEST_LAYOUT ? undefined : layoutSkipReason());

describe('README examples', () => {
  test('there is at least one runnable block', () => {
    expect(blocks.length).toBeGreaterThanOrEqual(1);
  });

  (skip ? test.skip : test).each(blocks.map((code, i) => [i, code]))(
    `runnable block %i runs as written and exits 0${skip ? ` [skipped: ${skip}]` : ''}`,
    (_i, code) => {
      const s = scratch('microvm-readme-');
      try {
        fs.mkdirSync(path.join(s.dir, 'node_modules'));
        fs.symlinkSync(packageRoot, path.join(s.dir, 'node_modules', 'node-microvm'));
        fs.writeFileSync(path.join(s.dir, 'example.js'), code);
        const r = spawnSync(
          process.execPath,
          [path.join(s.dir, 'example.js'), `oci:${process.env.MICROVM_TEST_LAYOUT as string}:test`],
          {
            cwd: s.dir,
            encoding: 'utf8',
            timeout: 180_000,
            env: {
              ...process.env,
              MICROVM_DATA_DIR: path.join(s.dir, 'data'),
              MICROVM_LIBKRUNFW_DIR: process.env.MICROVM_TEST_LIBKRUNFW_DIR,
            },
          },
        );
        expect({ status: r.status, stderr: r.stderr }).toEqual({ status: 0, stderr: '' });
        expect(r.stdout).toMatch(/^running guest port 80 is 127\.0\.0\.1:\d+\n/);
        expect(r.stdout).toContain("{ reason: 'stopped', exitCode: null, signal: 'SIGTERM' }");
        expect(fs.readdirSync(path.join(s.dir, 'data', 'vms'))).toEqual([]);
      } finally {
        s.cleanup();
      }
    },
    200_000,
  );
});
