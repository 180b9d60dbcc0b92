"""pyroute2's rtnetlink messages for TPROXY's policy routing and the ::6 address, imported narrowly.

`from pyroute2 import IPRoute` runs pyroute2's package `__init__`, which
imports all of pyroute2 (NDB, IPDB, the asyncio IPRoute, nftables, plan9,
...), several times a REDIRECT pod's whole start, for two routes and one
address (docs/performance.md, "What start-up avoids"). This module loads only pyroute2's netlink core and the
three message classes those need (`fibmsg`, `rtmsg`, `ifaddrmsg`), and `IPRoute` offers the few IPRoute calls netns.py makes, with the
same arguments and the same messages (pyroute2's defaults included: a rule
gets priority 32000 and `to_tbl`), over one netlink socket. pyroute2 still
encodes and decodes every message; this module only sends them.
"""

from __future__ import annotations

import _socket
import os
import struct
import sys

from istio_init.records import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any

_HEADER = struct.Struct("=IHHII")
_ERROR = struct.Struct("=i")
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_REQUEST, _ACK, _EXCL, _CREATE, _DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
_FLAGS = {"add": _REQUEST | _ACK | _CREATE | _EXCL, "del": _REQUEST | _ACK}
# rtnetlink message types (linux/rtnetlink.h)
_NEWADDR, _DELADDR, _GETADDR = 20, 21, 22
_NEWROUTE, _DELROUTE, _GETROUTE = 24, 25, 26
_NEWRULE, _DELRULE, _GETRULE = 32, 33, 34
_FR_ACT_TO_TBL = 1
_DEFAULT_RULE_PRIORITY = 32000  # what pyroute2's IPRoute.rule gives a rule without one
_RT_TABLE_COMPAT = 252  # the header's table field for a table id above 255


def messages() -> tuple[Any, Any, Any, type[Exception]]:
    """(fibmsg, rtmsg, ifaddrmsg, NetlinkError), without running pyroute2's package __init__.

    When pyroute2 is already imported (a test, the CLI's other commands), its
    modules are used as they are. Otherwise the package is entered as a bare
    module for the time of these imports, then taken out of sys.modules
    again, so that a later `import pyroute2` runs its __init__ as usual (and
    reuses the submodules loaded here).
    """
    bare: ModuleType | None = None
    if "pyroute2" not in sys.modules:
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec("pyroute2")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("pyroute2 is not installed")
        bare = type(sys)("pyroute2")
        bare.__path__ = list(spec.submodule_search_locations)
        bare.__spec__ = spec
        sys.modules["pyroute2"] = bare
    try:
        from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]
        from pyroute2.netlink.rtnl.fibmsg import fibmsg  # type: ignore[import-untyped]
        from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # type: ignore[import-untyped]
        from pyroute2.netlink.rtnl.rtmsg import rtmsg  # type: ignore[import-untyped]
    finally:
        if bare is not None and sys.modules.get("pyroute2") is bare:
            del sys.modules["pyroute2"]
    return fibmsg, rtmsg, ifaddrmsg, NetlinkError


class IPRoute:
    """The IPRoute calls netns.py makes (rule, route, addr, their dumps, link_lookup), as pyroute2 sends them."""

    def __init__(self) -> None:
        self.fibmsg, self.rtmsg, self.ifaddrmsg, self.error = messages()
        self.sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, _socket.NETLINK_ROUTE)
        self.sock.settimeout(5)
        self.sequence = 0

    def __enter__(self) -> IPRoute:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _send(self, message: Any, msg_type: int, flags: int) -> list[bytes]:
        """Send one message; the replies' raw messages until the ack or the end of the dump."""
        self.sequence += 1
        message["header"]["type"] = msg_type
        message["header"]["flags"] = flags
        message["header"]["sequence_number"] = self.sequence
        message.encode()
        self.sock.sendall(bytes(message.data))
        replies: list[bytes] = []
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, reply_type, _, sequence, _ = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise OSError("netlink: a reply shorter than its header")
                if sequence == self.sequence:
                    if reply_type == _NLMSG_DONE:
                        return replies
                    if reply_type == _NLMSG_ERROR:
                        code = -_ERROR.unpack_from(data, offset + _HEADER.size)[0]
                        if code:
                            raise self.error(code, os.strerror(code))
                        return replies  # the ack of a request
                    replies.append(data[offset:offset + length])
                offset += (length + 3) & ~3

    def _dump(self, kind: Any, msg_type: int, family: int) -> list[Any]:
        request = kind()
        request["family"] = family
        found = []
        for raw in self._send(request, msg_type, _REQUEST | _DUMP):
            message = kind(raw)
            message.decode()
            found.append(message)
        return found

    def link_lookup(self, ifname: str) -> list[int]:
        """The index of the interface called `ifname` (the C library asks the kernel)."""
        try:
            return [_socket.if_nametoindex(ifname)]
        except OSError:
            return []

    def get_rules(self, family: int) -> list[Any]:
        return self._dump(self.fibmsg, _GETRULE, family)

    def get_routes(self, family: int, table: int) -> list[Any]:
        """The family's routes in `table` (every table is dumped; pyroute2 filters the same way)."""
        return [r for r in self._dump(self.rtmsg, _GETROUTE, family)
                if (r.get_attr("RTA_TABLE") or r["table"]) == table]

    def get_addr(self, index: int, family: int) -> list[Any]:
        return [a for a in self._dump(self.ifaddrmsg, _GETADDR, family) if a["index"] == index]

    def rule(self, command: str, family: int, fwmark: int, table: int, priority: int | None = None,
             protocol: int | None = None, fwmask: int | None = None) -> None:
        """`ip rule add|del fwmark MARK[/MASK] lookup TABLE [priority PRIORITY] [protocol PROTOCOL]`.

        An added rule without a priority gets 32000, as from pyroute2's IPRoute.rule.
        """
        if priority is None and command == "add":
            priority = _DEFAULT_RULE_PRIORITY
        message = self.fibmsg()
        message["family"] = family
        message["action"] = _FR_ACT_TO_TBL
        message["table"] = table if table <= 255 else _RT_TABLE_COMPAT
        attrs: list[tuple[str, int]] = [("FRA_TABLE", table)]
        if priority is not None:
            attrs.append(("FRA_PRIORITY", priority))
        attrs.append(("FRA_FWMARK", fwmark))
        if fwmask is not None:
            attrs.append(("FRA_FWMASK", fwmask))
        if protocol is not None:
            attrs.append(("FRA_PROTOCOL", protocol))
        message["attrs"] = attrs
        self._send(message, _NEWRULE if command == "add" else _DELRULE, _FLAGS[command])

    def route(self, command: str, family: int, dst_len: int = 0, type: int = 0, scope: int = 0, table: int = 0,
              oif: int = 0, proto: int = 0, priority: int | None = None) -> list[Any]:
        """`ip route add|del TYPE default dev OIF table TABLE [metric PRIORITY]` (here: `local default dev lo`);
        `dump` lists the family's routes of every table."""
        if command == "dump":
            return self._dump(self.rtmsg, _GETROUTE, family)
        message = self.rtmsg()
        message["family"] = family
        message["dst_len"] = dst_len
        message["type"] = type
        message["scope"] = scope
        message["proto"] = proto
        message["table"] = table if table <= 255 else _RT_TABLE_COMPAT
        message["attrs"] = [("RTA_TABLE", table), ("RTA_OIF", oif)]
        if priority is not None:
            message["attrs"].append(("RTA_PRIORITY", priority))
        self._send(message, _NEWROUTE if command == "add" else _DELROUTE, _FLAGS[command])
        return []

    def addr(self, command: str, index: int, address: str, prefixlen: int, family: int) -> None:
        """`ip addr add|del ADDRESS/PREFIXLEN dev INDEX`."""
        message = self.ifaddrmsg()
        message["family"] = family
        message["prefixlen"] = prefixlen
        message["index"] = index
        message["attrs"] = [("IFA_ADDRESS", address)]
        if family == _socket.AF_INET:
            message["attrs"].append(("IFA_LOCAL", address))
        self._send(message, _NEWADDR if command == "add" else _DELADDR, _FLAGS[command])
