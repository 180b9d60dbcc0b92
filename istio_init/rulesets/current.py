"""Current Istio's rule set (1.25 to 1.32): `plan(config, ipv6, resolvers)`, step by step as docs/rules-current.md.

This is the one file that says which rules the current rule set makes and in
which order; the step numbers in the comments are the numbered steps of
docs/rules-current.md's algorithm. It is pure: the pod's DNS resolvers (the
`nameserver` lines of its /etc/resolv.conf) are read by the runner and passed
in, so every test can run it without a kernel or a file.

Both families are built by the same code: current Istio writes the same rule
in IPv4 and IPv6 ("both") wherever docs/rules-current.md does not say otherwise,
with the family's loopback (`LOOP`) and inbound passthrough source (`SIX`).
Each family's operations are grouped by table in Istio's order (mangle, nat,
raw), keeping creation order within a table, as Istio's restore input does.
"""

from __future__ import annotations

from istio_init.config import Config
from istio_init.model import (IPV6_PASSTHROUGH_ADDRESS, FamilyPlan, Match, Option, PolicyRoute, RulePlan,
                              destination_appends)
from istio_init.rulesets.parts import (DNS_CAPTURE_PORT, DNS_PORT, ISTIO_DIVERT, ISTIO_DROP, ISTIO_IN_REDIRECT,
                                       ISTIO_INBOUND, ISTIO_OUTPUT, ISTIO_OUTPUT_DNS, ISTIO_REDIRECT, ISTIO_TPROXY,
                                       MANGLE, NAT, OUTBOUND_MARK, OUTPUT, PREROUTING, RAW, REDIRECT, RETURN, TCP, UDP,
                                       ZONE_AGENT_UPSTREAM, ZONE_APP_AGENT, FamilyBuilder, connmark, mark_match, owner,
                                       port, redirect_to, resolvers_by_family, set_mark, zone)
from istio_init.records import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Sequence

# ipaddress and the C socket module's inet_ntop are imported where used (parts.py): every run imports this
# module (rulesets/__init__.py), and both are start-up time (docs/performance.md, "What start-up avoids").

TABLE_ORDER = (MANGLE, NAT, RAW)


NAME = "current"
# Every chain this rule set can create, per table: only these are istio-init's.
OWNED_CHAINS = {
    NAT: (ISTIO_INBOUND, ISTIO_IN_REDIRECT, ISTIO_OUTPUT, ISTIO_OUTPUT_DNS, ISTIO_REDIRECT),
    MANGLE: (ISTIO_INBOUND, ISTIO_DIVERT, ISTIO_TPROXY, ISTIO_DROP),
    RAW: (ISTIO_INBOUND, ISTIO_OUTPUT_DNS),
}


def shape_configs() -> list[Config]:
    """Configs reaching every rule this set writes into built-in chains, variable parts as sentinels."""
    from istio_init.rulesets.sentinels import shape_config

    return [shape_config(NAME)]


def plan(config: Config, ipv6: bool, resolvers: Sequence[str] = ()) -> RulePlan:
    """The complete rule plan for `config` on a pod whose family and resolvers are known.

    `resolvers` are the pod's nameserver addresses (either family, in
    resolv.conf order); they matter only with DNS capture and without
    --capture-all-dns. --iptables-trace-logging (Istio 1.25 takes it) writes no rule here.
    """
    servers = resolvers_by_family(resolvers)
    # As in Istio, a resolver of either family keeps DNS capture on (the runner
    # warns when there is none), even if the pod makes no rules of its family.
    dns = config.dns_capture and (config.capture_all_dns or bool(servers[4] or servers[6]))
    families = (4, 6) if ipv6 else (4,)
    built = [_Family(config, family, servers[family], dns).build() for family in families]
    routes: tuple[PolicyRoute, ...] = ()
    if config.tproxy and config.inbound_enabled:
        # Marked packets reach the local socket through this policy route, in each family.
        routes = tuple(PolicyRoute(f, config.tproxy_mark, config.tproxy_route_table) for f in families)
    # ::6 is the source of inbound passthrough connections on IPv6 pods.
    loopback = (IPV6_PASSTHROUGH_ADDRESS,) if ipv6 else ()
    return RulePlan(ipv4=built[0], ipv6=built[1] if ipv6 else None, routes=routes, loopback_addresses=loopback)


class _Family(FamilyBuilder):
    """Builds one family's steps in docs/rules-current.md's order."""

    def __init__(self, config: Config, family: int, resolvers: list[str], dns: bool) -> None:
        super().__init__(config, family, resolvers)
        self.dns = dns  # DNS capture on and effective (capture-all, or a resolver in some family)

    def build(self) -> FamilyPlan:
        cfg = self.config
        tunnel = cfg.inbound_tunnel_port

        # 1. Excluded interfaces: nothing arriving or leaving by them is captured.
        for iface in cfg.exclude_interfaces:
            self.append(NAT, PREROUTING, RETURN, in_interface=iface)
            self.append(NAT, OUTPUT, RETURN, out_interface=iface)
        if cfg.tproxy:
            for iface in cfg.exclude_interfaces:
                self.append(MANGLE, PREROUTING, RETURN, in_interface=iface)
                self.append(MANGLE, OUTPUT, RETURN, out_interface=iface)

        # 2. Traffic arriving on a KubeVirt interface is not inbound capture.
        for iface in cfg.kube_virt_interfaces:
            self.insert(1, NAT, PREROUTING, RETURN, in_interface=iface)

        # 3. Conntrack-INVALID packets are dropped before anything else sees them.
        if cfg.drop_invalid:
            self.append(MANGLE, PREROUTING, ISTIO_DROP,
                        matches=(Match("conntrack", (Option("ctstate", "INVALID"),)),))
            self.append(MANGLE, ISTIO_DROP, "DROP")

        # 4. The inbound tunnel port is never captured.
        self.append(NAT, ISTIO_INBOUND, RETURN, protocol=TCP, matches=(port(TCP, "dport", tunnel),))

        # 5. The redirect chains.
        self.append(NAT, ISTIO_REDIRECT, REDIRECT, protocol=TCP, target_options=redirect_to(cfg.envoy_port))
        self.append(NAT, ISTIO_IN_REDIRECT, REDIRECT, protocol=TCP,
                    target_options=redirect_to(cfg.inbound_capture_port))

        # 6. Inbound capture.
        if cfg.inbound_enabled:
            self.inbound()

        # 7. Outbound: everything leaving the pod enters ISTIO_OUTPUT (UDP too, for DNS).
        self.append(NAT, OUTPUT, ISTIO_OUTPUT)

        # 8. Ports never captured outbound, TCP and UDP.
        for number in cfg.outbound_ports_exclude:
            self.append(NAT, ISTIO_OUTPUT, RETURN, protocol=TCP, matches=(port(TCP, "dport", number),))
            self.append(NAT, ISTIO_OUTPUT, RETURN, protocol=UDP, matches=(port(UDP, "dport", number),))

        # 9. The inbound passthrough source is the proxy talking to the app.
        self.append(NAT, ISTIO_OUTPUT, RETURN, source=self.six, out_interface="lo")

        # 10-11. The proxy's own traffic. On lo, the proxy calling a local service by a
        # non-local address goes back through inbound capture (not the tunnel port, and
        # with DNS capture not DNS, for uids); another process's lo traffic is left alone.
        loopback_in_include = any(net.is_loopback for net in cfg.outbound_cidrs.items)
        for kind, ident in self.owners():
            if self.dns and kind == "uid":
                not_local_port = Match("multiport", (Option("dports", f"{DNS_PORT},{tunnel}", True),))
            else:
                not_local_port = port(TCP, "dport", tunnel, negated=True)
            self.append(NAT, ISTIO_OUTPUT, ISTIO_IN_REDIRECT, destination=self.loop, negate_destination=True,
                        out_interface="lo", protocol=TCP, matches=(not_local_port, owner(kind, ident)))
            if not loopback_in_include:
                if self.dns:
                    self.append(NAT, ISTIO_OUTPUT, RETURN, out_interface="lo", protocol=TCP,
                                matches=(port(TCP, "dport", DNS_PORT, negated=True),
                                         owner(kind, ident, negated=True)))
                else:
                    self.append(NAT, ISTIO_OUTPUT, RETURN, out_interface="lo",
                                matches=(owner(kind, ident, negated=True),))
            self.append(NAT, ISTIO_OUTPUT, RETURN, matches=(owner(kind, ident),))

        # 12. Owner groups: only the included groups' traffic is captured, or all but the excluded.
        if cfg.owner_groups_include.all:
            for gid in cfg.owner_groups_exclude:
                self.append(NAT, ISTIO_OUTPUT, RETURN, matches=(owner("gid", gid),))
        else:
            self.append(NAT, ISTIO_OUTPUT, RETURN,
                        matches=tuple(owner("gid", gid, negated=True) for gid in cfg.owner_groups_include.items))

        # 13. DNS to the agent on 15053, in conntrack zones of their own.
        if self.dns:
            self.dns_capture()

        # 14. Local and excluded destinations are never captured.
        self.append(NAT, ISTIO_OUTPUT, RETURN, destination=self.loop)
        self.steps += destination_appends(NAT, ISTIO_OUTPUT, RETURN, self.cidrs(cfg.exclude_cidrs))

        # 15. Ports always captured, whatever -i says.
        for number in cfg.outbound_ports:
            self.append(NAT, ISTIO_OUTPUT, ISTIO_REDIRECT, protocol=TCP, matches=(port(TCP, "dport", number),))

        # 16. What to capture outbound (no trailing RETURN any more).
        self.outbound_include()

        # 17. TPROXY: the proxy's loopback connections are marked so inbound capture
        # leaves them alone, and the connection mark carries the TPROXY mark back out.
        if cfg.tproxy:
            self.tproxy_marks()

        order = {table: i for i, table in enumerate(TABLE_ORDER)}
        steps = sorted(self.steps, key=lambda step: order[step.rule.table])
        return FamilyPlan(self.family, tuple(steps))

    def inbound(self) -> None:
        cfg = self.config
        table = MANGLE if cfg.tproxy else NAT
        if cfg.tproxy:
            self.append(MANGLE, ISTIO_DIVERT, "MARK", target_options=set_mark(cfg.tproxy_mark))
            self.append(MANGLE, ISTIO_DIVERT, "ACCEPT")
            self.append(MANGLE, ISTIO_TPROXY, "TPROXY", destination=self.loop, negate_destination=True,
                        protocol=TCP, target_options=(
                            Option("on-port", str(cfg.inbound_capture_port)),
                            Option("on-ip", "::" if self.v6 else "0.0.0.0"),
                            Option("tproxy-mark", f"{cfg.tproxy_mark:#x}/0xffffffff")))
        self.append(table, PREROUTING, ISTIO_INBOUND, protocol=TCP)

        def capture(matches: tuple[Match, ...]) -> None:
            if cfg.tproxy:
                established = Match("conntrack", (Option("ctstate", "RELATED,ESTABLISHED"),))
                self.append(MANGLE, ISTIO_INBOUND, ISTIO_DIVERT, protocol=TCP, matches=matches + (established,))
                self.append(MANGLE, ISTIO_INBOUND, ISTIO_TPROXY, protocol=TCP, matches=matches)
            else:
                self.append(NAT, ISTIO_INBOUND, ISTIO_IN_REDIRECT, protocol=TCP, matches=matches)

        if cfg.inbound_ports.all:
            for number in cfg.local_exclude_ports:
                self.append(table, ISTIO_INBOUND, RETURN, protocol=TCP, matches=(port(TCP, "dport", number),))
            capture(())
        else:
            for number in cfg.inbound_ports.items:
                capture((port(TCP, "dport", number),))

    def dns_capture(self) -> None:
        cfg = self.config
        self.append(RAW, OUTPUT, ISTIO_OUTPUT_DNS)
        if cfg.capture_all_dns or self.resolvers:
            self.append(NAT, ISTIO_OUTPUT, ISTIO_OUTPUT_DNS)
        # All TCP redirects, then all UDP ones; only queries to the pod's resolvers
        # unless capture-all (a local DNS proxy's upstream queries must not loop back).
        for protocol in (TCP, UDP):
            dport = port(protocol, "dport", DNS_PORT)
            if cfg.capture_all_dns:
                self.append(NAT, ISTIO_OUTPUT_DNS, REDIRECT, protocol=protocol, matches=(dport,),
                            target_options=redirect_to(DNS_CAPTURE_PORT))
            else:
                for server in self.resolvers:
                    self.append(NAT, ISTIO_OUTPUT_DNS, REDIRECT, destination=server, protocol=protocol,
                                matches=(dport,), target_options=redirect_to(DNS_CAPTURE_PORT))
        # The agent's own queries (zone 1) and its answers to the app (zone 2).
        for kind, ident in self.owners():
            self.append(RAW, ISTIO_OUTPUT_DNS, "CT", protocol=UDP,
                        matches=(port(UDP, "dport", DNS_PORT), owner(kind, ident)),
                        target_options=zone(ZONE_AGENT_UPSTREAM))
            self.append(RAW, ISTIO_OUTPUT_DNS, "CT", protocol=UDP,
                        matches=(port(UDP, "sport", DNS_CAPTURE_PORT), owner(kind, ident)),
                        target_options=zone(ZONE_APP_AGENT))
        # The app's queries (zone 2) and the resolvers' answers (zone 1).
        if cfg.capture_all_dns:
            self.append(RAW, PREROUTING, ISTIO_INBOUND)
            self.append(RAW, ISTIO_OUTPUT_DNS, "CT", protocol=UDP, matches=(port(UDP, "dport", DNS_PORT),),
                        target_options=zone(ZONE_APP_AGENT))
            self.append(RAW, ISTIO_INBOUND, "CT", protocol=UDP, matches=(port(UDP, "sport", DNS_PORT),),
                        target_options=zone(ZONE_AGENT_UPSTREAM))
        elif self.resolvers:
            self.append(RAW, PREROUTING, ISTIO_INBOUND)
            for server in self.resolvers:
                self.append(RAW, ISTIO_OUTPUT_DNS, "CT", destination=server, protocol=UDP,
                            matches=(port(UDP, "dport", DNS_PORT),), target_options=zone(ZONE_APP_AGENT))
                self.append(RAW, ISTIO_INBOUND, "CT", source=server, protocol=UDP,
                            matches=(port(UDP, "sport", DNS_PORT),), target_options=zone(ZONE_AGENT_UPSTREAM))

    def outbound_include(self) -> None:
        cfg = self.config
        if cfg.outbound_cidrs.all:
            self.append(NAT, ISTIO_OUTPUT, ISTIO_REDIRECT)
            for iface in cfg.kube_virt_interfaces:
                self.insert(1, NAT, PREROUTING, ISTIO_REDIRECT, in_interface=iface)
            return
        for cidr in self.cidrs(cfg.outbound_cidrs.items):
            for iface in cfg.kube_virt_interfaces:
                self.insert(1, NAT, PREROUTING, ISTIO_REDIRECT, destination=cidr, in_interface=iface)
            self.append(NAT, ISTIO_OUTPUT, ISTIO_REDIRECT, destination=cidr)

    def tproxy_marks(self) -> None:
        cfg = self.config
        mark = cfg.tproxy_mark
        self.append(MANGLE, PREROUTING, "CONNMARK", protocol=TCP, matches=(mark_match("mark", mark),),
                    target_options=connmark("save-mark"))
        self.append(MANGLE, OUTPUT, RETURN, out_interface="lo", protocol=TCP, matches=(mark_match("mark", mark),))
        for kind, ident in self.owners():
            self.append(MANGLE, OUTPUT, "MARK", destination=self.loop, negate_destination=True, out_interface="lo",
                        protocol=TCP, matches=(owner(kind, ident),), target_options=set_mark(OUTBOUND_MARK))
        self.append(MANGLE, OUTPUT, "CONNMARK", protocol=TCP, matches=(mark_match("connmark", mark),),
                    target_options=connmark("restore-mark"))
        # Marked, passthrough and the proxy's unmarked loopback traffic skip inbound capture.
        self.insert(1, MANGLE, ISTIO_INBOUND, RETURN, protocol=TCP, matches=(mark_match("mark", mark),))
        self.insert(2, MANGLE, ISTIO_INBOUND, RETURN, source=self.six, in_interface="lo", protocol=TCP)
        self.insert(3, MANGLE, ISTIO_INBOUND, RETURN, in_interface="lo", protocol=TCP,
                    matches=(mark_match("mark", OUTBOUND_MARK, negated=True),))
