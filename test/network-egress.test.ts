/**
 * lib/network/egress.ts's pieces without a VM: the policy kinds, the virtual addresses and the QEMU
 * forwards an allow-list becomes, and the paths a relay may not have.
 */
import { describeEgress, egressMode, guestForwards, virtualHosts } from '../lib/network/egress';

const rules = [
  { host: 'api.test', port: 443 },
  { host: 'db.test', port: 5432, address: '192.0.2.7' },
  { host: 'api.test', port: 80 },
];
const relay = { node: '/usr/bin/node', script: '/opt/m/dist/network/relay.js', log: '/data/vms/x/egress.log' };

test('kinds and descriptions', () => {
  expect([egressMode('allow'), egressMode('deny'), egressMode({ allow: rules })]).toEqual([
    'allow',
    'deny',
    'allow-list',
  ]);
  expect([describeEgress('allow'), describeEgress('deny'), describeEgress({ allow: rules })]).toEqual([
    'allow',
    'deny',
    'allow-list(3)',
  ]);
});

test('one virtual address per name, from 10.0.2.100, in the order the rules name them', () => {
  expect(virtualHosts(rules)).toEqual([
    { host: 'api.test', ip: '10.0.2.100' },
    { host: 'db.test', ip: '10.0.2.101' },
  ]);
  expect(virtualHosts([])).toEqual([]);
});

test("one guestfwd per rule, to the name's virtual address, handing the connection to the relay", () => {
  expect(guestForwards(rules, relay)).toBe(
    ',guestfwd=tcp:10.0.2.100:443-cmd:/usr/bin/node /opt/m/dist/network/relay.js api.test 443 - /data/vms/x/egress.log' +
      ',guestfwd=tcp:10.0.2.101:5432-cmd:/usr/bin/node /opt/m/dist/network/relay.js db.test 5432 192.0.2.7 /data/vms/x/egress.log' +
      ',guestfwd=tcp:10.0.2.100:80-cmd:/usr/bin/node /opt/m/dist/network/relay.js api.test 80 - /data/vms/x/egress.log',
  );
});

test.each([
  ['node', '/opt/my node/bin/node'],
  ['script', '/opt/a,b/relay.js'],
  ['log', "/data/it's/egress.log"],
  ['log', 'relative/egress.log'],
  ['script', '/opt/back\\slash/relay.js'],
])('a relay %s path %j that QEMU or its command line would split is refused: ERR_MICROVM_EGRESS_RELAY', (key, p) => {
  expect(() => guestForwards(rules, { ...relay, [key]: p })).toThrow(
    expect.objectContaining({ code: 'ERR_MICROVM_EGRESS_RELAY', message: expect.stringContaining(JSON.stringify(p)) }),
  );
});
