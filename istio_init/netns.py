"""The network namespace: which addresses the pod has, and entering another one.

Both run on every pod start, so they use the standard library only: a single
netlink dump over a raw socket replaces pyroute2 here (pyroute2 costs about
130 ms to import and is only needed for TPROXY routes and the ::6 address).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from istio_init.errors import IstioInitError

_NLMSG_HEADER = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTATTR = struct.Struct("=HH")
_NLMSG_DONE = 3
_NLMSG_ERROR = 2
_RTM_NEWLINK = 16
_RTM_GETLINK = 18
_RTM_NEWADDR = 20
_RTM_GETADDR = 22
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_IFF_LOOPBACK = 0x8
_CLONE_NEWNET = 0x40000000


def _align(n: int) -> int:
    return (n + 3) & ~3


def _dump(request_type: int, body: bytes) -> list[tuple[int, bytes]]:
    """One netlink dump request; returns (message type, payload) of every reply."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
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
                    raise OSError(errno, os.strerror(errno))
                messages.append((msg_type, data[offset + _NLMSG_HEADER.size:offset + length]))
                offset += _align(length)


def _attributes(payload: bytes, offset: int) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(payload):
        length, kind = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size:
            break
        attrs.setdefault(kind, payload[offset + _RTATTR.size:offset + length])
        offset += _align(length)
    return attrs


def _loopback_indexes() -> set[int]:
    indexes = set()
    for msg_type, payload in _dump(_RTM_GETLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        if msg_type == _RTM_NEWLINK:
            _, _, index, flags, _ = _IFINFOMSG.unpack_from(payload)
            if flags & _IFF_LOOPBACK:
                indexes.add(index)
    return indexes


def pod_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The namespace's addresses in kernel order, leaving out loopback and link-local ones."""
    loopback = _loopback_indexes()
    found = []
    for msg_type, payload in _dump(_RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        if msg_type != _RTM_NEWADDR:
            continue
        family, _, _, _, index = _IFADDRMSG.unpack_from(payload)
        if index in loopback or family not in (socket.AF_INET, socket.AF_INET6):
            continue
        attrs = _attributes(payload, _IFADDRMSG.size)
        raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
        if not raw:
            continue
        address = ipaddress.ip_address(raw)
        if not (address.is_loopback or address.is_link_local):
            found.append(address)
    return found


def detect_ipv6() -> bool:
    """RULES.md: IPv6 rules when the first non-loopback address is IPv6; none means IPv4."""
    addresses = pod_addresses()
    return bool(addresses) and addresses[0].version == 6


def enter(path: str) -> None:
    """Move this process (single-threaded) into the network namespace at `path`."""
    import ctypes

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise IstioInitError(f"--network-namespace {path}: {exc.strerror}") from None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise IstioInitError(f"--network-namespace {path}: cannot enter: {os.strerror(err)}")
    finally:
        os.close(fd)
