"""Current Istio's rule set (1.25 to 1.32): `plan(config, ipv6, resolvers)`, step by step as RULES-CURRENT.md.

This is the one file that says which rules the current rule set makes and in
which order; the step numbers in the comments are the numbered steps of
RULES-CURRENT.md's algorithm. It is pure: the pod's DNS resolvers (the
`nameserver` lines of its /etc/resolv.conf) are read by the runner and passed
in, so every test can run it without a kernel or a file.

Both families are built by the same code: current Istio writes the same rule
in IPv4 and IPv6 ("both") wherever RULES-CURRENT.md does not say otherwise,
with the family's loopback (`LOOP`) and inbound passthrough source (`SIX`).
Each family's operations are grouped by table in Istio's order (mangle, nat,
raw), keeping creation order within a table, as Istio's restore input does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

from istio_init.config import Cidr, Config
from istio_init.model import (APPEND, INSERT, IPV4_PASSTHROUGH_ADDRESS, IPV6_PASSTHROUGH_ADDRESS, FamilyPlan, Match,
                              Option, PolicyRoute, Rule, RulePlan, Step, destination_appends)

if TYPE_CHECKING:
    import ipaddress

# ipaddress and the C socket module's inet_ntop are imported where used: every run imports this
# module (rulesets/__init__.py), and `socket` plus `ipaddress` are about 3 ms of start-up (README, "Start-up time").

MANGLE = "mangle"
NAT = "nat"
RAW = "raw"
TABLE_ORDER = (MANGLE, NAT, RAW)

PREROUTING = "PREROUTING"
OUTPUT = "OUTPUT"

ISTIO_INBOUND = "ISTIO_INBOUND"
ISTIO_IN_REDIRECT = "ISTIO_IN_REDIRECT"
ISTIO_OUTPUT = "ISTIO_OUTPUT"
ISTIO_OUTPUT_DNS = "ISTIO_OUTPUT_DNS"
ISTIO_REDIRECT = "ISTIO_REDIRECT"
ISTIO_DIVERT = "ISTIO_DIVERT"
ISTIO_TPROXY = "ISTIO_TPROXY"
ISTIO_DROP = "ISTIO_DROP"

RETURN = "RETURN"
REDIRECT = "REDIRECT"
TCP = "tcp"
UDP = "udp"

DNS_PORT = 53
DNS_CAPTURE_PORT = 15053
# The mark the proxy's own loopback connections get in TPROXY mode (Istio's OutboundMark).
OUTBOUND_MARK = 1338
# Conntrack zones that keep the app<->agent and agent<->resolver halves of a DNS query apart.
ZONE_AGENT_UPSTREAM = "1"
ZONE_APP_AGENT = "2"


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
    --capture-all-dns.
    """
    servers: dict[int, list[str]] = {4: [], 6: []}
    for address in resolvers:
        import ipaddress

        parsed = ipaddress.ip_address(address)
        servers[parsed.version].append(_host(parsed))
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


def _host(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """A host CIDR spelled as iptables-save prints it (glibc's inet_ntop, e.g. `::127.0.0.53/128`)."""
    import _socket

    if address.version == 4:
        return f"{address}/32"
    return f"{_socket.inet_ntop(_socket.AF_INET6, address.packed)}/128"


def _cidr_text(cidr: Cidr) -> str:
    """A CIDR of -i/-x as iptables-save prints it (IPv6 through inet_ntop, as _host)."""
    if cidr.version == 4:
        return cidr.text
    import _socket
    import ipaddress

    network = ipaddress.ip_network(cidr.text)
    return f"{_socket.inet_ntop(_socket.AF_INET6, network.network_address.packed)}/{network.prefixlen}"


def _port(protocol: str, name: str, port: int | str, negated: bool = False) -> Match:
    return Match(protocol, (Option(name, str(port), negated),))


def _owner(kind: str, ident: int, negated: bool = False) -> Match:
    return Match("owner", (Option(f"{kind}-owner", str(ident), negated),))


def _mark_match(module: str, mark: int, negated: bool = False) -> Match:
    return Match(module, (Option("mark", f"{mark:#x}", negated),))


def _set_mark(mark: int) -> tuple[Option, ...]:
    return (Option("set-xmark", f"{mark:#x}/0xffffffff"),)


def _zone(zone: str) -> tuple[Option, ...]:
    return (Option("zone", zone),)


def _connmark(action: str) -> tuple[Option, ...]:
    return (Option(action), Option("nfmask", "0xffffffff"), Option("ctmask", "0xffffffff"))


def _redirect_to(port: int) -> tuple[Option, ...]:
    return (Option("to-ports", str(port)),)


class _Family:
    """Builds one family's steps in RULES-CURRENT.md's order."""

    def __init__(self, config: Config, family: int, resolvers: list[str], dns: bool) -> None:
        self.config = config
        self.family = family
        self.v6 = family == 6
        self.loop = "::1/128" if self.v6 else config.ipv4_loopback_cidr  # LOOP
        self.six = IPV6_PASSTHROUGH_ADDRESS if self.v6 else IPV4_PASSTHROUGH_ADDRESS  # SIX
        self.resolvers = resolvers
        self.dns = dns  # DNS capture on and effective (capture-all, or a resolver in some family)
        self.steps: list[Step] = []

    def append(self, table: str, chain: str, target: str, **parts: Any) -> None:
        self.steps.append(Step(APPEND, Rule(table, chain, target, **parts)))

    def insert(self, position: int, table: str, chain: str, target: str, **parts: Any) -> None:
        self.steps.append(Step(INSERT, Rule(table, chain, target, **parts), position))

    def cidrs(self, networks: Iterable[Cidr]) -> list[str]:
        return [_cidr_text(net) for net in networks if net.version == self.family]

    def owners(self) -> list[tuple[str, int]]:
        """The proxy's uids, then its gids, as (owner kind, id)."""
        cfg = self.config
        return [("uid", u) for u in cfg.proxy_uids] + [("gid", g) for g in cfg.proxy_gids]

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
        self.append(NAT, ISTIO_INBOUND, RETURN, protocol=TCP, matches=(_port(TCP, "dport", tunnel),))

        # 5. The redirect chains.
        self.append(NAT, ISTIO_REDIRECT, REDIRECT, protocol=TCP, target_options=_redirect_to(cfg.envoy_port))
        self.append(NAT, ISTIO_IN_REDIRECT, REDIRECT, protocol=TCP,
                    target_options=_redirect_to(cfg.inbound_capture_port))

        # 6. Inbound capture.
        if cfg.inbound_enabled:
            self.inbound()

        # 7. Outbound: everything leaving the pod enters ISTIO_OUTPUT (UDP too, for DNS).
        self.append(NAT, OUTPUT, ISTIO_OUTPUT)

        # 8. Ports never captured outbound, TCP and UDP.
        for port in cfg.outbound_ports_exclude:
            self.append(NAT, ISTIO_OUTPUT, RETURN, protocol=TCP, matches=(_port(TCP, "dport", port),))
            self.append(NAT, ISTIO_OUTPUT, RETURN, protocol=UDP, matches=(_port(UDP, "dport", port),))

        # 9. The inbound passthrough source is the proxy talking to the app.
        self.append(NAT, ISTIO_OUTPUT, RETURN, source=self.six, out_interface="lo")

        # 10-11. The proxy's own traffic. On lo, the proxy calling a local service by a
        # non-local address goes back through inbound capture (not the tunnel port, and
        # with DNS capture not DNS, for uids); another process's lo traffic is left alone.
        loopback_in_include = any(net.is_loopback for net in cfg.outbound_cidrs)
        for kind, ident in self.owners():
            if self.dns and kind == "uid":
                not_local_port = Match("multiport", (Option("dports", f"{DNS_PORT},{tunnel}", True),))
            else:
                not_local_port = _port(TCP, "dport", tunnel, negated=True)
            self.append(NAT, ISTIO_OUTPUT, ISTIO_IN_REDIRECT, destination=self.loop, negate_destination=True,
                        out_interface="lo", protocol=TCP, matches=(not_local_port, _owner(kind, ident)))
            if not loopback_in_include:
                if self.dns:
                    self.append(NAT, ISTIO_OUTPUT, RETURN, out_interface="lo", protocol=TCP,
                                matches=(_port(TCP, "dport", DNS_PORT, negated=True),
                                         _owner(kind, ident, negated=True)))
                else:
                    self.append(NAT, ISTIO_OUTPUT, RETURN, out_interface="lo",
                                matches=(_owner(kind, ident, negated=True),))
            self.append(NAT, ISTIO_OUTPUT, RETURN, matches=(_owner(kind, ident),))

        # 12. Owner groups: only the included groups' traffic is captured, or all but the excluded.
        if cfg.owner_groups_include is None:
            for gid in cfg.owner_groups_exclude:
                self.append(NAT, ISTIO_OUTPUT, RETURN, matches=(_owner("gid", gid),))
        else:
            self.append(NAT, ISTIO_OUTPUT, RETURN,
                        matches=tuple(_owner("gid", gid, negated=True) for gid in cfg.owner_groups_include))

        # 13. DNS to the agent on 15053, in conntrack zones of their own.
        if self.dns:
            self.dns_capture()

        # 14. Local and excluded destinations are never captured.
        self.append(NAT, ISTIO_OUTPUT, RETURN, destination=self.loop)
        self.steps += destination_appends(NAT, ISTIO_OUTPUT, RETURN, self.cidrs(cfg.exclude_cidrs))

        # 15. Ports always captured, whatever -i says.
        for port in cfg.outbound_ports:
            self.append(NAT, ISTIO_OUTPUT, ISTIO_REDIRECT, protocol=TCP, matches=(_port(TCP, "dport", port),))

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
            self.append(MANGLE, ISTIO_DIVERT, "MARK", target_options=_set_mark(cfg.tproxy_mark))
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

        if cfg.capture_all_inbound:
            for port in cfg.local_exclude_ports:
                self.append(table, ISTIO_INBOUND, RETURN, protocol=TCP, matches=(_port(TCP, "dport", port),))
            capture(())
        else:
            for port in cfg.inbound_ports:
                capture((_port(TCP, "dport", port),))

    def dns_capture(self) -> None:
        cfg = self.config
        self.append(RAW, OUTPUT, ISTIO_OUTPUT_DNS)
        if cfg.capture_all_dns or self.resolvers:
            self.append(NAT, ISTIO_OUTPUT, ISTIO_OUTPUT_DNS)
        # All TCP redirects, then all UDP ones; only queries to the pod's resolvers
        # unless capture-all (a local DNS proxy's upstream queries must not loop back).
        for protocol in (TCP, UDP):
            dport = _port(protocol, "dport", DNS_PORT)
            if cfg.capture_all_dns:
                self.append(NAT, ISTIO_OUTPUT_DNS, REDIRECT, protocol=protocol, matches=(dport,),
                            target_options=_redirect_to(DNS_CAPTURE_PORT))
            else:
                for server in self.resolvers:
                    self.append(NAT, ISTIO_OUTPUT_DNS, REDIRECT, destination=server, protocol=protocol,
                                matches=(dport,), target_options=_redirect_to(DNS_CAPTURE_PORT))
        # The agent's own queries (zone 1) and its answers to the app (zone 2).
        for kind, ident in self.owners():
            self.append(RAW, ISTIO_OUTPUT_DNS, "CT", protocol=UDP,
                        matches=(_port(UDP, "dport", DNS_PORT), _owner(kind, ident)),
                        target_options=_zone(ZONE_AGENT_UPSTREAM))
            self.append(RAW, ISTIO_OUTPUT_DNS, "CT", protocol=UDP,
                        matches=(_port(UDP, "sport", DNS_CAPTURE_PORT), _owner(kind, ident)),
                        target_options=_zone(ZONE_APP_AGENT))
        # The app's queries (zone 2) and the resolvers' answers (zone 1).
        if cfg.capture_all_dns:
            self.append(RAW, PREROUTING, ISTIO_INBOUND)
            self.append(RAW, ISTIO_OUTPUT_DNS, "CT", protocol=UDP, matches=(_port(UDP, "dport", DNS_PORT),),
                        target_options=_zone(ZONE_APP_AGENT))
            self.append(RAW, ISTIO_INBOUND, "CT", protocol=UDP, matches=(_port(UDP, "sport", DNS_PORT),),
                        target_options=_zone(ZONE_AGENT_UPSTREAM))
        elif self.resolvers:
            self.append(RAW, PREROUTING, ISTIO_INBOUND)
            for server in self.resolvers:
                self.append(RAW, ISTIO_OUTPUT_DNS, "CT", destination=server, protocol=UDP,
                            matches=(_port(UDP, "dport", DNS_PORT),), target_options=_zone(ZONE_APP_AGENT))
                self.append(RAW, ISTIO_INBOUND, "CT", source=server, protocol=UDP,
                            matches=(_port(UDP, "sport", DNS_PORT),), target_options=_zone(ZONE_AGENT_UPSTREAM))

    def outbound_include(self) -> None:
        cfg = self.config
        if cfg.capture_all_outbound:
            self.append(NAT, ISTIO_OUTPUT, ISTIO_REDIRECT)
            for iface in cfg.kube_virt_interfaces:
                self.insert(1, NAT, PREROUTING, ISTIO_REDIRECT, in_interface=iface)
            return
        for cidr in self.cidrs(cfg.outbound_cidrs):
            for iface in cfg.kube_virt_interfaces:
                self.insert(1, NAT, PREROUTING, ISTIO_REDIRECT, destination=cidr, in_interface=iface)
            self.append(NAT, ISTIO_OUTPUT, ISTIO_REDIRECT, destination=cidr)

    def tproxy_marks(self) -> None:
        cfg = self.config
        mark = cfg.tproxy_mark
        self.append(MANGLE, PREROUTING, "CONNMARK", protocol=TCP, matches=(_mark_match("mark", mark),),
                    target_options=_connmark("save-mark"))
        self.append(MANGLE, OUTPUT, RETURN, out_interface="lo", protocol=TCP, matches=(_mark_match("mark", mark),))
        for kind, ident in self.owners():
            self.append(MANGLE, OUTPUT, "MARK", destination=self.loop, negate_destination=True, out_interface="lo",
                        protocol=TCP, matches=(_owner(kind, ident),), target_options=_set_mark(OUTBOUND_MARK))
        self.append(MANGLE, OUTPUT, "CONNMARK", protocol=TCP, matches=(_mark_match("connmark", mark),),
                    target_options=_connmark("restore-mark"))
        # Marked, passthrough and the proxy's unmarked loopback traffic skip inbound capture.
        self.insert(1, MANGLE, ISTIO_INBOUND, RETURN, protocol=TCP, matches=(_mark_match("mark", mark),))
        self.insert(2, MANGLE, ISTIO_INBOUND, RETURN, source=self.six, in_interface="lo", protocol=TCP)
        self.insert(3, MANGLE, ISTIO_INBOUND, RETURN, in_interface="lo", protocol=TCP,
                    matches=(_mark_match("mark", OUTBOUND_MARK, negated=True),))
