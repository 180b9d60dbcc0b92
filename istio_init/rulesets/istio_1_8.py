"""Istio 1.8's rule set: `plan(config, ipv6)` -> RulePlan, step by step as in docs/rules-1.8.md.

This is the one file that says which rules the 1.8 rule set makes and in which
order. It is pure (no kernel, no environment), so every test can run it. The
step numbers in the comments are the numbered steps of docs/rules-1.8.md.
"""

from __future__ import annotations

from istio_init.config import Cidr, Config
from istio_init.model import (APPEND, INSERT, IPV4_PASSTHROUGH_ADDRESS, IPV6_PASSTHROUGH_ADDRESS, FamilyPlan, Match,
                              Option, PolicyRoute, Rule, RulePlan, Step, destination_appends)
from istio_init.rulesets.parts import (DNS_CAPTURE_PORT, DNS_PORT, ISTIO_DIVERT, ISTIO_IN_REDIRECT, ISTIO_INBOUND,
                                       ISTIO_OUTPUT, ISTIO_REDIRECT, ISTIO_TPROXY, MANGLE, NAT, OUTPUT, POSTROUTING,
                                       PREROUTING, REDIRECT, RETURN, SSH_PORT, TCP, owner)
from istio_init.records import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any, Iterable, Sequence

MULTIPORT_MAX = 15  # xt_multiport's limit per rule


NAME = "1.8"
# Every chain this rule set can create, per table: only these are istio-init's.
OWNED_CHAINS = {
    NAT: (ISTIO_INBOUND, ISTIO_IN_REDIRECT, ISTIO_OUTPUT, ISTIO_REDIRECT),
    MANGLE: (ISTIO_INBOUND, ISTIO_DIVERT, ISTIO_TPROXY),
}


def shape_configs() -> list[Config]:
    """Configs reaching every rule this set writes into built-in chains, variable parts as sentinels."""
    from istio_init.rulesets.sentinels import shape_config

    return [shape_config(NAME)]


def plan(config: Config, ipv6: bool, resolvers: Sequence[str] = ()) -> RulePlan:
    """The complete rule plan for `config` on a pod whose address family is known.

    `resolvers` are ignored: 1.8 captures DNS to any address (docs/rules-1.8.md, step 18).
    """
    ipv4_plan = _Family(config, 4).build()
    ipv6_plan = _Family(config, 6).build() if ipv6 else None
    routes: tuple[PolicyRoute, ...] = ()
    if config.tproxy and config.inbound_enabled:
        routes = (PolicyRoute(4, config.tproxy_mark, config.tproxy_route_table),)
    # Step 1: on IPv6 pods ::6 is the source of inbound passthrough connections.
    loopback = (IPV6_PASSTHROUGH_ADDRESS,) if ipv6 else ()
    return RulePlan(ipv4=ipv4_plan, ipv6=ipv6_plan, routes=routes, loopback_addresses=loopback)


def _tcp_dport(port: int | str) -> Match:
    return Match(TCP, (Option("dport", str(port)),))


def _established() -> Match:
    return Match("conntrack", (Option("ctstate", "RELATED,ESTABLISHED"),))


def _mark(mark: int) -> str:
    return f"{mark:#x}/0xffffffff"


def _port_groups(ports: Sequence[int], multiport: bool) -> list[Match]:
    """One `--dport` match per port, or `-m multiport` groups when asked for."""
    if not multiport or len(ports) < 2:
        return [_tcp_dport(port) for port in ports]
    groups = [ports[i:i + MULTIPORT_MAX] for i in range(0, len(ports), MULTIPORT_MAX)]
    return [
        _tcp_dport(group[0]) if len(group) == 1
        else Match("multiport", (Option("dports", ",".join(map(str, group))),))
        for group in groups
    ]


class _Family:
    """Builds one family's steps; IPv6 differs from IPv4 only where docs/rules-1.8.md says so."""

    def __init__(self, config: Config, family: int) -> None:
        self.config = config
        self.family = family
        self.v6 = family == 6
        self.localhost = "::1/128" if self.v6 else "127.0.0.1/32"
        self.passthrough = IPV6_PASSTHROUGH_ADDRESS if self.v6 else IPV4_PASSTHROUGH_ADDRESS
        self.steps: list[Step] = []

    def append(self, table: str, chain: str, target: str, **parts: Any) -> None:
        self.steps.append(Step(APPEND, Rule(table, chain, target, **parts)))

    def insert(self, table: str, chain: str, target: str, **parts: Any) -> None:
        self.steps.append(Step(INSERT, Rule(table, chain, target, **parts)))

    def cidrs(self, networks: Iterable[Cidr]) -> list[str]:
        return [net.text for net in networks if net.version == self.family]

    def ports(self, ports: Sequence[int]) -> list[Match]:
        return _port_groups(ports, self.config.multiport)

    def build(self) -> FamilyPlan:
        cfg = self.config
        tproxy = cfg.tproxy and not self.v6  # IPv6 inbound is always REDIRECT

        # 2. Traffic arriving on a KubeVirt interface is not inbound capture.
        for iface in cfg.kube_virt_interfaces:
            self.insert(NAT, PREROUTING, RETURN, in_interface=iface)

        # 3. The inbound tunnel port is never captured.
        self.append(NAT, ISTIO_INBOUND, RETURN, protocol=TCP, matches=(_tcp_dport(cfg.inbound_tunnel_port),))

        # 4-6. The redirect chains: DNS first, so it wins over the catch-all.
        if cfg.dns_capture and not self.v6:
            self.append(NAT, ISTIO_REDIRECT, REDIRECT, protocol=TCP, matches=(_tcp_dport(DNS_PORT),),
                        target_options=(Option("to-ports", str(DNS_CAPTURE_PORT)),))
        self.append(NAT, ISTIO_REDIRECT, REDIRECT, protocol=TCP,
                    target_options=(Option("to-ports", str(cfg.envoy_port)),))
        self.append(NAT, ISTIO_IN_REDIRECT, REDIRECT, protocol=TCP,
                    target_options=(Option("to-ports", str(cfg.inbound_capture_port)),))

        # 7. Inbound capture.
        if cfg.inbound_enabled:
            self.inbound(tproxy)

        # 8-9. Outbound: all TCP leaving the pod goes through ISTIO_OUTPUT.
        self.append(NAT, OUTPUT, ISTIO_OUTPUT, protocol=TCP)
        for match in self.ports(cfg.outbound_ports_exclude):
            self.append(NAT, ISTIO_OUTPUT, RETURN, protocol=TCP, matches=(match,))

        # 10. The inbound passthrough source is the proxy talking to the app.
        self.append(NAT, ISTIO_OUTPUT, RETURN, source=self.passthrough, out_interface="lo")

        # 11-12. The proxy's own traffic; on lo, the proxy calling a local service
        # by a non-local address goes back through inbound capture.
        loopback_in_include = any(net.is_loopback for net in cfg.outbound_cidrs.items)
        for kind, ids in (("uid", cfg.proxy_uids), ("gid", cfg.proxy_gids)):
            for ident in ids:
                self.append(NAT, ISTIO_OUTPUT, ISTIO_IN_REDIRECT, destination=self.localhost,
                            negate_destination=True, out_interface="lo", matches=(owner(kind, ident),))
                if self.v6 or not loopback_in_include:
                    self.append(NAT, ISTIO_OUTPUT, RETURN, out_interface="lo",
                                matches=(owner(kind, ident, negated=True),))
                self.append(NAT, ISTIO_OUTPUT, RETURN, matches=(owner(kind, ident),))

        # 13-14. Local and excluded destinations are never captured.
        self.append(NAT, ISTIO_OUTPUT, RETURN, destination=self.localhost)
        self.steps += destination_appends(NAT, ISTIO_OUTPUT, RETURN, self.cidrs(cfg.exclude_cidrs))

        # 15. Ports always captured (IPv4 only, as in Istio).
        if not self.v6:
            for match in self.ports(cfg.outbound_ports):
                self.append(NAT, ISTIO_OUTPUT, ISTIO_REDIRECT, protocol=TCP, matches=(match,))

        # 16. What to capture outbound.
        self.outbound_include()

        if not self.v6:
            # 18. DNS over UDP: DNAT to the agent, except the proxy's own queries.
            if cfg.dns_capture:
                self.dns_udp()
            # 19. Replies from the app to TPROXY-captured connections need the mark too.
            if tproxy:
                self.append(MANGLE, OUTPUT, "MARK", source="127.0.0.1/32", destination="127.0.0.1/32",
                            negate_destination=True, protocol=TCP,
                            target_options=(Option("set-xmark", _mark(cfg.tproxy_mark)),))
        return FamilyPlan(self.family, tuple(self.steps))

    def inbound(self, tproxy: bool) -> None:
        cfg = self.config
        table = MANGLE if tproxy else NAT
        if tproxy:
            # Marked packets are routed to lo by the policy route (RulePlan.routes).
            self.append(MANGLE, ISTIO_DIVERT, "MARK", target_options=(Option("set-xmark", _mark(cfg.tproxy_mark)),))
            self.append(MANGLE, ISTIO_DIVERT, "ACCEPT")
            self.append(MANGLE, ISTIO_TPROXY, "TPROXY", destination="127.0.0.1/32", negate_destination=True,
                        protocol=TCP, target_options=(
                            Option("on-port", str(cfg.inbound_capture_port)),
                            Option("on-ip", "0.0.0.0"),
                            Option("tproxy-mark", _mark(cfg.tproxy_mark))))
        self.append(table, PREROUTING, ISTIO_INBOUND, protocol=TCP)

        def capture(matches: tuple[Match, ...]) -> None:
            if tproxy:
                self.append(MANGLE, ISTIO_INBOUND, ISTIO_DIVERT, protocol=TCP, matches=matches + (_established(),))
                self.append(MANGLE, ISTIO_INBOUND, ISTIO_TPROXY, protocol=TCP, matches=matches)
            else:
                self.append(NAT, ISTIO_INBOUND, ISTIO_IN_REDIRECT, protocol=TCP, matches=matches)

        if cfg.inbound_ports.all:
            # SSH stays reachable even with everything captured.
            for match in self.ports([SSH_PORT, *cfg.local_exclude_ports]):
                self.append(table, ISTIO_INBOUND, RETURN, protocol=TCP, matches=(match,))
            capture(())
        else:
            for match in self.ports(cfg.inbound_ports.items):
                capture((match,))

    def outbound_include(self) -> None:
        cfg = self.config
        if cfg.outbound_cidrs.all:
            self.append(NAT, ISTIO_OUTPUT, ISTIO_REDIRECT)
            for iface in cfg.kube_virt_interfaces:
                self.insert(NAT, PREROUTING, ISTIO_REDIRECT, in_interface=iface)
            return
        cidrs = self.cidrs(cfg.outbound_cidrs.items)
        for cidr in cidrs:
            for iface in cfg.kube_virt_interfaces:
                self.insert(NAT, PREROUTING, ISTIO_REDIRECT, destination=cidr, in_interface=iface)
            self.append(NAT, ISTIO_OUTPUT, ISTIO_REDIRECT, destination=cidr)
        if cidrs:
            self.append(NAT, ISTIO_OUTPUT, RETURN)

    def dns_udp(self) -> None:
        cfg = self.config
        dns = Match("udp", (Option("dport", str(DNS_PORT)),))
        for kind, ids in (("uid", cfg.proxy_uids), ("gid", cfg.proxy_gids)):
            for ident in ids:
                self.append(NAT, OUTPUT, RETURN, protocol="udp", matches=(dns, owner(kind, ident)))
        self.append(NAT, OUTPUT, "DNAT", protocol="udp", matches=(dns,),
                    target_options=(Option("to-destination", f"127.0.0.1:{DNS_CAPTURE_PORT}"),))
        self.append(NAT, POSTROUTING, "SNAT", protocol="udp",
                    matches=(Match("udp", (Option("dport", str(DNS_CAPTURE_PORT)),)),),
                    target_options=(Option("to-source", "127.0.0.1"),))
