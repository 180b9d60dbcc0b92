"""The rule sets of Istio 1.9 to 1.24: eight generations, one planner, each change written once.

Between 1.8 (istio_1_8.py) and 1.25 (current.py) Istio's `run.go` kept one
shape: TCP capture as in 1.8, DNS to the agent by the pod's resolvers, and the
same order of steps. It changed at eight releases; each `Generation` below
names the first release of one and the traits it has, and `_Family.build`
follows `run.go`'s order, with each change guarded by the trait that says
which generations have it (the comment names the release that brought it).
Istio 1.9 to 1.11 made their IPv6 rules in a separate, older function
(`handleInboundIpv6Rules`): `_Family.build_ipv6_before_1_12` is that one.

Pure, like the other rule sets: the pod's resolvers are passed in.
"""

from __future__ import annotations

from istio_init.config import Config
from istio_init.model import (IPV6_PASSTHROUGH_ADDRESS, FamilyPlan, Match, Option, PolicyRoute, RulePlan,
                              destination_appends)
from istio_init.rulesets.parts import (DNS_CAPTURE_PORT, DNS_PORT, ISTIO_DIVERT, ISTIO_DROP, ISTIO_IN_REDIRECT,
                                       ISTIO_INBOUND, ISTIO_OUTPUT, ISTIO_REDIRECT, ISTIO_TPROXY, MANGLE, NAT,
                                       OUTBOUND_MARK, OUTPUT, PREROUTING, RAW, REDIRECT, RETURN, SSH_PORT, TCP, UDP,
                                       ZONE_AGENT_UPSTREAM, ZONE_APP_AGENT, FamilyBuilder, connmark, mark_match, owner,
                                       port, redirect_to, resolvers_by_family, set_mark, zone)
from istio_init.records import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from typing import Any, Sequence

NFLOG_GROUP = "1337"
NFLOG_SIZE = "20"

# What --iptables-trace-logging logs: the rules Istio's builder tags with these names.
JUMP_INBOUND = "JumpInbound"
JUMP_OUTBOUND = "JumpOutbound"
EXCLUDE_INBOUND_PORT = "ExcludeInboundPort"
INCLUDE_INBOUND_PORT = "IncludeInboundPort"
INBOUND_CAPTURE = "InboundCapture"
KUBEVIRT = "KubevirtCommand"
EXCLUDE_INTERFACE = "ExcludeInterfaceCommand"


class Generation(NamedTuple):
    """One generation: the releases it covers and how its rules differ from its neighbours'."""

    name: str  # its first release: the value of --rules-version
    releases: str
    ipv6_mirrors_ipv4: bool  # 1.12: IPv6 gets the IPv4 rules (DNS, zones, TPROXY) instead of 1.8's
    zones_always: bool  # 1.11: DNS in conntrack zones whenever DNS is redirected (1.10: by env)
    tproxy_outbound_mark: bool  # 1.11: the proxy's loopback connections marked 1338 in TPROXY mode
    ssh_kept: bool  # up to 1.12: port 22 is never captured inbound
    tunnel_port_on_loopback: bool  # 1.18: the loopback ISTIO_IN_REDIRECT rules skip the tunnel port
    zone1_by_source: bool  # 1.20: the resolvers' answers are matched by source
    dns_udp_in_istio_output: bool  # 1.23: DNS UDP rules in ISTIO_OUTPUT (nat and raw), no RETURN after -i
    drop_chain: bool  # 1.24: --drop-invalid jumps to ISTIO_DROP instead of dropping in PREROUTING

    @property
    def trailing_return(self) -> bool:
        return not self.dns_udp_in_istio_output

    def owned_chains(self) -> dict[str, tuple[str, ...]]:
        """Every chain this generation can create, per table: only these are istio-init's."""
        owned = {
            NAT: (ISTIO_INBOUND, ISTIO_IN_REDIRECT, ISTIO_OUTPUT, ISTIO_REDIRECT),
            MANGLE: (ISTIO_INBOUND, ISTIO_DIVERT, ISTIO_TPROXY) + ((ISTIO_DROP,) if self.drop_chain else ()),
        }
        if self.dns_udp_in_istio_output:
            owned[RAW] = (ISTIO_OUTPUT,)
        return owned


def _generation(name: str, releases: str, first: int) -> Generation:
    """A generation from the minor release it starts at: every trait is 'since release X'."""
    return Generation(name, releases, ipv6_mirrors_ipv4=first >= 12, zones_always=first >= 11,
                      tproxy_outbound_mark=first >= 11, ssh_kept=first <= 12, tunnel_port_on_loopback=first >= 18,
                      zone1_by_source=first >= 20, dns_udp_in_istio_output=first >= 23, drop_chain=first >= 24)


GENERATIONS = (
    _generation("1.9", "1.9-1.10", 9),
    _generation("1.11", "1.11", 11),
    _generation("1.12", "1.12", 12),
    _generation("1.13", "1.13-1.17", 13),
    _generation("1.18", "1.18-1.19", 18),
    _generation("1.20", "1.20-1.22", 20),
    _generation("1.23", "1.23", 23),
    _generation("1.24", "1.24", 24),
)


class RuleSet:
    """One generation as a rule set: what rulesets/__init__.py expects of a rule set module."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.NAME = generation.name
        self.OWNED_CHAINS = generation.owned_chains()
        from istio_init.rulesets.sentinels import SENTINEL_RESOLVERS

        # Resolvers for shape_configs: rules naming one in a built-in chain are ours whatever the address.
        self.SHAPE_RESOLVERS = SENTINEL_RESOLVERS

    def shape_configs(self) -> list[Config]:
        """Configs reaching every rule this set writes into built-in chains, variable parts as sentinels.

        With --capture-all-dns and without it: its rules replace the per-resolver ones.
        """
        from istio_init.rulesets.sentinels import shape_config

        config = shape_config(self.NAME)
        return [config, config._replace(capture_all_dns=False)] if config.capture_all_dns else [config]

    def plan(self, config: Config, ipv6: bool, resolvers: Sequence[str] = ()) -> RulePlan:
        return plan(self.generation, config, ipv6, resolvers)


BY_NAME = {generation.name: RuleSet(generation) for generation in GENERATIONS}


def plan(generation: Generation, config: Config, ipv6: bool, resolvers: Sequence[str] = ()) -> RulePlan:
    """The complete rule plan of `generation` for `config` (resolvers: the pod's nameservers)."""
    servers = resolvers_by_family(resolvers)
    ipv4_plan = _Family(generation, config, 4, servers[4]).build()
    ipv6_plan = None
    if ipv6:
        v6 = _Family(generation, config, 6, servers[6])
        ipv6_plan = v6.build() if generation.ipv6_mirrors_ipv4 else v6.build_ipv6_before_1_12()
    routes: tuple[PolicyRoute, ...] = ()
    if config.tproxy and config.inbound_enabled:
        families = (4, 6) if ipv6 and generation.ipv6_mirrors_ipv4 else (4,)
        routes = tuple(PolicyRoute(f, config.tproxy_mark, config.tproxy_route_table) for f in families)
    loopback = (IPV6_PASSTHROUGH_ADDRESS,) if ipv6 else ()
    return RulePlan(ipv4=ipv4_plan, ipv6=ipv6_plan, routes=routes, loopback_addresses=loopback)


class _Family(FamilyBuilder):
    """Builds one family's steps in `run.go`'s order (the loopback CIDR: ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR
    from 1.21, its default 127.0.0.1/32 before)."""

    def __init__(self, generation: Generation, config: Config, family: int, resolvers: list[str]) -> None:
        super().__init__(config, family, resolvers)
        self.gen = generation
        # IPv4 only before 1.12; from 1.12 both families.
        self.full = not self.v6 or generation.ipv6_mirrors_ipv4

    def append(self, table: str, chain: str, target: str, log: str = "", **parts: Any) -> None:
        if log and self.config.trace_logging:
            super().append(table, chain, "NFLOG", **self._nflog(log, parts))
        super().append(table, chain, target, **parts)

    def insert(self, position: int, table: str, chain: str, target: str, log: str = "", **parts: Any) -> None:
        super().insert(position, table, chain, target, **parts)
        if log and self.config.trace_logging:  # inserted after, so it comes first
            super().insert(position, table, chain, "NFLOG", **self._nflog(log, parts))

    @staticmethod
    def _nflog(prefix: str, parts: dict[str, Any]) -> dict[str, Any]:
        """--iptables-trace-logging: an NFLOG rule with the same match, in front of the logged one."""
        return {**parts, "target_options": (Option("nflog-prefix", prefix), Option("nflog-group", NFLOG_GROUP),
                                            Option("nflog-size", NFLOG_SIZE))}

    def build(self) -> FamilyPlan:
        cfg, gen = self.config, self.gen
        dns = cfg.dns_capture and self.full

        self.short_circuit_interfaces()

        # --drop-invalid (1.12.2): conntrack-INVALID packets are dropped (1.24: through ISTIO_DROP).
        if cfg.drop_invalid:
            invalid = (Match("conntrack", (Option("ctstate", "INVALID"),)),)
            if gen.drop_chain:
                self.append(MANGLE, PREROUTING, ISTIO_DROP, matches=invalid)
                self.append(MANGLE, ISTIO_DROP, "DROP")
            else:
                self.append(MANGLE, PREROUTING, "DROP", matches=invalid)

        # The inbound tunnel port, and the two redirect chains.
        self.append(NAT, ISTIO_INBOUND, RETURN, protocol=TCP, matches=(port(TCP, "dport", cfg.inbound_tunnel_port),))
        self.append(NAT, ISTIO_REDIRECT, REDIRECT, protocol=TCP, target_options=redirect_to(cfg.envoy_port))
        self.append(NAT, ISTIO_IN_REDIRECT, REDIRECT, INBOUND_CAPTURE, protocol=TCP,
                    target_options=redirect_to(cfg.inbound_capture_port))

        if cfg.inbound_enabled:
            self.inbound(tproxy=cfg.tproxy and self.full)

        # Outbound TCP enters ISTIO_OUTPUT; ports never captured; the passthrough source.
        self.append(NAT, OUTPUT, ISTIO_OUTPUT, JUMP_OUTBOUND, protocol=TCP)
        for number in cfg.outbound_ports_exclude:
            self.append(NAT, ISTIO_OUTPUT, RETURN, protocol=TCP, matches=(port(TCP, "dport", number),))
        self.append(NAT, ISTIO_OUTPUT, RETURN, source=self.six, out_interface="lo")

        self.proxy_owners(dns)

        # Owner groups (1.14): only the included groups' traffic is captured, or all but the excluded.
        self.owner_groups(NAT, ISTIO_OUTPUT, ())

        if dns:
            dport = port(TCP, "dport", DNS_PORT)
            if cfg.capture_all_dns:
                self.append(NAT, ISTIO_OUTPUT, REDIRECT, protocol=TCP, matches=(dport,),
                            target_options=redirect_to(DNS_CAPTURE_PORT))
            for server in () if cfg.capture_all_dns else self.resolvers:
                self.append(NAT, ISTIO_OUTPUT, REDIRECT, destination=server, protocol=TCP, matches=(dport,),
                            target_options=redirect_to(DNS_CAPTURE_PORT))

        # Local and excluded destinations are never captured; ports always captured.
        self.append(NAT, ISTIO_OUTPUT, RETURN, destination=self.loop)
        self.steps += destination_appends(NAT, ISTIO_OUTPUT, RETURN, self.cidrs(cfg.exclude_cidrs))
        for number in cfg.outbound_ports:
            self.append(NAT, ISTIO_OUTPUT, ISTIO_REDIRECT, protocol=TCP, matches=(port(TCP, "dport", number),))

        self.outbound_include(kube_virt_target=ISTIO_REDIRECT)

        if dns:
            self.dns_udp()

        if cfg.tproxy and self.full:
            self.tproxy_marks()
        return FamilyPlan(self.family, tuple(self.steps))

    def short_circuit_interfaces(self) -> None:
        """Excluded interfaces (1.11.3): nothing arriving or leaving by them is captured; traffic
        arriving on a KubeVirt interface is not inbound capture."""
        cfg = self.config
        for iface in cfg.exclude_interfaces:
            self.append(NAT, PREROUTING, RETURN, EXCLUDE_INTERFACE, in_interface=iface)
            self.append(NAT, OUTPUT, RETURN, EXCLUDE_INTERFACE, out_interface=iface)
        if cfg.tproxy:
            for iface in cfg.exclude_interfaces:
                self.append(MANGLE, PREROUTING, RETURN, EXCLUDE_INTERFACE, in_interface=iface)
                self.append(MANGLE, OUTPUT, RETURN, EXCLUDE_INTERFACE, out_interface=iface)
        for iface in cfg.kube_virt_interfaces:
            self.insert(1, NAT, PREROUTING, RETURN, KUBEVIRT, in_interface=iface)

    def inbound(self, tproxy: bool) -> None:
        cfg = self.config
        table = MANGLE if tproxy else NAT
        if tproxy:
            self.append(MANGLE, ISTIO_DIVERT, "MARK", target_options=set_mark(cfg.tproxy_mark))
            self.append(MANGLE, ISTIO_DIVERT, "ACCEPT")
            self.append(MANGLE, ISTIO_TPROXY, "TPROXY", destination=self.loop, negate_destination=True,
                        protocol=TCP, target_options=(
                            Option("on-port", str(cfg.inbound_capture_port)),
                            Option("on-ip", "::" if self.v6 else "0.0.0.0"),
                            Option("tproxy-mark", f"{cfg.tproxy_mark:#x}/0xffffffff")))
        self.append(table, PREROUTING, ISTIO_INBOUND, JUMP_INBOUND, protocol=TCP)
        if cfg.inbound_ports.all:
            ssh = [SSH_PORT] if self.gen.ssh_kept else []
            for number in [*ssh, *cfg.local_exclude_ports]:
                self.append(table, ISTIO_INBOUND, RETURN, EXCLUDE_INBOUND_PORT, protocol=TCP,
                            matches=(port(TCP, "dport", number),))
            self.capture(tproxy, (), "")
        else:
            for number in cfg.inbound_ports.items:
                self.capture(tproxy, (port(TCP, "dport", number),), INCLUDE_INBOUND_PORT)

    def capture(self, tproxy: bool, matches: tuple[Match, ...], log: str) -> None:
        if tproxy:
            established = Match("conntrack", (Option("ctstate", "RELATED,ESTABLISHED"),))
            self.append(MANGLE, ISTIO_INBOUND, ISTIO_DIVERT, log, protocol=TCP, matches=matches + (established,))
            self.append(MANGLE, ISTIO_INBOUND, ISTIO_TPROXY, log, protocol=TCP, matches=matches)
        else:
            self.append(NAT, ISTIO_INBOUND, ISTIO_IN_REDIRECT, log, protocol=TCP, matches=matches)

    def proxy_owners(self, dns: bool) -> None:
        """The proxy's own traffic: back through inbound capture on lo by a non-local address, else alone."""
        cfg, gen = self.config, self.gen
        tunnel = cfg.inbound_tunnel_port
        loopback_in_include = any(net.is_loopback for net in cfg.outbound_cidrs.items)
        for kind, ident in self.owners():
            if gen.tunnel_port_on_loopback:  # 1.18
                if dns and kind == "uid":
                    skip: tuple[Match, ...] = (Match("multiport", (Option("dports", f"{DNS_PORT},{tunnel}", True),)),)
                else:
                    skip = (port(TCP, "dport", tunnel, negated=True),)
                protocol: str | None = TCP
            elif dns and kind == "uid":
                skip, protocol = (port(TCP, "dport", DNS_PORT, negated=True),), TCP
            else:
                skip, protocol = (), None
            self.append(NAT, ISTIO_OUTPUT, ISTIO_IN_REDIRECT, destination=self.loop, negate_destination=True,
                        out_interface="lo", protocol=protocol, matches=skip + (owner(kind, ident),))
            if not loopback_in_include or not self.full:
                if dns:
                    self.append(NAT, ISTIO_OUTPUT, RETURN, out_interface="lo", protocol=TCP,
                                matches=(port(TCP, "dport", DNS_PORT, negated=True),
                                         owner(kind, ident, negated=True)))
                else:
                    self.append(NAT, ISTIO_OUTPUT, RETURN, out_interface="lo",
                                matches=(owner(kind, ident, negated=True),))
            self.append(NAT, ISTIO_OUTPUT, RETURN, matches=(owner(kind, ident),))

    def owner_groups(self, table: str, chain: str, udp_dns: tuple[Match, ...]) -> None:
        cfg = self.config
        protocol = UDP if udp_dns else None
        if cfg.owner_groups_include.all:
            for gid in cfg.owner_groups_exclude:
                self.append(table, chain, RETURN, protocol=protocol, matches=udp_dns + (owner("gid", gid),))
        else:
            self.append(table, chain, RETURN, protocol=protocol,
                        matches=udp_dns + tuple(owner("gid", gid, negated=True)
                                                for gid in cfg.owner_groups_include.items))

    def outbound_include(self, kube_virt_target: str) -> None:
        cfg = self.config
        if cfg.outbound_cidrs.all:
            self.append(NAT, ISTIO_OUTPUT, ISTIO_REDIRECT)
            for iface in cfg.kube_virt_interfaces:
                self.insert(1, NAT, PREROUTING, kube_virt_target, KUBEVIRT, in_interface=iface)
            return
        cidrs = self.cidrs(cfg.outbound_cidrs.items)
        for cidr in cidrs:
            for iface in cfg.kube_virt_interfaces:
                self.insert(1, NAT, PREROUTING, ISTIO_REDIRECT, KUBEVIRT, destination=cidr, in_interface=iface)
            self.append(NAT, ISTIO_OUTPUT, ISTIO_REDIRECT, destination=cidr)
        if cidrs and self.gen.trailing_return:  # up to 1.22
            self.append(NAT, ISTIO_OUTPUT, RETURN)

    def dns_udp(self) -> None:
        """DNS over UDP to the agent, except the proxy's own queries; then the conntrack zones."""
        cfg, gen = self.config, self.gen
        dport = port(UDP, "dport", DNS_PORT)
        if gen.dns_udp_in_istio_output:  # 1.23: the UDP rules live in ISTIO_OUTPUT, nat and raw
            chain = ISTIO_OUTPUT
            self.append(NAT, OUTPUT, ISTIO_OUTPUT, JUMP_OUTBOUND, protocol=UDP)
            self.append(RAW, OUTPUT, ISTIO_OUTPUT, JUMP_OUTBOUND, protocol=UDP)
        else:
            chain = OUTPUT
        for kind, ident in self.owners():
            self.append(NAT, chain, RETURN, protocol=UDP, matches=(dport, owner(kind, ident)))
        self.owner_groups(NAT, chain, (dport,))  # 1.14, with owner groups
        servers = [None] if cfg.capture_all_dns else self.resolvers
        for server in servers:
            self.append(NAT, chain, REDIRECT, destination=server, protocol=UDP, matches=(dport,),
                        target_options=(Option("to-ports", str(DNS_CAPTURE_PORT)),))
        if not (gen.zones_always or cfg.dns_conntrack_zone):
            return
        # The agent's own queries (zone 1) and its answers to the app (zone 2) ...
        for kind, ident in self.owners():
            self.append(RAW, chain, "CT", protocol=UDP, matches=(dport, owner(kind, ident)),
                        target_options=zone(ZONE_AGENT_UPSTREAM))
            self.append(RAW, chain, "CT", protocol=UDP,
                        matches=(port(UDP, "sport", DNS_CAPTURE_PORT), owner(kind, ident)),
                        target_options=zone(ZONE_APP_AGENT))
        # ... the app's queries (zone 2) and the resolvers' answers (zone 1; 1.20: by source).
        sport = port(UDP, "sport", DNS_PORT)
        for server in servers:
            self.append(RAW, chain, "CT", destination=server, protocol=UDP, matches=(dport,),
                        target_options=zone(ZONE_APP_AGENT))
            self.append(RAW, PREROUTING, "CT", source=server if gen.zone1_by_source else None,
                        destination=None if gen.zone1_by_source else server, protocol=UDP, matches=(sport,),
                        target_options=zone(ZONE_AGENT_UPSTREAM))

    def tproxy_marks(self) -> None:
        """TPROXY: the connection mark carries the TPROXY mark back out; marked traffic skips capture."""
        cfg, gen = self.config, self.gen
        mark = cfg.tproxy_mark
        self.append(MANGLE, PREROUTING, "CONNMARK", protocol=TCP, matches=(mark_match("mark", mark),),
                    target_options=connmark("save-mark"))
        if gen.tproxy_outbound_mark:  # 1.11
            self.append(MANGLE, OUTPUT, RETURN, out_interface="lo", protocol=TCP,
                        matches=(mark_match("mark", mark),))
            for kind, ident in self.owners():
                self.append(MANGLE, OUTPUT, "MARK", destination=self.loop, negate_destination=True,
                            out_interface="lo", protocol=TCP, matches=(owner(kind, ident),),
                            target_options=set_mark(OUTBOUND_MARK))
        self.append(MANGLE, OUTPUT, "CONNMARK", protocol=TCP, matches=(mark_match("connmark", mark),),
                    target_options=connmark("restore-mark"))
        self.insert(1, MANGLE, ISTIO_INBOUND, RETURN, protocol=TCP, matches=(mark_match("mark", mark),))
        if gen.tproxy_outbound_mark:
            self.insert(2, MANGLE, ISTIO_INBOUND, RETURN, source=self.six, in_interface="lo", protocol=TCP)
            self.insert(3, MANGLE, ISTIO_INBOUND, RETURN, in_interface="lo", protocol=TCP,
                        matches=(mark_match("mark", OUTBOUND_MARK, negated=True),))

    def build_ipv6_before_1_12(self) -> FamilyPlan:
        """IPv6 in 1.9 to 1.11 (`handleInboundIpv6Rules`): REDIRECT only, no DNS, 1.8's owner rules."""
        cfg = self.config
        self.short_circuit_interfaces()
        self.append(NAT, ISTIO_INBOUND, RETURN, protocol=TCP, matches=(port(TCP, "dport", cfg.inbound_tunnel_port),))
        self.append(NAT, ISTIO_REDIRECT, REDIRECT, protocol=TCP, target_options=redirect_to(cfg.envoy_port))
        self.append(NAT, ISTIO_IN_REDIRECT, REDIRECT, protocol=TCP,
                    target_options=redirect_to(cfg.inbound_capture_port))
        if cfg.inbound_enabled:
            self.inbound(tproxy=False)
        self.append(NAT, OUTPUT, ISTIO_OUTPUT, protocol=TCP)
        for number in cfg.outbound_ports_exclude:
            self.append(NAT, ISTIO_OUTPUT, RETURN, protocol=TCP, matches=(port(TCP, "dport", number),))
        self.append(NAT, ISTIO_OUTPUT, RETURN, source=self.six, out_interface="lo")
        self.proxy_owners(dns=False)
        self.append(NAT, ISTIO_OUTPUT, RETURN, destination=self.loop)
        self.steps += destination_appends(NAT, ISTIO_OUTPUT, RETURN, self.cidrs(cfg.exclude_cidrs))
        for number in cfg.outbound_ports:
            self.append(NAT, ISTIO_OUTPUT, ISTIO_REDIRECT, protocol=TCP, matches=(port(TCP, "dport", number),))
        # As in those releases, a KubeVirt interface with `-i '*'` returns instead of redirecting.
        self.outbound_include(kube_virt_target=RETURN)
        return FamilyPlan(self.family, tuple(self.steps))
