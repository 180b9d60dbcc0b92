"""The one netlink stack istio-init speaks: socket, framing, dumps, requests with an acknowledgement,
attributes, and the few messages it sends.

Written from the kernel's uapi headers (linux/netlink.h, rtnetlink.h,
fib_rules.h, if_addr.h, netfilter/nfnetlink.h, netfilter/nf_tables.h), with
the standard library's C socket module (`_socket`) only: every
apply asks netlink for the pod's addresses and nf_tables' tables, and TPROXY
and IPv6 pods also change a policy rule, a route and an address, and a
netlink library's import would cost more than all of that apply's own work
(docs/performance.md, "What start-up avoids"). A refusal by the kernel is an
OSError carrying its errno; the callers word it as an ApplyError.
tests/test_netlink.py holds every message here to an independent decoder
and encoder (pyroute2's), both ways.
"""

from __future__ import annotations

import _socket
import errno
import os
import sys

from istio_init.records import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from typing import Literal, TypeVar

    # An attribute list as on the wire: (type, payload) pairs in order, repeats kept.
    Attributes = tuple[tuple[int, bytes], ...]
    Message = TypeVar("Message", "RouteMessage", "RuleMessage", "AddressMessage", "TableMessage")

# linux/netlink.h
NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
ADD = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL  # what `ip ... add` asks: make it, fail if it exists
DELETE = NLM_F_REQUEST | NLM_F_ACK

# linux/rtnetlink.h: message types
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
# linux/netfilter/nfnetlink.h and nf_tables.h: NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_*
NFT_MSG_NEWTABLE = 10 << 8 | 0
NFT_MSG_GETTABLE = 10 << 8 | 1

# linux/rtnetlink.h: header values and route attributes
RTPROT_BOOT = 3  # the protocol `ip route add` records
RTN_LOCAL = 2
RT_SCOPE_HOST = 254
RT_TABLE_COMPAT = 252  # the header's table byte for a table id above 255 (the id itself is RTA_TABLE)
RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_MULTIPATH, RTA_TABLE = 4, 5, 6, 9, 15
# linux/fib_rules.h: the action and the rule attributes
FR_ACT_TO_TBL = 1
FRA_DST, FRA_SRC, FRA_IIFNAME, FRA_GOTO, FRA_PRIORITY = 1, 2, 3, 4, 6
FRA_FWMARK, FRA_FLOW, FRA_TUN_ID, FRA_SUPPRESS_IFGROUP, FRA_SUPPRESS_PREFIXLEN = 10, 11, 12, 13, 14
FRA_TABLE, FRA_FWMASK, FRA_OIFNAME, FRA_L3MDEV, FRA_UID_RANGE = 15, 16, 17, 19, 20
FRA_PROTOCOL, FRA_IP_PROTO, FRA_SPORT_RANGE, FRA_DPORT_RANGE = 21, 22, 23, 24
# linux/if_addr.h and linux/netfilter/nf_tables.h
IFA_ADDRESS, IFA_LOCAL = 1, 2
NFTA_TABLE_NAME = 1

class Layout:
    """A C struct of integer fields without padding, packed and read as `struct.Struct` would ("=" or ">").

    `struct` is a shared library (its C module `_struct`) loaded on every
    apply for the few headers here (docs/performance.md, "What start-up
    avoids"). A layout is read as one integer of its whole size
    (int.from_bytes) and cut into its fields by shifts, so reading a header
    costs one C call, not one a field. Only a single-field layout may be signed.
    """

    __slots__ = ("size", "order", "signed", "fields")

    def __init__(self, widths: tuple[int, ...], big_endian: bool = False, signed: bool = False) -> None:
        if signed and len(widths) != 1:
            raise ValueError("netlink: only a single-field layout may be signed")
        self.size = sum(widths)
        self.order: Literal["little", "big"] = "big" if big_endian else sys.byteorder
        self.signed = signed
        fields = []  # (shift, mask) of each field in the whole as one integer of self.order
        start = 0
        for width in widths:
            shift = 8 * (self.size - start - width if self.order == "big" else start)
            fields.append((shift, (1 << 8 * width) - 1))
            start += width
        self.fields = tuple(fields)

    def pack(self, *values: int) -> bytes:
        if len(values) != len(self.fields):
            raise ValueError(f"netlink: {len(self.fields)} fields to pack, got {len(values)}")
        if self.signed:
            return values[0].to_bytes(self.size, self.order, signed=True)
        whole = 0
        for value, (shift, mask) in zip(values, self.fields):
            if not 0 <= value <= mask:
                raise OverflowError(f"netlink: {value} does not fit its field")
            whole |= value << shift
        return whole.to_bytes(self.size, self.order)

    def unpack_from(self, data: bytes, offset: int = 0) -> tuple[int, ...]:
        if offset + self.size > len(data):
            raise ValueError(f"netlink: {self.size} bytes wanted at offset {offset} of {len(data)}")
        whole = int.from_bytes(data[offset:offset + self.size], self.order, signed=self.signed)
        if len(self.fields) == 1:
            return (whole,)
        return tuple([whole >> shift & mask for shift, mask in self.fields])

    def unpack(self, data: bytes) -> tuple[int, ...]:
        if len(data) != self.size:
            raise ValueError(f"netlink: {self.size} bytes wanted, got {len(data)}")
        return self.unpack_from(data)


_NATIVE = sys.byteorder
_HEADER = Layout((4, 2, 2, 4, 4))  # struct nlmsghdr: length, type, flags, sequence, port id
_ERROR = Layout((4,), signed=True)  # struct nlmsgerr's error (the request's header follows)
_ATTRIBUTE = Layout((2, 2))  # struct nlattr (struct rtattr): length, type
_U32 = Layout((4,))
_RTMSG = Layout((1, 1, 1, 1, 1, 1, 1, 1, 4))  # struct rtmsg and struct fib_rule_hdr share this layout
_IFADDRMSG = Layout((1, 1, 1, 1, 4))
_NFGENMSG = Layout((1, 1, 2), big_endian=True)  # its res_id is big-endian (__be16)
RECEIVE_BUFFER = 65536


def align(length: int) -> int:
    """NLMSG_ALIGN and NLA_ALIGN: messages and attributes start on 4-byte boundaries."""
    return (length + 3) & ~3


# ---- attributes -----------------------------------------------------------------------------------

def u32(value: int) -> bytes:
    return _U32.pack(value)


def u8(value: int) -> bytes:
    return bytes([value])


def encode_attributes(attributes: Attributes) -> bytes:
    """Each attribute's header, payload and padding to the next 4-byte boundary."""
    out = bytearray()
    for kind, payload in attributes:
        out += _ATTRIBUTE.pack(_ATTRIBUTE.size + len(payload), kind) + payload
        out += bytes(align(len(out)) - len(out))
    return bytes(out)


def decode_attributes(data: bytes, offset: int) -> Attributes:
    found = []
    while offset + _ATTRIBUTE.size <= len(data):
        # struct nlattr's two fields read directly: the loop runs for every attribute of every dumped message
        length = int.from_bytes(data[offset:offset + 2], _NATIVE)
        kind = int.from_bytes(data[offset + 2:offset + 4], _NATIVE)
        if length < _ATTRIBUTE.size or offset + length > len(data):
            break
        found.append((kind & 0x3FFF, data[offset + _ATTRIBUTE.size:offset + length]))  # without NLA_F_NESTED/BYTEORDER
        offset += align(length)
    return tuple(found)


def attribute(attributes: Attributes, kind: int) -> bytes | None:
    """The first attribute of this type (the kernel sends each of istio-init's once)."""
    for found, payload in attributes:
        if found == kind:
            return payload
    return None


def u32_attribute(attributes: Attributes, kind: int) -> int | None:
    payload = attribute(attributes, kind)
    return _U32.unpack(payload)[0] if payload is not None and len(payload) == 4 else None


def u8_attribute(attributes: Attributes, kind: int) -> int | None:
    payload = attribute(attributes, kind)
    return payload[0] if payload else None


# ---- the messages ---------------------------------------------------------------------------------

class RouteMessage(NamedTuple):
    """struct rtmsg (linux/rtnetlink.h) and its RTA_* attributes: RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE."""

    family: int
    dst_len: int = 0
    src_len: int = 0
    tos: int = 0
    table: int = 0  # RT_TABLE_COMPAT when the table id needs RTA_TABLE's 32 bits
    protocol: int = 0
    scope: int = 0
    type: int = 0
    flags: int = 0
    attrs: Attributes = ()


class RuleMessage(NamedTuple):
    """struct fib_rule_hdr (linux/fib_rules.h) and its FRA_* attributes: RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE."""

    family: int
    dst_len: int = 0
    src_len: int = 0
    tos: int = 0
    table: int = 0
    res1: int = 0
    res2: int = 0
    action: int = 0
    flags: int = 0
    attrs: Attributes = ()


class AddressMessage(NamedTuple):
    """struct ifaddrmsg (linux/if_addr.h) and its IFA_* attributes: RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR."""

    family: int
    prefixlen: int = 0
    flags: int = 0
    scope: int = 0
    ifindex: int = 0  # ifa_index (`index` is a tuple's method)
    attrs: Attributes = ()


class TableMessage(NamedTuple):
    """struct nfgenmsg (linux/netfilter/nfnetlink.h) and NFTA_TABLE_* attributes: NFT_MSG_GETTABLE's dump."""

    family: int
    version: int = 0
    res_id: int = 0
    attrs: Attributes = ()


_LAYOUTS: dict[type, Layout] = {RouteMessage: _RTMSG, RuleMessage: _RTMSG, AddressMessage: _IFADDRMSG,
                                       TableMessage: _NFGENMSG}


def encode(message: RouteMessage | RuleMessage | AddressMessage | TableMessage) -> bytes:
    """The message's fixed header and attributes (the payload after struct nlmsghdr)."""
    return _LAYOUTS[type(message)].pack(*message[:-1]) + encode_attributes(message.attrs)


def decode(kind: type[Message], payload: bytes) -> Message:
    layout: Layout = _LAYOUTS[kind]
    if len(payload) < layout.size:
        raise OSError(errno.EPROTO, f"netlink: a {kind.__name__} shorter than its header")
    return kind._make((*layout.unpack_from(payload), decode_attributes(payload, layout.size)))


def frame(msg_type: int, flags: int, sequence: int, payload: bytes) -> bytes:
    """struct nlmsghdr before the payload; port id 0 (the kernel's own)."""
    return _HEADER.pack(_HEADER.size + len(payload), msg_type, flags, sequence, 0) + payload


def replies(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """The messages in one datagram as (type, flags, sequence, payload)."""
    found = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, msg_type, flags, sequence, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise OSError(errno.EPROTO, "netlink: a truncated reply")
        found.append((msg_type, flags, sequence, data[offset + _HEADER.size:offset + length]))
        offset += align(length)
    return found


# ---- the socket -----------------------------------------------------------------------------------

class Socket:
    """One netlink socket (NETLINK_ROUTE unless said); each request gets the next sequence number.

    Every receive waits at most `timeout` seconds (a TimeoutError, an OSError).
    """

    def __init__(self, protocol: int = NETLINK_ROUTE, timeout: float = 5.0) -> None:
        self.sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, protocol)
        self.sock.settimeout(timeout)
        self.sequence = 0

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def exchange(self, msg_type: int, flags: int, payload: bytes) -> list[tuple[int, bytes]]:
        """Send one request; (type, payload) of its replies until the end of the dump or the acknowledgement.

        A negative error in the kernel's answer raises OSError with that errno.
        """
        self.sequence += 1
        self.sock.sendall(frame(msg_type, flags, self.sequence, payload))
        found: list[tuple[int, bytes]] = []
        while True:
            for reply_type, _, sequence, body in replies(self.sock.recv(RECEIVE_BUFFER)):
                if sequence != self.sequence:
                    continue  # a late answer to an earlier request
                if reply_type == NLMSG_DONE:
                    return found
                if reply_type == NLMSG_ERROR:
                    code = -_ERROR.unpack_from(body)[0] if len(body) >= _ERROR.size else errno.EPROTO
                    if code:
                        raise OSError(code, os.strerror(code))
                    return found  # the acknowledgement (it also ends some dumps)
                found.append((reply_type, body))

    def dump(self, request_type: int, request: Message, reply_type: int) -> list[Message]:
        """The objects of `reply_type` the kernel lists for `request` (its family and header select)."""
        kind = type(request)
        return [decode(kind, body) for found, body in self.exchange(request_type, NLM_F_REQUEST | NLM_F_DUMP,
                                                                     encode(request)) if found == reply_type]

    def change(self, msg_type: int, flags: int,
               message: RouteMessage | RuleMessage | AddressMessage | TableMessage) -> None:
        """One request the kernel acknowledges (ADD or DELETE); OSError when it refuses."""
        self.exchange(msg_type, flags, encode(message))


def dump(request_type: int, request: Message, reply_type: int, protocol: int = NETLINK_ROUTE) -> list[Message]:
    """One dump over a socket of its own."""
    with Socket(protocol) as sock:
        return sock.dump(request_type, request, reply_type)
