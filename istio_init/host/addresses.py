"""The namespace's addresses: the pod's own (which IP families it has), and `::6` on lo.

The pod's addresses are asked on every pod start, so reading them costs one
netlink dump and no `ipaddress` (the family check reads address bytes; see
docs/performance.md, "What start-up avoids"). `::6/128` on lo is the IPv6
inbound passthrough address an IPv6 plan puts there, added and removed as
`ip -6 addr add|del ::6/128 dev lo` would.
"""

from __future__ import annotations

import _socket

from istio_init.host import netlink
from istio_init.records import TYPE_CHECKING

if TYPE_CHECKING:
    import ipaddress

# The kernel gives every namespace's loopback device index 1 (LOOPBACK_IFINDEX; loopback_net_init
# insists on it), and no other device has IFF_LOOPBACK: so no link dump is needed to find or leave out lo.
LOOPBACK_IFINDEX = 1


def _is_loopback_or_link_local(raw: bytes) -> bool:
    """127.0.0.0/8, 169.254.0.0/16, ::1 and fe80::/10, as ipaddress's is_loopback and is_link_local."""
    if len(raw) == 4:
        return raw[0] == 127 or raw[:2] == b"\xa9\xfe"
    return raw == bytes(15) + b"\x01" or (raw[0] == 0xFE and raw[1] & 0xC0 == 0x80)


def _raw_addresses() -> list[bytes]:
    """The namespace's addresses (4 or 16 bytes) in kernel order, without loopback and link-local ones."""
    found = []
    for message in netlink.dump(netlink.RTM_GETADDR, netlink.AddressMessage(_socket.AF_UNSPEC), netlink.RTM_NEWADDR):
        if message.ifindex == LOOPBACK_IFINDEX or message.family not in (_socket.AF_INET, _socket.AF_INET6):
            continue
        attrs = message.attrs
        raw = netlink.attribute(attrs, netlink.IFA_LOCAL) or netlink.attribute(attrs, netlink.IFA_ADDRESS)
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


# ---- ::6 on lo ------------------------------------------------------------------------------------

def loopback_message(address: str) -> netlink.AddressMessage:
    """`ADDRESS[/PREFIX] dev lo` (IPv6; no prefix is /128) as the kernel lists it and is asked to change it."""
    ip, _, prefix = address.partition("/")
    raw = _socket.inet_pton(_socket.AF_INET6, ip)
    return netlink.AddressMessage(_socket.AF_INET6, int(prefix or 128), ifindex=LOOPBACK_IFINDEX,
                                  attrs=((netlink.IFA_ADDRESS, raw),))


def has_loopback_address(address: str) -> bool:
    wanted = loopback_message(address)
    listed = netlink.dump(netlink.RTM_GETADDR, netlink.AddressMessage(_socket.AF_INET6), netlink.RTM_NEWADDR)
    return any(m.ifindex == LOOPBACK_IFINDEX and m.prefixlen == wanted.prefixlen
               and netlink.attribute(m.attrs, netlink.IFA_ADDRESS) == wanted.attrs[0][1] for m in listed)


def add_loopback_address(address: str) -> bool:
    """`ip -6 addr add ADDRESS dev lo`; False when it was already there."""
    if has_loopback_address(address):
        return False
    with netlink.Socket() as sock:
        sock.change(netlink.RTM_NEWADDR, netlink.ADD, loopback_message(address))
    return True


def remove_loopback_address(address: str) -> bool:
    """`ip -6 addr del ADDRESS dev lo`; False when it was not there."""
    if not has_loopback_address(address):
        return False
    with netlink.Socket() as sock:
        sock.change(netlink.RTM_DELADDR, netlink.DELETE, loopback_message(address))
    return True


def loopback_ipv6_addresses() -> set[str]:
    """The IPv6 addresses on lo, as "::6/128", from /proc/net/if_inet6 (no ipaddress on every probe)."""
    found = set()
    try:
        with open("/proc/net/if_inet6") as table:
            for line in table:
                address, _, prefix, _, _, name = line.split()
                if name == "lo":
                    text = _socket.inet_ntop(_socket.AF_INET6, bytes.fromhex(address))
                    if "." in text:  # the C library writes ::a.b.c.d where ipaddress (and the plan) writes hex
                        import ipaddress

                        text = str(ipaddress.IPv6Address(int(address, 16)))
                    found.add(f"{text}/{int(prefix, 16)}")
    except FileNotFoundError:  # IPv6 disabled: no address at all
        pass
    return found
