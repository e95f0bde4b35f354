/**
 * A policy that needs the egress filter on a host where microvm-netguard.so is missing (a broken
 * install): preflight says so with its fix, and nothing starts (never an open network). The filter's
 * lookup is replaced here; everything else is the real pipeline up to preflight.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MicrovmError } from '../../lib/errors';
import { scratch } from '../helpers';

jest.mock('../../lib/backends/qemu/shipped', () => ({
  ...jest.requireActual<object>('../../lib/backends/qemu/shipped'),
  netGuardPath: (): string => {
    throw new MicrovmError('ERR_MICROVM_EGRESS_GUARD', 'microvm-netguard.so was not found (looked in /nowhere)');
  },
}));

// After the mock: run() imports the filter's lookup from the mocked module.
// eslint-disable-next-line @typescript-eslint/no-require-imports
const { qemuBackend, run } = require('../../lib') as typeof import('../../lib');

test('rules that need the filter: ERR_MICROVM_PREFLIGHT naming egress-filter and its fix; no VM directory', async () => {
  const s = scratch('microvm-netguard-missing-');
  try {
    fs.mkdirSync(path.join(s.dir, 'root', 'bin'), { recursive: true });
    let err: unknown;
    try {
      await run('img', {
        rootfsPath: path.join(s.dir, 'root'),
        dataDir: path.join(s.dir, 'data'),
        backend: qemuBackend({ accel: 'tcg' }),
        initOverride: ['/bin/true'],
        egress: { allow: [{ cidr: '192.0.2.0/24' }] },
      });
    } catch (e) {
      err = e;
    }
    expect(err).toMatchObject({ code: 'ERR_MICROVM_PREFLIGHT' });
    expect((err as { failures: { name: string; message: string; remediation: string }[] }).failures).toContainEqual(
      expect.objectContaining({
        name: 'egress-filter',
        message: expect.stringContaining('microvm-netguard.so was not found'),
        remediation: expect.stringContaining('npm rebuild node-microvm'),
      }),
    );
    const vms = path.join(s.dir, 'data', 'vms');
    expect(fs.existsSync(vms) ? fs.readdirSync(vms) : []).toEqual([]);
  } finally {
    s.cleanup();
  }
});

test('a relayed allow-list alone needs no filter: the check is not there', async () => {
  const s = scratch('microvm-netguard-missing-');
  try {
    let err: unknown;
    try {
      await run('img', {
        rootfsPath: path.join(s.dir, 'absent-root'),
        dataDir: path.join(s.dir, 'data'),
        backend: qemuBackend({ accel: 'tcg' }),
        initOverride: ['/bin/true'],
        egress: { allow: [{ host: 'svc.test', port: 80 }] },
      });
    } catch (e) {
      err = e;
    }
    // It gets past preflight (and fails later, on the missing root), never on the filter.
    expect((err as { failures?: { name: string }[] }).failures?.map((f) => f.name) ?? []).not.toContain(
      'egress-filter',
    );
    expect(err).toBeInstanceOf(Error);
  } finally {
    s.cleanup();
  }
});
