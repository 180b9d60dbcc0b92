"""Hypothesis strategies for `model.Rule`s of every shape istio-init's rule sets plan.

The shapes are those the rule sets (1.8, 1.9-1.24, current) and the CNI form
write, taken from their plans: addresses (IPv4 and IPv6 CIDRs, negated
destinations), interfaces (wildcards, every character a `-k` name may hold),
tcp/udp ports and multiport lists (negated or not), owner uids and gids
(several owner matches in one rule), packet and connection marks, conntrack
states, and the targets (a jump, RETURN, ACCEPT, DROP, REDIRECT, DNAT, SNAT,
MARK, CONNMARK, CT, NFLOG, TPROXY) with their options. Values are spelled as
the planners spell them (the kernel's canonical form): marks in hex, ids and
ports in decimal, networks with their host bits cleared.

Shared by tests/test_iptables_save_roundtrip.py and tests/test_nft_roundtrip.py.
"""

from __future__ import annotations

import ipaddress
import string

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from istio_init import ifnames
from istio_init.model import Match, Option, Rule, is_builtin

# Characters config.py refuses in any value (shell and iptables metacharacters, controls).
_REFUSED = set(";&|$`<>(){}[]\\'\"!?~#\x7f") | {chr(c) for c in range(0x20)}
# What a -k name may hold: ASCII without the refused characters, and letters of other scripts.
_NAME_CHARS = "".join(c for c in string.ascii_letters + string.digits + string.punctuation if c not in _REFUSED)
_NAME_CHARS += "éüßДОБжλ"

# The chains of each table the rule sets write to (built-in and their own).
CHAINS = {
    "nat": ("PREROUTING", "OUTPUT", "POSTROUTING", "ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT",
            "ISTIO_OUTPUT_DNS", "ISTIO_REDIRECT"),
    "mangle": ("PREROUTING", "OUTPUT", "ISTIO_DIVERT", "ISTIO_DROP", "ISTIO_INBOUND", "ISTIO_TPROXY"),
    "raw": ("PREROUTING", "OUTPUT", "ISTIO_INBOUND", "ISTIO_OUTPUT", "ISTIO_OUTPUT_DNS"),
}
USER_CHAINS = {table: tuple(c for c in chains if c.startswith("ISTIO_")) for table, chains in CHAINS.items()}


def bounded(max_examples: int) -> settings:
    """Deterministic and bounded, as every property test here: CI sees the same examples each run."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])


def _network(family: int, bits: int, prefix: int) -> str:
    """A network as the kernel prints it: host bits cleared, IPv6 through inet_ntop's spelling."""
    import socket

    network = ipaddress.ip_network((bits, prefix), strict=False) if family == 4 else \
        ipaddress.IPv6Network((bits, prefix), strict=False)
    if family == 4:
        return str(network)
    return f"{socket.inet_ntop(socket.AF_INET6, network.network_address.packed)}/{prefix}"


def cidrs(family: int) -> st.SearchStrategy[str]:
    """Networks of `family`, from /1 to a host; IPv6 includes the IPv4-mapped and -compatible forms.

    No /0: the kernel stores a /0 as no address at all, and the rule sets plan
    none (rulesets/parts.py spells an -i/-x /0 as no address).
    """
    width = 32 if family == 4 else 128
    bits = st.integers(0, 2**width - 1)
    if family == 6:
        bits = st.one_of(bits, st.integers(0, 2**32 - 1).map(lambda low: 0xFFFF << 32 | low),
                         st.integers(2, 2**32 - 1), st.sampled_from([1, 0x20010DB8 << 96]))
    return st.builds(lambda b, p: _network(family, b, p), bits, st.integers(1, width))


def interface_names(nft: bool = False) -> st.SearchStrategy[str]:
    """Names a -k/-c flag accepts: the kernel's limits and ifnames' refusals, with or without a '+' wildcard.

    `nft`: without the one name nft cannot hold, 15 bytes ending in a literal
    '*' (the escape that keeps it from being a wildcard is counted in them).
    """
    name = st.text(alphabet=_NAME_CHARS, min_size=1, max_size=15)
    name = st.one_of(name, name.map(lambda n: n[:14] + "+"))
    return name.filter(lambda n: ifnames.kernel_refusal(n) is None and ifnames.common_refusal(n) is None
                       and not (nft and n.endswith("*") and len(n.encode()) >= ifnames.IFNAMSIZ - 1))


_PORT = st.integers(1, 65535).map(str)
_ID = st.integers(0, 2**32 - 2).map(str)
_MARK = st.integers(1, 2**32 - 1)


def _port_match(protocol: str) -> st.SearchStrategy[Match]:
    single = st.builds(lambda name, port, neg: Match(protocol, (Option(name, port, neg),)),
                       st.sampled_from(["dport", "sport"]), _PORT, st.booleans())
    many = st.builds(lambda name, ports, neg: Match("multiport", (Option(name, ",".join(ports), neg),)),
                     st.sampled_from(["dports", "sports"]),
                     st.lists(_PORT, min_size=2, max_size=15, unique=True), st.booleans())
    return st.one_of(single, many)


_OWNER = st.builds(lambda kind, ident, neg: Match("owner", (Option(f"{kind}-owner", ident, neg),)),
                   st.sampled_from(["uid", "gid"]), _ID, st.booleans())
_MARK_MATCH = st.builds(lambda module, mark, neg: Match(module, (Option("mark", f"{mark:#x}", neg),)),
                        st.sampled_from(["mark", "connmark"]), _MARK, st.booleans())
_CTSTATE = st.builds(lambda states, neg: Match("conntrack", (Option("ctstate", states, neg),)),
                     st.sampled_from(["INVALID", "RELATED,ESTABLISHED", "NEW", "ESTABLISHED"]), st.booleans())


def _mark_option(name: str) -> st.SearchStrategy[Option]:
    return _MARK.map(lambda mark: Option(name, f"{mark:#x}/0xffffffff"))


def targets(table: str, chain: str, family: int, protocol: str | None) -> st.SearchStrategy[tuple[str, tuple[Option, ...]]]:
    """(target, its options) a rule set writes in `table`; jumps go to a later one of the table's chains."""
    later = [c for c in USER_CHAINS[table] if c > chain or is_builtin(table, chain)]  # no loop for the kernel
    plain = [st.just(("RETURN", ())), st.just(("ACCEPT", ()))]
    if later:
        plain.append(st.sampled_from(later).map(lambda c: (c, ())))
    loopback = "127.0.0.1" if family == 4 else "::1"
    # The rule sets' NFLOG group is never 0 (iptables-nft-save leaves a group 0 out, the legacy one prints it).
    nflog = st.builds(lambda prefix, group, size: ("NFLOG", (Option("nflog-prefix", prefix),
                                                             Option("nflog-group", group),
                                                             Option("nflog-size", size))),
                      st.text(alphabet=string.ascii_letters, min_size=1, max_size=20), st.integers(1, 65535).map(str),
                      st.integers(1, 65535).map(str))
    if table == "nat":
        choices = [*plain, nflog, st.just(("SNAT", (Option("to-source", loopback),)))]
        if protocol is not None:  # a port to redirect or translate to needs -p (the kernel's rule)
            where = st.builds(lambda port: f"{loopback}:{port}" if family == 4 else f"[{loopback}]:{port}", _PORT)
            choices += [_PORT.map(lambda port: ("REDIRECT", (Option("to-ports", port),))),
                        where.map(lambda to: ("DNAT", (Option("to-destination", to),)))]
        return st.one_of(*choices)
    if table == "mangle":
        connmark = st.sampled_from(["save-mark", "restore-mark"]).map(
            lambda action: ("CONNMARK", (Option(action), Option("nfmask", "0xffffffff"), Option("ctmask", "0xffffffff"))))
        choices = [*plain, st.just(("DROP", ())), connmark, _mark_option("set-xmark").map(lambda o: ("MARK", (o,)))]
        if protocol in ("tcp", "udp"):  # the kernel's TPROXY takes TCP and UDP only
            on_ip = "0.0.0.0" if family == 4 else "::"
            choices.append(st.builds(lambda port, mark: ("TPROXY", (Option("on-port", port), Option("on-ip", on_ip),
                                                                    mark)), _PORT, _mark_option("tproxy-mark")))
        return st.one_of(*choices)
    return st.one_of(*plain, st.just(("DROP", ())),
                     st.integers(1, 65535).map(lambda zone: ("CT", (Option("zone", str(zone)),))))


@st.composite
def rules(draw: st.DrawFn, family: int, table: str | None = None, chain: str | None = None,
          comments: bool = False, nft: bool = False, returns_only: bool = False) -> Rule:
    """One rule of `family` as a rule set plans it.

    `comments`: sometimes with a comment match, as other programs write them;
    `nft`: only interface names nft can hold (see interface_names);
    `returns_only`: RETURN or ACCEPT, which the kernel takes in every hook.
    """
    table = table or draw(st.sampled_from(sorted(CHAINS)))
    chain = chain or draw(st.sampled_from(CHAINS[table]))
    protocol = draw(st.sampled_from([None, "tcp", "udp"]))
    source = draw(st.none() | cidrs(family))
    destination = draw(st.none() | cidrs(family))
    negated = destination is not None and draw(st.booleans())
    in_interface = draw(st.none() | interface_names(nft))
    out_interface = draw(st.none() | interface_names(nft))
    matches: list[Match] = []
    if protocol is not None:
        matches += draw(st.lists(_port_match(protocol), max_size=1))
    # Owner matches repeat (the owner-groups rules), a mark, connmark or state match comes once at most
    # (iptables refuses a second `--mark` after a second `-m mark`), in any order.
    matches += draw(st.lists(st.one_of(_OWNER, _MARK_MATCH, _CTSTATE), max_size=3).filter(
        lambda found: len({m.module for m in found if m.module != "owner"}) == len([m for m in found
                                                                                    if m.module != "owner"])))
    if comments and draw(st.booleans()):
        comment = draw(st.text(alphabet=string.printable.strip() + " é", min_size=1, max_size=30))
        matches.insert(draw(st.integers(0, len(matches))), Match("comment", (Option("comment", comment),)))
    if returns_only:
        target, options = draw(st.sampled_from(["RETURN", "ACCEPT"])), ()
    else:
        target, options = draw(targets(table, chain, family, protocol))
    return Rule(table, chain, target, source, destination, negated, in_interface, out_interface, protocol,
                tuple(matches), options)
