"""TPROXY's policy routing: istio-init's `fwmark MARK lookup TABLE` rules and `local default dev lo`
routes, found, added, removed and put back over netlink.

What is istio-init's: exactly the shapes a rule set plans, `fwmark MARK
lookup TABLE` (mask all ones, no other selector, any priority) and `local
default dev lo table TABLE`, either for the marks and tables the caller names
(the flags' mark and route table, and marks istio-init's live rules set), or
made by istio-init: it records itself as the rule's and route's protocol
(ROUTING_PROTOCOL, `proto 73` in `ip rule` and `ip route`), so a run whose
flags changed the mark or the table still finds what an earlier run made. A
user's `fwmark 1337 lookup 200`, `fwmark 0x539/0xffff lookup main` or `fwmark
1337 iif eth0 lookup 133` is not istio-init's, nor is any other route.
"""

from __future__ import annotations

import _socket
import errno

from istio_init.host import netlink
from istio_init.host.addresses import LOOPBACK_IFINDEX
from istio_init.records import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from typing import Any, Iterable

    from istio_init.host.netlink import Attributes, RouteMessage, RuleMessage

ROUTING_PROTOCOL = 73  # rtnetlink protocol number istio-init gives its rules and routes ('I'; unassigned)
# The priority istio-init gives its rules (a rule set plans none): pyroute2's IPRoute.rule default, which
# every istio-init rule has had, so that rules made by any version look alike to `ip rule` and to a re-run.
DEFAULT_RULE_PRIORITY = 32000
# Rule attributes that narrow a rule beyond "fwmark MARK lookup TABLE": a rule with one is not a planned
# shape. So is every attribute after FRA_DPORT_RANGE: what kernels added since are selectors too (dscp,
# flow label, port masks).
RULE_SELECTORS = frozenset({netlink.FRA_DST, netlink.FRA_SRC, netlink.FRA_IIFNAME, netlink.FRA_GOTO, netlink.FRA_FLOW,
                            netlink.FRA_TUN_ID, netlink.FRA_SUPPRESS_IFGROUP, netlink.FRA_OIFNAME, netlink.FRA_L3MDEV,
                            netlink.FRA_UID_RANGE, netlink.FRA_IP_PROTO, netlink.FRA_SPORT_RANGE,
                            netlink.FRA_DPORT_RANGE})
_FULL_MASK = 0xFFFFFFFF
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


class Removed(NamedTuple):
    """A rule or route deleted, with the priority (rule) or metric (route) and protocol it had, to put it back."""

    item: Routing
    priority: int | None
    protocol: int = netlink.RTPROT_BOOT


def planned_routing(routes: Iterable[Any]) -> frozenset[Routing]:
    """The rules and routes a plan's TPROXY routes (family, fwmark, table) stand for."""
    found = set()
    for route in routes:
        found.add(Routing("rule", route.family, route.fwmark, route.table))
        found.add(Routing("route", route.family, 0, route.table))
    return frozenset(found)


def _af(family: int) -> int:
    return _socket.AF_INET6 if family == 6 else _socket.AF_INET


def _header_table(table: int) -> int:
    return table if table <= 255 else netlink.RT_TABLE_COMPAT


# ---- reading ---------------------------------------------------------------------------------------

def _rules(sock: netlink.Socket, family: int) -> list[RuleMessage]:
    return sock.dump(netlink.RTM_GETRULE, netlink.RuleMessage(_af(family)), netlink.RTM_NEWRULE)


def _routes(sock: netlink.Socket, family: int) -> list[RouteMessage]:
    """The family's routes of every table (a pod has a handful)."""
    return sock.dump(netlink.RTM_GETROUTE, netlink.RouteMessage(_af(family)), netlink.RTM_NEWROUTE)


def _rule_table(rule: RuleMessage) -> int:
    return netlink.u32_attribute(rule.attrs, netlink.FRA_TABLE) or rule.table


def _route_table(route: RouteMessage) -> int:
    return netlink.u32_attribute(route.attrs, netlink.RTA_TABLE) or route.table


def has_planned_shape(rule: RuleMessage) -> bool:
    """`fwmark MARK lookup TABLE`: full mask, no other selector, not inverted (see the module's docstring)."""
    mask = netlink.u32_attribute(rule.attrs, netlink.FRA_FWMASK)
    return (rule.action == netlink.FR_ACT_TO_TBL and rule.flags == 0 and rule.src_len == 0 and rule.dst_len == 0
            and rule.tos == 0 and netlink.u32_attribute(rule.attrs, netlink.FRA_FWMARK) is not None
            and (mask is None or mask == _FULL_MASK)
            and netlink.u32_attribute(rule.attrs, netlink.FRA_SUPPRESS_PREFIXLEN) in _NO_SUPPRESS_PREFIXLEN
            and not any(kind in RULE_SELECTORS or kind > netlink.FRA_DPORT_RANGE for kind, _ in rule.attrs))


def _is_local_default(route: RouteMessage) -> bool:
    """`local default dev lo`: type local, no prefix, through lo, no gateway."""
    return (route.type == netlink.RTN_LOCAL and route.dst_len == 0
            and netlink.u32_attribute(route.attrs, netlink.RTA_OIF) == LOOPBACK_IFINDEX
            and netlink.attribute(route.attrs, netlink.RTA_GATEWAY) is None
            and netlink.attribute(route.attrs, netlink.RTA_MULTIPATH) is None)


def _rules_for(sock: netlink.Socket, family: int, fwmark: int, table: int) -> list[RuleMessage]:
    return [r for r in _rules(sock, family) if has_planned_shape(r)
            and netlink.u32_attribute(r.attrs, netlink.FRA_FWMARK) == fwmark and _rule_table(r) == table]


def _local_default_routes(sock: netlink.Socket, family: int, table: int) -> list[RouteMessage]:
    """`local default dev lo table TABLE`."""
    return [r for r in _routes(sock, family) if _route_table(r) == table and _is_local_default(r)]


def owned_routing(family: int, marks: set[int], tables: set[int]) -> list[Routing]:
    """istio-init's policy rules and local default routes in this namespace, for these marks and tables."""
    with netlink.Socket() as sock:
        return _owned(sock, family, marks, tables)


def _owned(sock: netlink.Socket, family: int, marks: set[int], tables: set[int]) -> list[Routing]:
    try:
        rules = _rules(sock, family)
    except OSError as exc:
        if exc.errno == errno.EAFNOSUPPORT:
            return []  # the family is disabled in the kernel: it can hold nothing of ours
        raise
    return _owned_among(rules, _routes(sock, family), marks, tables)


_FAMILY_OF = {_socket.AF_INET: 4, _socket.AF_INET6: 6}


def _owned_among(rules: list[RuleMessage], routes: list[RouteMessage], marks: set[int],
                 tables: set[int]) -> list[Routing]:
    """istio-init's among dumped rules and routes (IPv4 and IPv6 ones; any other family's are not looked at)."""
    found: list[Routing] = []
    for rule in rules:
        family = _FAMILY_OF.get(rule.family)
        mark = netlink.u32_attribute(rule.attrs, netlink.FRA_FWMARK)
        if family is not None and mark is not None and has_planned_shape(rule) and (
                (mark in marks and _rule_table(rule) in tables)
                or netlink.u8_attribute(rule.attrs, netlink.FRA_PROTOCOL) == ROUTING_PROTOCOL):
            found.append(Routing("rule", family, mark, _rule_table(rule)))
    for route in routes:
        family = _FAMILY_OF.get(route.family)
        table = _route_table(route)
        if family is not None and _is_local_default(route) and (table in tables or route.protocol == ROUTING_PROTOCOL):
            found.append(Routing("route", family, 0, table))
    return list(dict.fromkeys(found))


def routing_present(marks: set[int], tables: set[int]) -> bool:
    """Whether any of owned_routing() is here, in either family (True when netlink cannot tell).

    Asked on every apply whose plan has no TPROXY routing, so that istio-init's
    routing left by an earlier TPROXY run is removed: one rule dump and one
    route dump of every family (AF_UNSPEC) over one socket, read as owned_routing() reads each family's.
    """
    try:
        with netlink.Socket() as sock:
            rules = sock.dump(netlink.RTM_GETRULE, netlink.RuleMessage(_socket.AF_UNSPEC), netlink.RTM_NEWRULE)
            routes = sock.dump(netlink.RTM_GETROUTE, netlink.RouteMessage(_socket.AF_UNSPEC), netlink.RTM_NEWROUTE)
            return bool(_owned_among(rules, routes, marks, tables))
    except OSError:
        return True  # cannot tell: let the exact reading that follows decide (and report)


# ---- changing ---------------------------------------------------------------------------------------

def route_message(family: int, table: int, protocol: int, metric: int | None) -> RouteMessage:
    """`local default dev lo table TABLE [metric METRIC]`, as istio-init adds and deletes it."""
    attrs: Attributes = ((netlink.RTA_TABLE, netlink.u32(table)), (netlink.RTA_OIF, netlink.u32(LOOPBACK_IFINDEX)))
    if metric is not None:
        attrs += ((netlink.RTA_PRIORITY, netlink.u32(metric)),)
    return netlink.RouteMessage(_af(family), table=_header_table(table), protocol=protocol,
                                scope=netlink.RT_SCOPE_HOST, type=netlink.RTN_LOCAL, attrs=attrs)


def rule_message(family: int, fwmark: int, table: int, priority: int, protocol: int | None = None,
          fwmask: int | None = None) -> RuleMessage:
    """`fwmark MARK[/MASK] lookup TABLE priority PRIORITY [protocol PROTOCOL]`."""
    attrs: Attributes = ((netlink.FRA_TABLE, netlink.u32(table)), (netlink.FRA_PRIORITY, netlink.u32(priority)),
                         (netlink.FRA_FWMARK, netlink.u32(fwmark)))
    if fwmask is not None:
        attrs += ((netlink.FRA_FWMASK, netlink.u32(fwmask)),)
    if protocol is not None:
        attrs += ((netlink.FRA_PROTOCOL, netlink.u8(protocol)),)
    return netlink.RuleMessage(_af(family), table=_header_table(table), action=netlink.FR_ACT_TO_TBL, attrs=attrs)


def add_policy_route(family: int, fwmark: int, table: int) -> list[Routing]:
    """`ip rule add fwmark MARK lookup TABLE` and `ip route add local default dev lo table TABLE`.

    What already exists is kept; returns what was added, for remove_routing().
    """
    added: list[Routing] = []
    try:
        with netlink.Socket() as sock:
            if not _local_default_routes(sock, family, table):
                sock.change(netlink.RTM_NEWROUTE, netlink.ADD, route_message(family, table, ROUTING_PROTOCOL, None))
                added.append(Routing("route", family, 0, table))
            if not _rules_for(sock, family, fwmark, table):
                sock.change(netlink.RTM_NEWRULE, netlink.ADD,
                            rule_message(family, fwmark, table, DEFAULT_RULE_PRIORITY, ROUTING_PROTOCOL))
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
    with netlink.Socket() as sock:
        for item in items:
            if item.kind == "rule":
                for rule in _rules_for(sock, item.family, item.fwmark, item.table):
                    priority = netlink.u32_attribute(rule.attrs, netlink.FRA_PRIORITY)
                    sock.change(netlink.RTM_DELRULE, netlink.DELETE,
                                rule_message(item.family, item.fwmark, item.table, priority or 0, fwmask=_FULL_MASK))
                    removed.append(Removed(item, priority, netlink.u8_attribute(rule.attrs, netlink.FRA_PROTOCOL) or 0))
            else:
                for route in _local_default_routes(sock, item.family, item.table):
                    metric = netlink.u32_attribute(route.attrs, netlink.RTA_PRIORITY)
                    sock.change(netlink.RTM_DELROUTE, netlink.DELETE,
                                route_message(item.family, item.table, 0, metric or None))
                    removed.append(Removed(item, metric, route.protocol))
    return removed


def restore_routing(removed: list[Removed]) -> None:
    """Put back what remove_routing() deleted: routes first, so a rule never points at an empty table."""
    with netlink.Socket() as sock:
        for entry in sorted(removed, key=lambda e: e.item.kind != "route"):
            item = entry.item
            if item.kind == "route":
                sock.change(netlink.RTM_NEWROUTE, netlink.ADD,
                            route_message(item.family, item.table, entry.protocol, entry.priority or None))
            else:
                priority = entry.priority if entry.priority is not None else DEFAULT_RULE_PRIORITY
                sock.change(netlink.RTM_NEWRULE, netlink.ADD,
                            rule_message(item.family, item.fwmark, item.table, priority, entry.protocol))
