/**
 * The egress policy option: validation, and the pieces the QEMU backend enforces an allow-list
 * with (docs/security.md, "Network egress").
 *
 * How an allow-list is enforced (QEMU user networking): the guest's network is `restrict=on`, so
 * nothing it sends leaves QEMU, whatever it does to its routes, resolver or MTU. Each allowed host
 * gets a virtual address in QEMU's network (10.0.2.100 and up), written to the guest's /etc/hosts
 * by its init; for each allowed port QEMU hands a connection to that address and port to a relay
 * process on the host (`guestfwd ... cmd:`), which connects to the real host and port and nothing
 * else, and appends one line per connection to the VM's `egress.log`. The guest can only reach
 * what a relay was started for.
 */
import { isIP } from 'node:net';
import * as path from 'node:path';
import type { EgressMode, EgressPolicy, EgressRule } from '../backends/types';
import { MicrovmError } from '../errors';
import * as v from '../validate';

/** At most this many rules (each is one forward in QEMU), and distinct hosts (virtual addresses). */
export const MAX_EGRESS_RULES = 64;
const FIRST_VIRTUAL = 100; // 10.0.2.100: clear of QEMU's .2 (host), .3 (DNS), .15 (guest)

/** Host names as DNS has them: letters, digits and hyphens in labels of 1-63, dots between. */
const HOST_RE =
  /^(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

/** The `egress` option, checked: a TypeError or RangeError (coded) that names the bad rule. */
export function parseEgress(value: unknown): EgressPolicy {
  if (value === undefined) return 'allow';
  if (value === 'allow' || value === 'deny') return value;
  if (typeof value === 'string')
    throw v.rangeError(`Expected 'allow', 'deny' or { allow: [...] } for egress but received ${v.describe(value)}`);
  const o = v.object('egress', value);
  v.knownKeys('egress', o, ['allow']);
  if (!Array.isArray(o.allow)) throw v.typeError(`egress.allow must be an array of { host, port } rules`);
  if (o.allow.length > MAX_EGRESS_RULES)
    throw v.rangeError(`egress.allow has ${o.allow.length} rules; at most ${MAX_EGRESS_RULES}`);
  const seen = new Set<string>();
  const rules = o.allow.map((raw, i): EgressRule => {
    const name = `egress.allow[${i}]`;
    const r = v.object(name, raw);
    v.knownKeys(name, r, ['host', 'port', 'address']);
    const host = v.string(`${name}.host`, r.host, { maxLength: 253 }).toLowerCase();
    if (host.includes('*'))
      throw v.rangeError(
        `${name}.host ${JSON.stringify(host)}: wildcards need a filtering resolver, which this backend does not have yet; list each name`,
      );
    if (isIP(host))
      throw v.rangeError(
        `${name}.host ${JSON.stringify(host)} is an address: give the name the guest will use, and the address as ${name}.address`,
      );
    if (!HOST_RE.test(host) || /^\d+$/.test(host.split('.').pop() as string))
      throw v.rangeError(`${name}.host ${JSON.stringify(host)} is not a host name`);
    const port = v.integer(`${name}.port`, r.port, 1, 65535);
    let address: string | undefined;
    if (r.address !== undefined) {
      address = v.string(`${name}.address`, r.address, { maxLength: 45 });
      if (!isIP(address)) throw v.rangeError(`${name}.address ${JSON.stringify(address)} is not an IP address`);
    }
    const key = `${host}:${port}`;
    if (seen.has(key)) throw v.rangeError(`${name}: ${key} is listed twice`);
    seen.add(key);
    return address === undefined ? { host, port } : { host, port, address };
  });
  const hosts = new Set(rules.map((r) => r.host));
  for (const h of hosts) {
    const addrs = new Set(rules.filter((r) => r.host === h).map((r) => r.address ?? ''));
    if (addrs.size > 1) throw v.rangeError(`egress.allow: ${h} is given different addresses`);
  }
  return { allow: rules };
}

/** What kind of policy `p` is. */
export function egressMode(p: EgressPolicy): EgressMode {
  return typeof p === 'string' ? p : 'allow-list';
}

/** The rules of an allow-list policy; undefined for 'allow', 'deny' or none. */
export function allowListOf(p: EgressPolicy | undefined): readonly EgressRule[] | undefined {
  return typeof p === 'object' ? p.allow : undefined;
}

/** How a policy reads in a span attribute or a message: `allow`, `deny`, `allow-list(2)`. */
export function describeEgress(p: EgressPolicy): string {
  return typeof p === 'string' ? p : `allow-list(${p.allow.length})`;
}

/** Each allowed host's virtual address in QEMU's network, in the order the rules name them. */
export function virtualHosts(rules: readonly EgressRule[]): { host: string; ip: string }[] {
  const out: { host: string; ip: string }[] = [];
  for (const r of rules)
    if (!out.some((x) => x.host === r.host)) out.push({ host: r.host, ip: `10.0.2.${FIRST_VIRTUAL + out.length}` });
  return out;
}

/**
 * QEMU `-netdev user` parameters for an allow-list: one `guestfwd` per rule, handing each guest
 * connection to `node relay.js HOST PORT ADDRESS LOG`. Paths go into QEMU's option string and a
 * shell-like command line: they must not hold commas, spaces or quotes (ERR_MICROVM_EGRESS_RELAY).
 */
export function guestForwards(
  rules: readonly EgressRule[],
  relay: { node: string; script: string; log: string },
): string {
  for (const p of [relay.node, relay.script, relay.log])
    if (!path.isAbsolute(p) || /[\s,'"\\]/.test(p))
      throw new MicrovmError(
        'ERR_MICROVM_EGRESS_RELAY',
        `An allow-list needs paths without spaces, commas, quotes or backslashes for its relay: ${JSON.stringify(p)}`,
      );
  const ips = new Map(virtualHosts(rules).map((x) => [x.host, x.ip]));
  return rules
    .map(
      (r) =>
        `,guestfwd=tcp:${ips.get(r.host)}:${r.port}-cmd:${relay.node} ${relay.script} ${r.host} ${r.port} ${r.address ?? '-'} ${relay.log}`,
    )
    .join('');
}
