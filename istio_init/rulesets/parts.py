"""The names and rule parts every rule set spells the same way: tables, chains, ports, matches.

Istio's releases kept these from 1.8 to today; each rule set imports what it
uses, so a chain's name or a match's spelling is written once. Values are in
the kernel's canonical spelling (see model.py).
"""

from __future__ import annotations

from istio_init.config import Cidr, Config
from istio_init.model import (APPEND, INSERT, IPV4_PASSTHROUGH_ADDRESS, IPV6_PASSTHROUGH_ADDRESS, Match, Option, Rule,
                              Step)
from istio_init.records import TYPE_CHECKING

if TYPE_CHECKING:
    import ipaddress
    from typing import Any, Iterable, Sequence

MANGLE = "mangle"
NAT = "nat"
RAW = "raw"

PREROUTING = "PREROUTING"
OUTPUT = "OUTPUT"
POSTROUTING = "POSTROUTING"

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

SSH_PORT = 22
DNS_PORT = 53
DNS_CAPTURE_PORT = 15053
# The mark the proxy's own loopback connections get in TPROXY mode (Istio's OutboundMark, 1.11 on).
OUTBOUND_MARK = 1338
# Conntrack zones that keep the app<->agent and agent<->resolver halves of a DNS query apart.
ZONE_AGENT_UPSTREAM = "1"
ZONE_APP_AGENT = "2"


def resolvers_by_family(resolvers: Sequence[str]) -> dict[int, list[str]]:
    """The pod's nameservers as host CIDRs, per family, in resolv.conf order."""
    servers: dict[int, list[str]] = {4: [], 6: []}
    for address in resolvers:
        import ipaddress

        parsed = ipaddress.ip_address(address)
        servers[parsed.version].append(host(parsed))
    return servers


def host(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """A host CIDR spelled as iptables-save prints it (glibc's inet_ntop, e.g. `::127.0.0.53/128`)."""
    import _socket

    if address.version == 4:
        return f"{address}/32"
    return f"{_socket.inet_ntop(_socket.AF_INET6, address.packed)}/128"


def cidr_text(cidr: Cidr) -> str | None:
    """A CIDR of -i/-x as iptables-save prints it (IPv6 through inet_ntop, as the tools do); None for a /0.

    The kernel stores a /0 as no address match at all and iptables-save prints
    none, so a rule planned with one would never read back as planned.
    """
    if cidr.text.endswith("/0"):
        return None
    if cidr.version == 4:
        return cidr.text
    import _socket
    import ipaddress

    network = ipaddress.ip_network(cidr.text)
    return f"{_socket.inet_ntop(_socket.AF_INET6, network.network_address.packed)}/{network.prefixlen}"


def cidr_texts(networks: Iterable[Cidr], family: int) -> Sequence[str | None]:
    """`cidr_text` of each network of `family`: the -i/-x addresses as the rules spell them.

    An -x list holds up to 8,000 IPv4 networks, which are already spelled as
    the kernel prints them: one test over the joined list finds a /0, instead
    of a call per item.
    """
    if family == 4:
        texts = [net.text for net in networks if net.version == 4]
        if "/0," not in ",".join(texts) + ",":
            return texts
    return [cidr_text(net) for net in networks if net.version == family]


def port(protocol: str, name: str, number: int | str, negated: bool = False) -> Match:
    return Match(protocol, (Option(name, str(number), negated),))


def owner(kind: str, ident: int, negated: bool = False) -> Match:
    return Match("owner", (Option(f"{kind}-owner", str(ident), negated),))


def mark_match(module: str, mark: int, negated: bool = False) -> Match:
    return Match(module, (Option("mark", f"{mark:#x}", negated),))


def set_mark(mark: int) -> tuple[Option, ...]:
    return (Option("set-xmark", f"{mark:#x}/0xffffffff"),)


def zone(number: str) -> tuple[Option, ...]:
    return (Option("zone", number),)


def connmark(action: str) -> tuple[Option, ...]:
    return (Option(action), Option("nfmask", "0xffffffff"), Option("ctmask", "0xffffffff"))


def redirect_to(number: int) -> tuple[Option, ...]:
    return (Option("to-ports", str(number)),)


class FamilyBuilder:
    """What a rule set's family builder starts from: the family's loopback and passthrough source,
    the proxy's owners, and the steps in creation order (appends, and inserts at a position)."""

    def __init__(self, config: Config, family: int, resolvers: list[str]) -> None:
        self.config = config
        self.family = family
        self.v6 = family == 6
        self.loop = "::1/128" if self.v6 else config.ipv4_loopback_cidr  # Istio's LOOP
        self.six = IPV6_PASSTHROUGH_ADDRESS if self.v6 else IPV4_PASSTHROUGH_ADDRESS  # Istio's SIX
        self.resolvers = resolvers  # the pod's nameservers of this family, as host CIDRs
        self.steps: list[Step] = []

    def append(self, table: str, chain: str, target: str, **parts: Any) -> None:
        self.steps.append(Step(APPEND, Rule(table, chain, target, **parts)))

    def insert(self, position: int, table: str, chain: str, target: str, **parts: Any) -> None:
        self.steps.append(Step(INSERT, Rule(table, chain, target, **parts), position))

    def cidrs(self, networks: Iterable[Cidr]) -> Sequence[str | None]:
        return cidr_texts(networks, self.family)

    def owners(self) -> list[tuple[str, int]]:
        """The proxy's uids, then its gids, as (owner kind, id)."""
        cfg = self.config
        return [("uid", u) for u in cfg.proxy_uids] + [("gid", g) for g in cfg.proxy_gids]
