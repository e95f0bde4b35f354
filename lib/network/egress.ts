/**
 * The egress policy option: validation, and the files and arguments the backends enforce it with
 * (docs/security.md, "Network egress"); what a policy means for enforcement is resolved once, in
 * ./policy.ts.
 *
 * How an allow-list is enforced (QEMU user networking): the guest's network is `restrict=on`, so
 * nothing it sends leaves QEMU, whatever it does to its routes, resolver or MTU. Each allowed host
 * gets a virtual address in QEMU's network (10.0.2.100 and up), written to the guest's /etc/hosts
 * by its init; for each allowed port QEMU hands a connection to that address and port to a relay
 * process on the host (`guestfwd ... cmd:`), which connects to the real host and port and nothing
 * else, and appends one line per connection to the VM's `egress.log`. The guest can only reach
 * what a relay was started for.
 *
 * Rules that a relay cannot serve (address ranges, wildcard or port-less names, deny rules, a
 * resolver) need the egress filter (native/preload/net_guard.cc): QEMU's network is then not restricted,
 * and the filter, preloaded into QEMU, decides every connection, datagram and DNS question that
 * leaves it; relayed names keep their relays beside it.
 */
import * as fs from 'node:fs';
import { BlockList, isIP } from 'node:net';
import * as path from 'node:path';
import type { EgressPolicy, EgressRule } from '../backends/types';
import { isRelayed, virtualHosts } from './policy';
import { MicrovmError } from '../errors';
import * as v from '../validate';

/** At most this many rules (each is one forward in QEMU), and distinct hosts (virtual addresses). */
export const MAX_EGRESS_RULES = 64;

/** Host names as DNS has them: letters, digits and hyphens in labels of 1-63, dots between. */
const HOST_RE =
  /^(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

/** `*.` and a host name: every name below it. */
const WILDCARD_RE = /^\*\.(.+)$/;

function parseRule(name: string, raw: unknown, verdict: 'allow' | 'deny'): EgressRule {
  const r = v.object(name, raw);
  v.knownKeys(name, r, ['host', 'cidr', 'port', 'protocol', 'address']);
  if ((r.host === undefined) === (r.cidr === undefined))
    throw v.typeError(`${name} needs exactly one of host and cidr`);
  const out: EgressRule = {};
  if (r.host !== undefined) {
    const host = v.string(`${name}.host`, r.host, { maxLength: 253 }).toLowerCase();
    if (isIP(host))
      throw v.rangeError(
        `${name}.host ${JSON.stringify(host)} is an address: use { cidr: '${host}' }, or give the name the guest will use and the address as ${name}.address`,
      );
    const bare = WILDCARD_RE.exec(host)?.[1] ?? host;
    if (!HOST_RE.test(bare) || /^\d+$/.test(bare.split('.').pop() as string))
      throw v.rangeError(
        `${name}.host ${JSON.stringify(host)} is not a host name${host.includes('*') ? ' (a wildcard is "*." before a name)' : ''}`,
      );
    out.host = host;
  } else {
    const cidr = v.string(`${name}.cidr`, r.cidr, { maxLength: 49 }).toLowerCase();
    const [ip, bits, more] = cidr.split('/');
    const family = isIP(ip);
    const max = family === 6 ? 128 : 32;
    if (!family || more !== undefined || (bits !== undefined && (!/^\d{1,3}$/.test(bits) || Number(bits) > max)))
      throw v.rangeError(
        `${name}.cidr ${JSON.stringify(cidr)} is not an address or a network (203.0.113.0/24, 2001:db8::/32)`,
      );
    out.cidr = bits === undefined ? `${ip}/${max}` : cidr;
  }
  if (r.port !== undefined) out.port = v.integer(`${name}.port`, r.port, 1, 65535);
  if (r.protocol !== undefined) {
    if (r.protocol !== 'tcp' && r.protocol !== 'udp')
      throw v.rangeError(`${name}.protocol must be 'tcp' or 'udp', not ${v.describe(r.protocol)}`);
    out.protocol = r.protocol;
  }
  if (r.address !== undefined) {
    if (verdict !== 'allow' || !isRelayed({ ...out, address: '' }))
      throw v.rangeError(`${name}.address goes with an allowed host name, a port, and TCP only`);
    const address = v.string(`${name}.address`, r.address, { maxLength: 45 });
    if (!isIP(address)) throw v.rangeError(`${name}.address ${JSON.stringify(address)} is not an IP address`);
    out.address = address;
  }
  return out;
}

/** `IP` or `IP:PORT` (`[IPv6]:PORT`) of a resolver; undefined when it is not one. */
export function parseResolver(value: string): { ip: string; port: number } | undefined {
  if (isIP(value)) return { ip: value, port: 53 };
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([0-9.]+)):(\d{1,5})$/.exec(value);
  const ip = m?.[1] ?? m?.[2];
  if (!m || !ip || !isIP(ip) || Number(m[3]) < 1 || Number(m[3]) > 65535) return undefined;
  return { ip, port: Number(m[3]) };
}

/** The `egress` option, checked: a TypeError or RangeError (coded) that names the bad rule. */
export function parseEgress(value: unknown): EgressPolicy {
  if (value === undefined) return 'allow';
  if (value === 'allow' || value === 'deny') return value;
  if (typeof value === 'string')
    throw v.rangeError(
      `Expected 'allow', 'deny' or { allow: [...], deny: [...] } for egress but received ${v.describe(value)}`,
    );
  const o = v.object('egress', value);
  v.knownKeys('egress', o, ['allow', 'deny', 'dns']);
  const policy: { allow?: EgressRule[]; deny?: EgressRule[]; dns?: string } = {};
  for (const verdict of ['allow', 'deny'] as const) {
    const list = o[verdict];
    if (list === undefined) continue;
    if (!Array.isArray(list)) throw v.typeError(`egress.${verdict} must be an array of { host | cidr, port? } rules`);
    if (list.length > MAX_EGRESS_RULES)
      throw v.rangeError(`egress.${verdict} has ${list.length} rules; at most ${MAX_EGRESS_RULES}`);
    policy[verdict] = list.map((raw, i) => parseRule(`egress.${verdict}[${i}]`, raw, verdict));
  }
  if (o.dns !== undefined) {
    const dns = v.string('egress.dns', o.dns, { maxLength: 60 });
    if (!parseResolver(dns))
      throw v.rangeError(`egress.dns ${JSON.stringify(dns)} is not a resolver address (IP, IP:PORT or [IPv6]:PORT)`);
    policy.dns = dns;
  }
  if (policy.allow === undefined && policy.deny === undefined && policy.dns === undefined)
    throw v.typeError('egress needs allow or deny rules (or a dns resolver)');
  const relayed = (policy.allow ?? []).filter(isRelayed);
  const seen = new Set<string>();
  relayed.forEach((r) => {
    const key = `${r.host}:${r.port}`;
    if (seen.has(key)) throw v.rangeError(`egress.allow[${(policy.allow ?? []).indexOf(r)}]: ${key} is listed twice`);
    seen.add(key);
  });
  for (const h of new Set(relayed.map((r) => r.host))) {
    const addrs = new Set(relayed.filter((r) => r.host === h).map((r) => r.address ?? ''));
    if (addrs.size > 1) throw v.rangeError(`egress.allow: ${h} is given different addresses`);
  }
  return policy;
}

/** QEMU's gateway, as the guest sees it, and where QEMU's user network takes it: the host itself. */
const GATEWAY_ALIASES: readonly { gateway: string; family: 'ipv4' | 'ipv6'; host: string; network: number }[] = [
  { gateway: '10.0.2.2', family: 'ipv4', host: '127.0.0.1/32', network: 24 },
  { gateway: 'fec0::2', family: 'ipv6', host: '::1/128', network: 64 },
];

/** Whether the network `cidr` (a.b.c.d/n or v6/n) holds `ip`. */
function cidrHolds(cidr: string, ip: string, family: 'ipv4' | 'ipv6'): boolean {
  const [net, bits] = cidr.split('/');
  if (isIP(net) !== (family === 'ipv4' ? 4 : 6)) return false;
  const list = new BlockList();
  list.addSubnet(net, Number(bits), family);
  return list.check(ip, family);
}

/**
 * The egress filter's policy file (its format: native/preload/net_guard.cc). `relayHosts: false` (libkrun,
 * which has no relays): exact names with a port are rules by DNS like the others. On QEMU
 * (`relayHosts`), a rule whose network holds QEMU's gateway (10.0.2.2, fec0::2) also holds the
 * host's loopback address it stands for: `deny 10.0.2.2` means the host (an allow, only when it
 * names QEMU's network or narrower).
 */
export function guardPolicy(
  p: Exclude<EgressPolicy, string>,
  files: { log: string; ready: string },
  { relayHosts = true }: { relayHosts?: boolean } = {},
): string {
  for (const f of [files.log, files.ready])
    if (!path.isAbsolute(f) || /[\n\r]/.test(f))
      throw new MicrovmError('ERR_MICROVM_EGRESS_RELAY', `Bad path ${JSON.stringify(f)}`);
  const lines = [`default ${p.allow === undefined ? 'allow' : 'deny'}`, `log ${files.log}`, `ready ${files.ready}`];
  if (p.dns !== undefined) {
    const r = parseResolver(p.dns) as { ip: string; port: number };
    lines.push(`upstream ${r.ip} ${r.port}`);
  }
  for (const verdict of ['deny', 'allow'] as const)
    (p[verdict] ?? []).forEach((r, i) => {
      if (relayHosts && verdict === 'allow' && isRelayed(r)) return; // the relays' business
      const what =
        r.cidr !== undefined
          ? `cidr ${r.cidr}`
          : (r.host as string).startsWith('*.')
            ? `suffix ${(r.host as string).slice(1)}`
            : `host ${r.host as string}`;
      const tail = `${r.port ?? 0} ${r.protocol ?? 'any'} egress.${verdict}[${i}]`;
      lines.push(`rule ${verdict} ${what} ${tail}`);
      // A deny on any network holding the gateway denies the host; an allow opens it only when it
      // names QEMU's network or narrower (an allow of 0.0.0.0/0 or 10.0.0.0/8 does not mean the host).
      if (relayHosts && r.cidr !== undefined)
        for (const a of GATEWAY_ALIASES)
          if (
            cidrHolds(r.cidr, a.gateway, a.family) &&
            (verdict === 'deny' || Number(r.cidr.split('/')[1]) >= a.network)
          )
            lines.push(`rule ${verdict} cidr ${a.host} ${tail}`);
    });
  return `${lines.join('\n')}\n`;
}

/** Where the egress filter finds its policy and says whether it applies it, in a VM's directory. */
export interface GuardFiles {
  policy: string;
  ready: string;
}

/**
 * Writes the filter's policy (0600) into the VM's directory `dataDir`, its decisions going to the
 * VM's egress.log, and clears the filter's last word (so a stale "ok" never counts).
 */
export function writeGuardPolicy(
  dataDir: string,
  p: Exclude<EgressPolicy, string>,
  options?: { relayHosts?: boolean },
): GuardFiles {
  const files = { policy: path.join(dataDir, 'egress-policy'), ready: path.join(dataDir, 'egress-guard.ready') };
  fs.rmSync(files.ready, { force: true });
  fs.writeFileSync(
    files.policy,
    guardPolicy(p, { log: path.join(dataDir, 'egress.log'), ready: files.ready }, options),
    {
      mode: 0o600,
    },
  );
  return files;
}

/**
 * What the filter said once loaded: undefined when it applies the policy; otherwise why not (its
 * "error ..." line, or '' when it said nothing: it was not loaded).
 */
export function guardRefusal(files: GuardFiles): string | undefined {
  let said = '';
  try {
    said = fs.readFileSync(files.ready, 'utf8').slice(0, 300);
  } catch {
    /* not loaded */
  }
  return said === 'ok\n' ? undefined : said.replace(/^error /, '').trim();
}

/**
 * QEMU `-netdev user` parameters for an allow-list: one `guestfwd` per rule, handing each guest
 * connection to `RUNNER --relay-connect SOCKET N`, which passes it to the VM's one relay
 * (lib/network/relay.ts) as rule N of {@link relayRules}. Paths go into QEMU's option string and a
 * shell-like command line: they must not hold commas, spaces or quotes (ERR_MICROVM_EGRESS_RELAY).
 */
export function guestForwards(rules: readonly EgressRule[], relay: { runner: string; socket: string }): string {
  for (const p of [relay.runner, relay.socket])
    if (!path.isAbsolute(p) || /[\s,'"\\]/.test(p))
      throw new MicrovmError(
        'ERR_MICROVM_EGRESS_RELAY',
        `An allow-list needs paths without spaces, commas, quotes or backslashes for its relay: ${JSON.stringify(p)}`,
      );
  const ips = new Map<string | undefined, string>(virtualHosts(rules).map((x) => [x.host, x.ip]));
  return rules
    .map(
      (r, i) => `,guestfwd=tcp:${ips.get(r.host)}:${r.port}-cmd:${relay.runner} --relay-connect ${relay.socket} ${i}`,
    )
    .join('');
}

/** The relay's rules file (RULES of lib/network/relay.ts): the allow-list's rules in guestForwards' order. */
export function relayRules(rules: readonly EgressRule[]): string {
  return `${JSON.stringify(rules.map((r) => ({ host: r.host, port: r.port, address: r.address ?? null })))}\n`;
}
