/**
 * What an egress policy means for its enforcement, resolved once ({@link planEgress}): which allow
 * rules a relay serves and at which virtual addresses, whether the egress filter is needed beside
 * the relays, and the rules the filter gets. run() and both backends read the plan; none of them
 * re-reads the policy's rules. How the pieces are enforced: ./egress.ts.
 */
import type { EgressMode, EgressPolicy, EgressRule } from '../backends/types';

const FIRST_VIRTUAL = 100; // 10.0.2.100: clear of QEMU's .2 (host), .3 (DNS), .15 (guest)

/** An allow rule served by a relay: an exact host name with a port, over TCP. */
export function isRelayed(r: EgressRule): boolean {
  return r.host !== undefined && !r.host.startsWith('*.') && r.port !== undefined && r.protocol !== 'udp';
}

/** What kind of policy `p` is. */
export function egressMode(p: EgressPolicy): EgressMode {
  return typeof p === 'string' ? p : 'allow-list';
}

/** The allow rules served by relays (exact names with a port, TCP); undefined for 'allow'/'deny'/none. */
export function allowListOf(p: EgressPolicy | undefined): readonly EgressRule[] | undefined {
  return typeof p === 'object' ? (p.allow ?? []).filter(isRelayed) : undefined;
}

/**
 * Whether the policy needs the egress filter in QEMU (native/preload/net_guard.cc): any rule that is not a
 * relayed name (addresses, wildcards, names by DNS, deny rules) or a resolver. Without it, QEMU's
 * restricted mode and the relays enforce the policy alone.
 */
export function needsGuard(p: EgressPolicy | undefined): boolean {
  if (typeof p !== 'object') return false;
  return p.dns !== undefined || (p.deny ?? []).length > 0 || (p.allow ?? []).some((r) => !isRelayed(r));
}

/** How a policy reads in a span attribute or a message: `allow`, `deny`, `allow-list(2)`, `rules(allow 2, deny 1)`. */
export function describeEgress(p: EgressPolicy): string {
  if (typeof p === 'string') return p;
  if (p.deny === undefined && p.dns === undefined) return `allow-list(${(p.allow ?? []).length})`;
  return `rules(allow ${p.allow === undefined ? 'all' : p.allow.length}, deny ${(p.deny ?? []).length}${p.dns ? `, dns ${p.dns}` : ''})`;
}

/** Each allowed host's virtual address in QEMU's network, in the order the rules name them. */
export function virtualHosts(rules: readonly EgressRule[]): { host: string; ip: string }[] {
  const out: { host: string; ip: string }[] = [];
  for (const r of rules)
    if (r.host !== undefined && !out.some((x) => x.host === r.host))
      out.push({ host: r.host, ip: `10.0.2.${FIRST_VIRTUAL + out.length}` });
  return out;
}

/** A checked egress policy (lib/network/egress.ts parseEgress), resolved for enforcement. */
export interface EgressPlan {
  readonly policy: EgressPolicy;
  readonly mode: EgressMode;
  /** How it reads in a span attribute or a message ({@link describeEgress}). */
  readonly description: string;
  /** The allow rules relays serve, in rule order; undefined unless the policy is a rule list. */
  readonly relayed: readonly EgressRule[] | undefined;
  /** The relayed names' virtual addresses in QEMU's network; undefined as `relayed`. */
  readonly virtualHosts: readonly { host: string; ip: string }[] | undefined;
  /** Rules no relay can serve (or a resolver): where relays enforce names, the filter is needed too. */
  readonly needsFilter: boolean;
  /** The policy as the egress filter's rules ('deny': allow nothing); undefined for 'allow'. */
  readonly filterRules: Exclude<EgressPolicy, string> | undefined;
  /** The first allow rule that gives an address (only a relay can connect there instead). */
  readonly addressOverride: EgressRule | undefined;
}

/** Resolves a checked policy (undefined: 'allow') for enforcement. Pure. */
export function planEgress(policy: EgressPolicy | undefined = 'allow'): EgressPlan {
  const relayed = allowListOf(policy);
  return {
    policy,
    mode: egressMode(policy),
    description: describeEgress(policy),
    relayed,
    virtualHosts: relayed && virtualHosts(relayed),
    needsFilter: needsGuard(policy),
    filterRules: policy === 'allow' ? undefined : policy === 'deny' ? { allow: [] } : policy,
    addressOverride: typeof policy === 'object' ? (policy.allow ?? []).find((r) => r.address !== undefined) : undefined,
  };
}
