"""The network namespace: which addresses the pod has, and entering another one.

Both run on every pod start, so they use the standard library only: a single
netlink dump over a raw socket replaces pyroute2 here (pyroute2 is slow to
import and is only needed for TPROXY routes and the ::6 address). The socket
is the C module's (`_socket`): the `socket` module around it imports
selectors and enum types for nothing a netlink dump uses, and the family
check reads address bytes without `ipaddress` (docs/performance.md, "What start-up avoids").
"""

from __future__ import annotations

import _socket as socket  # the C module: see the docstring
import errno
import os
import struct

from istio_init.errors import ConfigError, IstioInitError
from istio_init.records import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import ipaddress
    from typing import Any, Iterable

_NLMSG_HEADER = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
_NLMSG_DONE = 3
_NLMSG_ERROR = 2
_RTM_NEWADDR = 20
_RTM_GETADDR = 22
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_CLONE_NEWNET = 0x40000000


def _align(n: int) -> int:
    return (n + 3) & ~3


def _dump(request_type: int, body: bytes, protocol: int = socket.NETLINK_ROUTE) -> list[tuple[int, bytes]]:
    """One netlink dump request; returns (message type, payload) of every reply."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    try:
        sock.settimeout(5)
        header = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), request_type, _NLM_F_REQUEST_DUMP, 1, 0)
        sock.sendall(header + body)
        messages: list[tuple[int, bytes]] = []
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSG_HEADER.size <= len(data):
                length, msg_type, _, _, _ = _NLMSG_HEADER.unpack_from(data, offset)
                if msg_type == _NLMSG_DONE:
                    return messages
                if msg_type == _NLMSG_ERROR:
                    errno = -struct.unpack_from("=i", data, offset + _NLMSG_HEADER.size)[0]
                    if errno == 0:  # an acknowledgement ends some dumps
                        return messages
                    raise OSError(errno, os.strerror(errno))
                messages.append((msg_type, data[offset + _NLMSG_HEADER.size:offset + length]))
                offset += _align(length)
    finally:
        sock.close()


def _attributes(payload: bytes, offset: int) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(payload):
        length, kind = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size:
            break
        attrs.setdefault(kind, payload[offset + _RTATTR.size:offset + length])
        offset += _align(length)
    return attrs


# The kernel gives every namespace's loopback device index 1 (LOOPBACK_IFINDEX; loopback_net_init
# insists on it), and no other device has IFF_LOOPBACK: so no link dump is needed to leave lo out.
_LOOPBACK_IFINDEX = 1


def _is_loopback_or_link_local(raw: bytes) -> bool:
    """127.0.0.0/8, 169.254.0.0/16, ::1 and fe80::/10, as ipaddress's is_loopback and is_link_local."""
    if len(raw) == 4:
        return raw[0] == 127 or raw[:2] == b"\xa9\xfe"
    return raw == bytes(15) + b"\x01" or (raw[0] == 0xFE and raw[1] & 0xC0 == 0x80)


def _raw_addresses() -> list[bytes]:
    """The namespace's addresses (4 or 16 bytes) in kernel order, without loopback and link-local ones."""
    found = []
    for msg_type, payload in _dump(_RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        if msg_type != _RTM_NEWADDR:
            continue
        family, _, _, _, index = _IFADDRMSG.unpack_from(payload)
        if index == _LOOPBACK_IFINDEX or family not in (socket.AF_INET, socket.AF_INET6):
            continue
        attrs = _attributes(payload, _IFADDRMSG.size)
        raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
        if raw and len(raw) in (4, 16) and not _is_loopback_or_link_local(raw):
            found.append(raw)
    return found


def pod_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The namespace's addresses in kernel order, leaving out loopback and link-local ones."""
    import ipaddress

    return [ipaddress.ip_address(raw) for raw in _raw_addresses()]


def detect_ipv6() -> bool:
    """docs/rules-1.8.md: IPv6 rules when the first non-loopback address is IPv6; none means IPv4."""
    addresses = _raw_addresses()
    return bool(addresses) and len(addresses[0]) == 16


_NETLINK_NETFILTER = 12
_NFT_GETTABLE = (10 << 8) | 1  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETTABLE
_NFT_NEWTABLE = (10 << 8) | 0
_NFGENMSG = struct.Struct("=BBH")
_NFTA_TABLE_NAME = 1
_NFPROTO = {4: 2, 6: 10}  # NFPROTO_IPV4, NFPROTO_IPV6
IPTABLES_TABLE_NAMES = frozenset({"filter", "nat", "mangle", "raw", "security"})


def _nft_table_names(nfproto: int) -> set[str]:
    """The names of nf_tables' tables of one protocol family here, over netlink; none without nf_tables."""
    try:
        replies = _dump(_NFT_GETTABLE, _NFGENMSG.pack(nfproto, 0, 0), _NETLINK_NETFILTER)
    except OSError:
        return set()
    names = set()
    for msg_type, payload in replies:
        if msg_type == _NFT_NEWTABLE and payload[0] == nfproto:
            raw = _attributes(payload, _NFGENMSG.size).get(_NFTA_TABLE_NAME, b"")
            names.add(raw.split(b"\0", 1)[0].decode(errors="replace"))
    return names


def iptables_nft_tables(family: int) -> set[str]:
    """The iptables tables that iptables-nft has made in this namespace, for one family.

    `auto` must not put legacy rules beside nft-based ones. Asking nf_tables
    over netlink is far cheaper than running `iptables-nft-save` to find out,
    a process start on every pod. A kernel without nf_tables has none.
    """
    return _nft_table_names(_NFPROTO[family]) & IPTABLES_TABLE_NAMES


_CAP_NET_ADMIN = 12


def has_net_admin() -> bool | None:
    """Whether this process holds CAP_NET_ADMIN (None: cannot tell; let the kernel decide)."""
    try:
        with open("/proc/self/status") as status:
            line = next(ln for ln in status if ln.startswith("CapEff:"))
    except (OSError, StopIteration):
        return None
    return bool(int(line.split()[1], 16) & (1 << _CAP_NET_ADMIN))


# The kernel's fixed inode number of the initial PID namespace (PROC_PID_INIT_INO in
# include/linux/proc_ns.h). Network namespaces have no fixed number, so the host's is
# recognised as the one pid 1 of the initial PID namespace is in.
_INITIAL_PID_NAMESPACE_INODE = 0xEFFFFFFC


def in_initial_namespace() -> bool:
    """Whether this process is in the host's own network namespace (pid 1's, seen from the host).

    In a pod, pid 1 is the pod's own first process and /proc shows the pod's PID
    namespace, so this is False there; it is True for a bare `istio-init` in a
    root shell on a node, which would redirect the node's own traffic.
    """
    try:
        if os.stat("/proc/self/ns/pid").st_ino != _INITIAL_PID_NAMESPACE_INODE:
            return False
        ours, init = os.stat("/proc/self/ns/net"), os.stat("/proc/1/ns/net")
    except OSError:  # no /proc, or pid 1's namespace may not be looked at: cannot tell
        return False
    return (ours.st_dev, ours.st_ino) == (init.st_dev, init.st_ino)


_NFPROTO_INET = 1


def native_nft_tables() -> set[str]:
    """istio-init's own `inet istio-proxy-{nat,mangle,raw}` tables in this namespace, over netlink.

    Every iptables apply asks, so that a switch away from native nftables
    removes them; loading libnftables to find out would cost every pod start.
    Only the tables a rule set plans are istio-init's: a user's `inet
    istio-proxy-foo` is not, and must neither load libnftables nor be reported
    as removed.
    """
    from istio_init.model import NATIVE_TABLE_PREFIX, NATIVE_TABLES

    return _nft_table_names(_NFPROTO_INET) & {NATIVE_TABLE_PREFIX + table for table in NATIVE_TABLES}


def enter(path: str, label: str = "--network-namespace") -> None:
    """Move this process (single-threaded) into the network namespace at `path`.

    `label` names the flag and, when the value came from it, the variable. A
    path that is missing or not a network namespace is the user's mistake (exit
    2); a refusal for want of privilege is not.
    """
    import ctypes

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise IstioInitError(f"{label} {path}: {exc.strerror}") from None
        raise ConfigError(label, path, exc.strerror or "cannot open") from None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL:
                raise ConfigError(label, path, "not a network namespace")
            raise IstioInitError(f"{label} {path}: cannot enter: {os.strerror(err)}")
    finally:
        os.close(fd)


# TPROXY policy routing and the ::6 loopback address. pyroute2 is imported
# only here, only when a plan (or clean) needs them: most pods never do.
#
# What is istio-init's: exactly the shapes a rule set plans, `fwmark MARK
# lookup TABLE` (mask all ones, no other selector, any priority: none is
# planned, and the kernel or pyroute2 picks one) and `local default dev lo
# table TABLE`, either for the marks and tables the caller names (the flags'
# mark and route table, and marks istio-init's live rules set), or made by
# istio-init: it records itself as the rule's and route's protocol
# (ROUTING_PROTOCOL, `proto 73` in `ip rule` and `ip route`), so a run whose
# flags changed the mark or the table still finds what an earlier run made. A
# user's `fwmark 1337 lookup 200`, `fwmark 0x539/0xffff lookup main` or `fwmark
# 1337 iif eth0 lookup 133` is not istio-init's, nor is any other route.

_RTN_LOCAL = 2
_RT_SCOPE_HOST = 254
_RTPROT_BOOT = 3  # what `ip route add` records
_FR_ACT_TO_TBL = 1
ROUTING_PROTOCOL = 73  # rtnetlink protocol number istio-init gives its rules and routes ('I'; unassigned)
_FULL_MASK = 0xFFFFFFFF
# Rule attributes that narrow a rule beyond "fwmark MARK lookup TABLE": a rule with one is not a planned shape.
_RULE_SELECTORS = ("FRA_IIFNAME", "FRA_OIFNAME", "FRA_SRC", "FRA_DST", "FRA_UID_RANGE", "FRA_IP_PROTO",
                   "FRA_SPORT_RANGE", "FRA_DPORT_RANGE", "FRA_L3MDEV", "FRA_TUN_ID", "FRA_GOTO",
                   "FRA_SUPPRESS_IFGROUP", "FRA_FLOW")
_NO_SUPPRESS_PREFIXLEN = (None, 0xFFFFFFFF)


class Routing(NamedTuple):
    """One policy rule (`kind` "rule") or `local default dev lo` route ("route", fwmark 0)."""

    kind: str
    family: int
    fwmark: int
    table: int

    def __str__(self) -> str:
        if self.kind == "rule":
            return f"ip rule fwmark {self.fwmark:#x} lookup {self.table}"
        return f"ip route local default dev lo table {self.table}"


def planned_routing(routes: Iterable[Any]) -> frozenset[Routing]:
    """The rules and routes a plan's TPROXY routes (family, fwmark, table) stand for."""
    found = set()
    for route in routes:
        found.add(Routing("rule", route.family, route.fwmark, route.table))
        found.add(Routing("route", route.family, 0, route.table))
    return frozenset(found)


_RTM_NEWROUTE = 24
_RTM_GETROUTE = 26
_RTM_NEWRULE = 32
_RTM_GETRULE = 34
_RTMSG = struct.Struct("=BBBBBBBBI")  # struct rtmsg and struct fib_rule_hdr have this one layout
_RTA_TABLE = 15  # also FRA_TABLE
_FRA_FWMARK = 10
_FRA_PROTOCOL = 21


def routing_present(marks: set[int], tables: set[int]) -> bool:
    """Whether any policy rule for `marks` into `tables`, or any local default route in `tables`, may exist.

    Asked over a raw netlink dump on every apply whose plan has no TPROXY
    routing, so the common pod never imports pyroute2 just to learn there is
    nothing of ours to remove (docs/performance.md, "What start-up avoids").
    A superset of owned_routing(): True sends the caller to the exact check.
    A route dump covers every table: a pod has a handful of routes.
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            rules = _dump(_RTM_GETRULE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))
            routes = _dump(_RTM_GETROUTE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))
        except OSError as exc:
            if exc.errno == errno.EAFNOSUPPORT:  # IPv6 disabled in the kernel: nothing of that family
                continue
            return True  # cannot tell: let the exact check decide
        for msg_type, payload in rules:
            if msg_type != _RTM_NEWRULE:
                continue
            attrs = _attributes(payload, _RTMSG.size)
            mark = attrs.get(_FRA_FWMARK)
            table = attrs.get(_RTA_TABLE)
            table_id = struct.unpack("=I", table)[0] if table and len(table) == 4 else payload[4]
            if mark and len(mark) == 4 and struct.unpack("=I", mark)[0] in marks and table_id in tables:
                return True
            if attrs.get(_FRA_PROTOCOL, b"")[:1] == bytes([ROUTING_PROTOCOL]):
                return True
        for msg_type, payload in routes:
            if msg_type != _RTM_NEWROUTE:
                continue
            _, dst_len, _, _, table_byte, protocol, _, kind, _ = _RTMSG.unpack_from(payload)
            table = _attributes(payload, _RTMSG.size).get(_RTA_TABLE)
            table_id = struct.unpack("=I", table)[0] if table and len(table) == 4 else table_byte
            if kind == _RTN_LOCAL and dst_len == 0 and (table_id in tables or protocol == ROUTING_PROTOCOL):
                return True
    return False


class Removed(NamedTuple):
    """A rule or route deleted, with the priority (rule) or metric (route) and protocol it had, to put it back."""

    item: Routing
    priority: int | None
    protocol: int = _RTPROT_BOOT


def _iproute() -> Any:
    from istio_init.rtnl import IPRoute  # pyroute2's messages without all of pyroute2 (rtnl.py says why)

    return IPRoute()


def _rule_table(rule: Any) -> int:
    return int(rule.get_attr("FRA_TABLE") or rule["table"])


def _has_planned_shape(rule: Any) -> bool:
    """`fwmark MARK lookup TABLE`: full mask, no other selector, not inverted (see above)."""
    mask = rule.get_attr("FRA_FWMASK")
    return (rule["action"] == _FR_ACT_TO_TBL and rule["flags"] == 0 and rule["src_len"] == 0
            and rule["dst_len"] == 0 and rule["tos"] == 0
            and rule.get_attr("FRA_FWMARK") is not None and (mask is None or mask == _FULL_MASK)
            and rule.get_attr("FRA_SUPPRESS_PREFIXLEN") in _NO_SUPPRESS_PREFIXLEN
            and not any(rule.get_attr(name) is not None for name in _RULE_SELECTORS))


def _owned_rules(ipr: Any, family: int, marks: set[int], tables: set[int]) -> list[Any]:
    """Rules of the planned shape for `marks` and `tables`, or made by istio-init (any mark and table)."""
    return [r for r in ipr.get_rules(family=_af(family)) if _has_planned_shape(r)
            and ((r.get_attr("FRA_FWMARK") in marks and _rule_table(r) in tables)
                 or r.get_attr("FRA_PROTOCOL") == ROUTING_PROTOCOL)]


def _rules_for(ipr: Any, family: int, fwmark: int, table: int) -> list[Any]:
    return [r for r in ipr.get_rules(family=_af(family)) if _has_planned_shape(r)
            and r.get_attr("FRA_FWMARK") == fwmark and _rule_table(r) == table]


def _is_local_default(route: Any, lo: int) -> bool:
    """`local default dev lo`: type local, no prefix, through lo, no gateway."""
    return (route["type"] == _RTN_LOCAL and route["dst_len"] == 0 and route.get_attr("RTA_OIF") == lo
            and route.get_attr("RTA_GATEWAY") is None and route.get_attr("RTA_MULTIPATH") is None)


def _route_table(route: Any) -> int:
    return int(route.get_attr("RTA_TABLE") or route["table"])


def _local_default_routes(ipr: Any, family: int, table: int) -> list[Any]:
    """`local default dev lo table TABLE`."""
    lo = _lo_index(ipr)
    return [r for r in ipr.get_routes(family=_af(family), table=table)
            if _route_table(r) == table and _is_local_default(r, lo)]


def _af(family: int) -> int:
    return socket.AF_INET6 if family == 6 else socket.AF_INET


def _lo_index(ipr: Any) -> int:
    return int(ipr.link_lookup(ifname="lo")[0])


def owned_routing(family: int, marks: set[int], tables: set[int]) -> list[Routing]:
    """istio-init's policy rules and local default routes in this namespace, for these marks and tables."""
    found: list[Routing] = []
    with _iproute() as ipr:
        try:
            ipr.get_rules(family=_af(family))
        except Exception as exc:  # pyroute2's NetlinkError
            if getattr(exc, "code", None) == errno.EAFNOSUPPORT:
                return []  # the family is disabled in the kernel: it can hold nothing of ours
            raise
        for rule in _owned_rules(ipr, family, marks, tables):
            found.append(Routing("rule", family, int(rule.get_attr("FRA_FWMARK")), _rule_table(rule)))
        lo = _lo_index(ipr)
        for route in ipr.route("dump", family=_af(family)):  # every table
            table = _route_table(route)
            if _is_local_default(route, lo) and (table in tables or route["proto"] == ROUTING_PROTOCOL):
                found.append(Routing("route", family, 0, table))
    return list(dict.fromkeys(found))


def add_policy_route(family: int, fwmark: int, table: int) -> list[Routing]:
    """`ip rule add fwmark MARK lookup TABLE` and `ip route add local default dev lo table TABLE`.

    What already exists is kept; returns what was added, for remove_routing().
    """
    added: list[Routing] = []
    try:
        with _iproute() as ipr:
            if not _local_default_routes(ipr, family, table):
                ipr.route("add", family=_af(family), dst_len=0, type=_RTN_LOCAL, scope=_RT_SCOPE_HOST,
                          proto=ROUTING_PROTOCOL, table=table, oif=_lo_index(ipr))
                added.append(Routing("route", family, 0, table))
            if not _rules_for(ipr, family, fwmark, table):
                ipr.rule("add", family=_af(family), fwmark=fwmark, table=table, protocol=ROUTING_PROTOCOL)
                added.append(Routing("rule", family, fwmark, table))
    except Exception:
        if added:  # the route went in but the rule did not: leave nothing half made
            remove_routing(added)
        raise
    return added


def remove_routing(items: list[Routing], removed: list[Removed] | None = None) -> list[Removed]:
    """Delete istio-init's rules and routes named by `items`; returns what went, to put it back (restore_routing).

    Only the planned shapes are deleted, each rule by its own priority, so a
    user's rule with the same mark (another mask, table or selector) stays.
    Each deletion is appended to `removed` as it happens, so a failure half
    way still says what to put back.
    """
    removed = [] if removed is None else removed
    with _iproute() as ipr:
        for item in items:
            if item.kind == "rule":
                for rule in _rules_for(ipr, item.family, item.fwmark, item.table):
                    priority = rule.get_attr("FRA_PRIORITY")
                    ipr.rule("del", family=_af(item.family), fwmark=item.fwmark, fwmask=_FULL_MASK,
                             table=item.table, priority=priority or 0)
                    removed.append(Removed(item, priority, rule.get_attr("FRA_PROTOCOL") or 0))
            else:
                for route in _local_default_routes(ipr, item.family, item.table):
                    metric = route.get_attr("RTA_PRIORITY")
                    ipr.route("del", family=_af(item.family), dst_len=0, type=_RTN_LOCAL, scope=_RT_SCOPE_HOST,
                              table=item.table, oif=_lo_index(ipr), **({"priority": metric} if metric else {}))
                    removed.append(Removed(item, metric, route["proto"]))
    return removed


def restore_routing(removed: list[Removed]) -> None:
    """Put back what remove_routing() deleted: routes first, so a rule never points at an empty table."""
    with _iproute() as ipr:
        for entry in sorted(removed, key=lambda e: e.item.kind != "route"):
            item = entry.item
            if item.kind == "route":
                ipr.route("add", family=_af(item.family), dst_len=0, type=_RTN_LOCAL, scope=_RT_SCOPE_HOST,
                          proto=entry.protocol, table=item.table, oif=_lo_index(ipr),
                          **({"priority": entry.priority} if entry.priority else {}))
            else:
                ipr.rule("add", family=_af(item.family), fwmark=item.fwmark, table=item.table,
                         protocol=entry.protocol,
                         **({"priority": entry.priority} if entry.priority is not None else {}))


def _split(address: str) -> tuple[str, int]:
    ip, _, prefix = address.partition("/")
    return ip, int(prefix or 128)


def has_loopback_address(address: str) -> bool:
    ip, prefix = _split(address)
    with _iproute() as ipr:
        return any(a.get_attr("IFA_ADDRESS") == ip and a["prefixlen"] == prefix
                   for a in ipr.get_addr(index=_lo_index(ipr), family=socket.AF_INET6))


def add_loopback_address(address: str) -> bool:
    """`ip -6 addr add ADDRESS dev lo`; False when it was already there."""
    if has_loopback_address(address):
        return False
    ip, prefix = _split(address)
    with _iproute() as ipr:
        ipr.addr("add", index=_lo_index(ipr), address=ip, prefixlen=prefix, family=socket.AF_INET6)
    return True


def remove_loopback_address(address: str) -> bool:
    """`ip -6 addr del ADDRESS dev lo`; False when it was not there."""
    if not has_loopback_address(address):
        return False
    ip, prefix = _split(address)
    with _iproute() as ipr:
        ipr.addr("del", index=_lo_index(ipr), address=ip, prefixlen=prefix, family=socket.AF_INET6)
    return True


def loopback_ipv6_addresses() -> set[str]:
    """The IPv6 addresses on lo, as "::6/128", from /proc/net/if_inet6 (no pyroute2 or ipaddress on every probe)."""
    from _socket import AF_INET6, inet_ntop

    found = set()
    try:
        with open("/proc/net/if_inet6") as table:
            for line in table:
                address, _, prefix, _, _, name = line.split()
                if name == "lo":
                    text = inet_ntop(AF_INET6, bytes.fromhex(address))
                    if "." in text:  # the C library writes ::a.b.c.d where ipaddress (and the plan) writes hex
                        import ipaddress

                        text = str(ipaddress.IPv6Address(int(address, 16)))
                    found.add(f"{text}/{int(prefix, 16)}")
    except FileNotFoundError:  # IPv6 disabled: no address at all
        pass
    return found
