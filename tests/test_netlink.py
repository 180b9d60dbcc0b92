"""istio-init's netlink (istio_init/host/netlink.py) held to an independent implementation: pyroute2's.

istio_init speaks netlink through its own small module; pyroute2 is a test
dependency only, the oracle here. For every message kind istio-init sends or
reads (rules, routes, addresses, nf_tables tables), with any header values and
any of the attributes istio-init looks at, pyroute2 decodes what ours encodes
to the same fields, and ours decodes what pyroute2 encodes to the same fields:
so the attribute numbers, widths, byte orders and padding agree with a second
reading of the kernel's headers. The requests the routing and `::6` code send
are pinned field by field, and a kernel refusal comes back as an OSError with
its errno. What the kernel holds after an apply (`ip rule`, `ip route`, `ip -6
addr`) is tests/test_policy_routing.py's, test_apply.py's and test_check.py's.
"""

from __future__ import annotations

import _socket
import struct
import sys
from typing import Any, Callable, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.nfnetlink.nftsocket import nft_table_msg
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from istio_init.host import addresses, netlink, routing
from nsutil import Namespace


class Value(NamedTuple):
    """One attribute type: values, their payload as ours writes it, and the value as pyroute2 names it."""

    values: Callable[[int], st.SearchStrategy[Any]]  # by the message's address family
    payload: Callable[[Any], bytes]
    theirs: Callable[[Any], Any]


def _ip(family: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=16 if family == _socket.AF_INET6 else 4, max_size=16 if family == _socket.AF_INET6 else 4)


def _ip_text(raw: bytes) -> str:
    return _socket.inet_ntop(_socket.AF_INET6 if len(raw) == 16 else _socket.AF_INET, raw)


_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=15)
VALUES = {
    "u32": Value(lambda _: st.integers(0, 2**32 - 1), netlink.u32, lambda v: v),
    "u8": Value(lambda _: st.integers(0, 255), netlink.u8, lambda v: v),
    "be64": Value(lambda _: st.integers(0, 2**64 - 1), lambda v: struct.pack(">Q", v), lambda v: v),
    "asciiz": Value(lambda _: _NAME, lambda v: v.encode() + b"\0", lambda v: v),
    "ip": Value(_ip, lambda v: v, _ip_text),
    "uid_range": Value(lambda _: st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
                       lambda v: struct.pack("=II", *v), lambda v: f"{v[0]}:{v[1]}"),
    "port_range": Value(lambda _: st.tuples(st.integers(0, 2**16 - 1), st.integers(0, 2**16 - 1)),
                        lambda v: struct.pack("=HH", *v), lambda v: f"{v[0]}:{v[1]}"),
}


class Kind(NamedTuple):
    """A message kind: our type, pyroute2's, the header's fields (ours, theirs, bits) and the attributes."""

    ours: type
    theirs: Any
    fields: tuple[tuple[str, str, int], ...]
    attributes: tuple[tuple[int, str, str], ...]  # (our number, pyroute2's name, VALUES key)
    families: tuple[int, ...]


_RTMSG_BYTES = ("family", "dst_len", "src_len", "tos", "table")
KINDS = {
    "rule": Kind(netlink.RuleMessage, fibmsg,
                 (*((f, f, 8) for f in _RTMSG_BYTES), ("res1", "res1", 8), ("res2", "res2", 8), ("action", "action", 8),
                  ("flags", "flags", 32)),
                 ((netlink.FRA_TABLE, "FRA_TABLE", "u32"), (netlink.FRA_PRIORITY, "FRA_PRIORITY", "u32"),
                  (netlink.FRA_FWMARK, "FRA_FWMARK", "u32"), (netlink.FRA_FWMASK, "FRA_FWMASK", "u32"),
                  (netlink.FRA_SUPPRESS_PREFIXLEN, "FRA_SUPPRESS_PREFIXLEN", "u32"),
                  (netlink.FRA_PROTOCOL, "FRA_PROTOCOL", "u8"),
                  # the selectors that make a rule not istio-init's shape (host/routing.py RULE_SELECTORS)
                  (netlink.FRA_DST, "FRA_DST", "ip"), (netlink.FRA_SRC, "FRA_SRC", "ip"),
                  (netlink.FRA_IIFNAME, "FRA_IIFNAME", "asciiz"), (netlink.FRA_GOTO, "FRA_GOTO", "u32"),
                  (netlink.FRA_FLOW, "FRA_FLOW", "u32"), (netlink.FRA_TUN_ID, "FRA_TUN_ID", "be64"),
                  (netlink.FRA_SUPPRESS_IFGROUP, "FRA_SUPPRESS_IFGROUP", "u32"),
                  (netlink.FRA_OIFNAME, "FRA_OIFNAME", "asciiz"), (netlink.FRA_L3MDEV, "FRA_L3MDEV", "u8"),
                  (netlink.FRA_UID_RANGE, "FRA_UID_RANGE", "uid_range"), (netlink.FRA_IP_PROTO, "FRA_IP_PROTO", "u8"),
                  (netlink.FRA_SPORT_RANGE, "FRA_SPORT_RANGE", "port_range"),
                  (netlink.FRA_DPORT_RANGE, "FRA_DPORT_RANGE", "port_range")),
                 (_socket.AF_INET, _socket.AF_INET6)),
    "route": Kind(netlink.RouteMessage, rtmsg,
                  (*((f, f, 8) for f in _RTMSG_BYTES), ("protocol", "proto", 8), ("scope", "scope", 8),
                   ("type", "type", 8), ("flags", "flags", 32)),
                  ((netlink.RTA_TABLE, "RTA_TABLE", "u32"), (netlink.RTA_OIF, "RTA_OIF", "u32"),
                   (netlink.RTA_PRIORITY, "RTA_PRIORITY", "u32"), (netlink.RTA_GATEWAY, "RTA_GATEWAY", "ip")),
                  (_socket.AF_INET, _socket.AF_INET6)),
    "address": Kind(netlink.AddressMessage, ifaddrmsg,
                    (("family", "family", 8), ("prefixlen", "prefixlen", 8), ("flags", "flags", 8),
                     ("scope", "scope", 8), ("ifindex", "index", 32)),
                    ((netlink.IFA_ADDRESS, "IFA_ADDRESS", "ip"), (netlink.IFA_LOCAL, "IFA_LOCAL", "ip")),
                    (_socket.AF_INET, _socket.AF_INET6)),
    "nf_tables table": Kind(netlink.TableMessage, nft_table_msg,
                            (("family", "nfgen_family", 8), ("version", "version", 8), ("res_id", "res_id", 16)),
                            ((netlink.NFTA_TABLE_NAME, "NFTA_TABLE_NAME", "asciiz"),),
                            (1, 2, 10)),  # NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6
}


class Drawn(NamedTuple):
    """One message's values: the netlink header's, the fixed header's, and (number, name, kind, value) attributes."""

    msg_type: int
    flags: int
    sequence: int
    fields: dict[str, int]
    attributes: list[tuple[int, str, str, Any]]


@st.composite
def messages(draw: Any, kind: Kind) -> Drawn:
    family = draw(st.sampled_from(kind.families))
    fields = {ours: draw(st.integers(0, 2**bits - 1)) for ours, _, bits in kind.fields[1:]}
    chosen = draw(st.lists(st.sampled_from(kind.attributes), unique=True, max_size=len(kind.attributes)))
    attributes = [(number, name, value, draw(VALUES[value].values(family))) for number, name, value in chosen]
    return Drawn(draw(st.integers(16, 2**16 - 1)), draw(st.integers(0, 2**16 - 1)), draw(st.integers(0, 2**32 - 1)),
                 {"family": family, **fields}, attributes)


def _ours(kind: Kind, drawn: Drawn) -> bytes:
    message = kind.ours(**drawn.fields, attrs=tuple((n, VALUES[v].payload(x)) for n, _, v, x in drawn.attributes))
    return netlink.frame(drawn.msg_type, drawn.flags, drawn.sequence, netlink.encode(message))


def _theirs(kind: Kind, drawn: Drawn) -> bytes:
    message = kind.theirs()
    message["header"]["type"] = drawn.msg_type
    message["header"]["flags"] = drawn.flags
    message["header"]["sequence_number"] = drawn.sequence
    for ours, theirs, _ in kind.fields:
        message[theirs] = drawn.fields[ours]
    message["attrs"] = [(name, VALUES[v].theirs(x)) for _, name, v, x in drawn.attributes]
    message.encode()
    return bytes(message.data)


@pytest.mark.parametrize("name", sorted(KINDS))
@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_pyroute2_decodes_what_ours_encodes(name: str, data: Any) -> None:
    kind = KINDS[name]
    drawn = data.draw(messages(kind))
    decoded = kind.theirs(_ours(kind, drawn))
    decoded.decode()
    header = decoded["header"]
    assert (header["type"], header["flags"], header["sequence_number"]) == drawn[:3]
    assert {ours: decoded[theirs] for ours, theirs, _ in kind.fields} == drawn.fields
    assert [(attribute[0], attribute[1]) for attribute in decoded["attrs"]] == [
        (name, VALUES[v].theirs(x)) for _, name, v, x in drawn.attributes]


@pytest.mark.parametrize("name", sorted(KINDS))
@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_ours_decodes_what_pyroute2_encodes(name: str, data: Any) -> None:
    kind = KINDS[name]
    drawn = data.draw(messages(kind))
    [(msg_type, flags, sequence, payload)] = netlink.replies(_theirs(kind, drawn))
    assert (msg_type, flags, sequence) == drawn[:3]
    message = netlink.decode(kind.ours, payload)
    assert {ours: getattr(message, ours) for ours, _, _ in kind.fields} == drawn.fields
    assert message.attrs == tuple((n, VALUES[v].payload(x)) for n, _, v, x in drawn.attributes)
    for number, _, value, x in drawn.attributes:  # and the typed readers the host code uses
        if value == "u32":
            assert netlink.u32_attribute(message.attrs, number) == x
        elif value == "u8":
            assert netlink.u8_attribute(message.attrs, number) == x


def test_both_encode_the_same_bytes() -> None:
    """Not only equal fields: the same message is the same bytes (header, attribute order, padding)."""
    kind = KINDS["rule"]
    drawn = Drawn(netlink.RTM_NEWRULE, netlink.ADD, 1, {"family": 2, "dst_len": 0, "src_len": 0, "tos": 0,
                                                          "table": 252, "res1": 0, "res2": 0, "action": 1, "flags": 0},
                  [(netlink.FRA_TABLE, "FRA_TABLE", "u32", 1000), (netlink.FRA_PROTOCOL, "FRA_PROTOCOL", "u8", 73),
                   (netlink.FRA_IIFNAME, "FRA_IIFNAME", "asciiz", "eth0")])
    assert _ours(kind, drawn) == _theirs(kind, drawn)


def test_a_multipath_route_is_seen_as_one() -> None:
    """RTA_MULTIPATH (nested next hops) only needs to be recognised: such a route is never istio-init's."""
    theirs = rtmsg()
    theirs["family"] = _socket.AF_INET
    theirs["attrs"] = [("RTA_MULTIPATH", [{"oif": 1}, {"oif": 2}])]
    theirs.encode()
    [(_, _, _, payload)] = netlink.replies(bytes(theirs.data))
    assert netlink.attribute(netlink.decode(netlink.RouteMessage, payload).attrs, netlink.RTA_MULTIPATH)


# ---- what istio-init sends ----------------------------------------------------------------------------

def _sent(msg_type: int, flags: int, message: Any, theirs: Any) -> Any:
    decoded = theirs(netlink.frame(msg_type, flags, 1, netlink.encode(message)))
    decoded.decode()
    return decoded


@pytest.mark.parametrize("table", [133, 1000])
def test_the_tproxy_rule_istio_init_adds(table: int) -> None:
    """`fwmark MARK lookup TABLE` at priority 32000, protocol 73 (istio-init's), created exclusively; a
    table above 255 is RT_TABLE_COMPAT in the header and the id in FRA_TABLE, as `ip rule` writes it."""
    rule = routing.rule_message(4, 1337, table, routing.DEFAULT_RULE_PRIORITY, routing.ROUTING_PROTOCOL)
    sent = _sent(netlink.RTM_NEWRULE, netlink.ADD, rule, fibmsg)
    assert sent["header"]["flags"] == 0x1 | 0x4 | 0x200 | 0x400  # request, ack, excl, create
    assert (sent["family"], sent["table"], sent["action"]) == (_socket.AF_INET, table if table < 256 else 252, 1)
    assert ({a[0]: a[1] for a in sent["attrs"]}
            == {"FRA_TABLE": table, "FRA_PRIORITY": 32000, "FRA_FWMARK": 1337, "FRA_PROTOCOL": 73})


def test_the_tproxy_rule_istio_init_deletes() -> None:
    """By its own priority, mark, full mask and table: a user's rule of another mask or priority stays."""
    sent = _sent(netlink.RTM_DELRULE, netlink.DELETE,
                 routing.rule_message(6, 1337, 133, 100, fwmask=0xFFFFFFFF), fibmsg)
    assert sent["header"]["flags"] == 0x1 | 0x4 and sent["family"] == _socket.AF_INET6
    assert {a[0]: a[1] for a in sent["attrs"]} == {"FRA_TABLE": 133, "FRA_PRIORITY": 100, "FRA_FWMARK": 1337,
                                                   "FRA_FWMASK": 0xFFFFFFFF}


@pytest.mark.parametrize("table", [133, 1000])
def test_the_local_default_route_istio_init_adds(table: int) -> None:
    sent = _sent(netlink.RTM_NEWROUTE, netlink.ADD,
                 routing.route_message(6, table, routing.ROUTING_PROTOCOL, None), rtmsg)
    assert sent["header"]["flags"] == 0x1 | 0x4 | 0x200 | 0x400
    assert ({f: sent[f] for f in ("family", "dst_len", "src_len", "table", "proto", "scope", "type")}
            == {"family": _socket.AF_INET6, "dst_len": 0, "src_len": 0, "table": table if table < 256 else 252,
                "proto": 73, "scope": 254, "type": 2})  # RT_SCOPE_HOST, RTN_LOCAL
    assert {a[0]: a[1] for a in sent["attrs"]} == {"RTA_TABLE": table, "RTA_OIF": 1}  # lo


def test_the_loopback_address_istio_init_adds() -> None:
    sent = _sent(netlink.RTM_NEWADDR, netlink.ADD, addresses.loopback_message("::6/128"), ifaddrmsg)
    assert (sent["family"], sent["prefixlen"], sent["index"]) == (_socket.AF_INET6, 128, 1)
    assert [(a[0], a[1]) for a in sent["attrs"]] == [("IFA_ADDRESS", "::6")]


def test_only_the_planned_rule_shape_is_istio_inits() -> None:
    """Any selector, and any attribute newer than the ones known (dscp, flow label, port masks), is a user's."""
    ours = routing.rule_message(4, 1337, 133, 32000, routing.ROUTING_PROTOCOL)
    assert routing.has_planned_shape(ours)
    for number in (*routing.RULE_SELECTORS, netlink.FRA_DPORT_RANGE + 1, netlink.FRA_DPORT_RANGE + 6):
        assert not routing.has_planned_shape(ours._replace(attrs=(*ours.attrs, (number, b"\0\0\0\0")))), number
    assert not routing.has_planned_shape(ours._replace(attrs=(*ours.attrs, (netlink.FRA_FWMASK, netlink.u32(0xFFFF)))))
    assert not routing.has_planned_shape(ours._replace(flags=2))  # FIB_RULE_INVERT: `not fwmark ...`


# ---- malformed input and the kernel's refusals ------------------------------------------------------

@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_fail_as_oserror(data: bytes) -> None:
    """A reply is never trusted: a short or overlong message is an OSError, attributes past the end are ignored."""
    try:
        found = netlink.replies(data)
    except OSError:
        return
    for _, _, _, payload in found:
        for kind in (netlink.RuleMessage, netlink.AddressMessage, netlink.TableMessage):
            try:
                message = netlink.decode(kind, payload)
            except OSError:
                continue
            assert all(len(p) <= len(payload) for _, p in message.attrs)


def test_a_truncated_reply_is_an_oserror() -> None:
    whole = netlink.frame(netlink.RTM_NEWRULE, 0, 1, netlink.encode(routing.rule_message(4, 1, 133, 32000)))
    with pytest.raises(OSError):
        netlink.replies(whole[:-4])
    with pytest.raises(OSError):
        netlink.decode(netlink.RuleMessage, b"\x02\x00")


_REFUSALS = """
import errno
from istio_init.host import netlink, routing
rule = routing.rule_message(4, 1337, 133, 32000, routing.ROUTING_PROTOCOL)
with netlink.Socket() as sock:
    sock.change(netlink.RTM_NEWRULE, netlink.ADD, rule)
    for msg_type, flags in ((netlink.RTM_NEWRULE, netlink.ADD), (netlink.RTM_DELRULE, netlink.DELETE),
                            (netlink.RTM_DELRULE, netlink.DELETE)):
        try:
            sock.change(msg_type, flags, rule)
            print("accepted")
        except OSError as exc:
            print(errno.errorcode[exc.errno], exc.strerror)
    print(len(sock.dump(netlink.RTM_GETRULE, netlink.RuleMessage(2), netlink.RTM_NEWRULE)))
"""


@pytest.mark.root
def test_a_kernel_refusal_is_an_oserror_with_its_errno(netns: Namespace) -> None:
    """The same rule twice is EEXIST (create|excl); a second delete is ENOENT; the socket goes on working."""
    done = netns.run(sys.executable, "-c", _REFUSALS)
    assert done.stdout.splitlines() == ["EEXIST File exists", "accepted", "ENOENT No such file or directory", "3"]
