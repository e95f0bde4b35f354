/**
 * lib/network/egress.ts's and policy.ts's pieces without a VM: the policy kinds, the virtual addresses and the QEMU
 * forwards an allow-list becomes, and the paths a relay may not have.
 */
import { guardPolicy, guestForwards, parseEgress, relayRules, parseResolver } from '../lib/network/egress';
import { allowListOf, describeEgress, egressMode, needsGuard, planEgress, virtualHosts } from '../lib/network/policy';

const rules = [
  { host: 'api.test', port: 443 },
  { host: 'db.test', port: 5432, address: '192.0.2.7' },
  { host: 'api.test', port: 80 },
];
const relay = { runner: '/opt/m/build/Release/microvm-runner', socket: '/data/vms/x/relay.sock' };

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

test("one guestfwd per rule, to the name's virtual address, handing the connection to the VM's relay as rule N", () => {
  expect(guestForwards(rules, relay)).toBe(
    ',guestfwd=tcp:10.0.2.100:443-cmd:/opt/m/build/Release/microvm-runner --relay-connect /data/vms/x/relay.sock 0' +
      ',guestfwd=tcp:10.0.2.101:5432-cmd:/opt/m/build/Release/microvm-runner --relay-connect /data/vms/x/relay.sock 1' +
      ',guestfwd=tcp:10.0.2.100:80-cmd:/opt/m/build/Release/microvm-runner --relay-connect /data/vms/x/relay.sock 2',
  );
  expect(JSON.parse(relayRules(rules))).toEqual([
    { host: 'api.test', port: 443, address: null },
    { host: 'db.test', port: 5432, address: '192.0.2.7' },
    { host: 'api.test', port: 80, address: null },
  ]);
});

test.each([
  ['runner', '/opt/my node/bin/microvm-runner'],
  ['runner', '/opt/a,b/microvm-runner'],
  ['socket', "/data/it's/relay.sock"],
  ['socket', 'relative/relay.sock'],
  ['runner', '/opt/back\\slash/microvm-runner'],
])('a relay %s path %j that QEMU or its command line would split is refused: ERR_MICROVM_EGRESS_RELAY', (key, p) => {
  expect(() => guestForwards(rules, { ...relay, [key]: p })).toThrow(
    expect.objectContaining({ code: 'ERR_MICROVM_EGRESS_RELAY', message: expect.stringContaining(JSON.stringify(p)) }),
  );
});

test('rules beyond relayed names: normalized, and which need the filter in QEMU', () => {
  const p = parseEgress({
    allow: [
      { cidr: '10.1.2.3' },
      { host: '*.Svc.Test', port: 8080 },
      { host: 'api.test', port: 443 },
      { cidr: '2001:DB8::/32', protocol: 'udp' },
    ],
    deny: [{ host: 'bad.svc.test' }],
    dns: '[::1]:5353',
  });
  expect(p).toEqual({
    allow: [
      { cidr: '10.1.2.3/32' },
      { host: '*.svc.test', port: 8080 },
      { host: 'api.test', port: 443 },
      { cidr: '2001:db8::/32', protocol: 'udp' },
    ],
    deny: [{ host: 'bad.svc.test' }],
    dns: '[::1]:5353',
  });
  expect(describeEgress(p)).toBe('rules(allow 4, deny 1, dns [::1]:5353)');
  expect(allowListOf(p)).toEqual([{ host: 'api.test', port: 443 }]); // the relayed one
  expect([
    needsGuard(p),
    needsGuard({ allow: rules }),
    needsGuard('deny'),
    needsGuard({ deny: [] }),
    needsGuard({ dns: '10.0.0.1' }),
  ]).toEqual([true, false, false, false, true]);
  expect(guardPolicy(p as Exclude<typeof p, string>, { log: '/d/egress.log', ready: '/d/ready' }).split('\n')).toEqual([
    'default deny',
    'log /d/egress.log',
    'ready /d/ready',
    'upstream ::1 5353',
    'rule deny host bad.svc.test 0 any egress.deny[0]',
    'rule allow cidr 10.1.2.3/32 0 any egress.allow[0]',
    'rule allow suffix .svc.test 8080 any egress.allow[1]',
    'rule allow cidr 2001:db8::/32 0 udp egress.allow[3]',
    '',
  ]);
  // Only deny rules: what they do not name stays allowed.
  expect(guardPolicy({ deny: [{ cidr: '10.0.0.0/8' }] }, { log: '/l', ready: '/r' })).toMatch(/^default allow\n/);
  expect(() => guardPolicy({ deny: [] }, { log: 'relative', ready: '/r' })).toThrow(/Bad path/);
  expect(parseResolver('10.0.0.1')).toEqual({ ip: '10.0.0.1', port: 53 });
  expect([parseResolver('10.0.0.1:0'), parseResolver('[::1]'), parseResolver('::1:53'), parseResolver('x:53')]).toEqual(
    [undefined, undefined, { ip: '::1:53', port: 53 }, undefined],
  );
  expect(() => parseEgress({})).toThrow(/egress needs allow or deny rules/);
  expect(() => parseEgress({ allow: [{ host: 'a.test', cidr: '10.0.0.0/8' }] })).toThrow(
    /exactly one of host and cidr/,
  );
});

test('planEgress resolves a policy once: what relays serve, whether the filter is needed, the filter rules', () => {
  const open = planEgress(undefined);
  expect([open.mode, open.description, open.relayed, open.needsFilter, open.filterRules]).toEqual([
    'allow',
    'allow',
    undefined,
    false,
    undefined,
  ]);
  const deny = planEgress('deny');
  expect([deny.mode, deny.relayed, deny.needsFilter, deny.filterRules]).toEqual([
    'deny',
    undefined,
    false,
    { allow: [] },
  ]);
  const mixed = parseEgress({ allow: [...rules, { cidr: '203.0.113.0/24' }], deny: [{ host: 'bad.test' }] });
  const plan = planEgress(mixed);
  expect(plan.mode).toBe('allow-list');
  expect(plan.description).toBe('rules(allow 4, deny 1)');
  expect(plan.relayed).toEqual(rules);
  expect(plan.virtualHosts).toEqual([
    { host: 'api.test', ip: '10.0.2.100' },
    { host: 'db.test', ip: '10.0.2.101' },
  ]);
  expect(plan.needsFilter).toBe(true);
  expect(plan.filterRules).toBe(mixed);
  expect(plan.addressOverride).toEqual({ host: 'db.test', port: 5432, address: '192.0.2.7' });
  const relayedOnly = planEgress(parseEgress({ allow: [rules[0]] }));
  expect([relayedOnly.needsFilter, relayedOnly.addressOverride]).toEqual([false, undefined]);
});
