"""Which nf_tables tables exist in the namespace, asked over netlink (NFT_MSG_GETTABLE).

Every apply asks, to choose the backend (`auto` must not put legacy rules
beside iptables-nft's) and to remove istio-init's native tables after a
switch away from `--native-nftables`. One netlink dump is far cheaper than
starting `iptables-nft-save` or loading libnftables on every pod start.
"""

from __future__ import annotations

from istio_init.host import netlink

_NFPROTO = {4: 2, 6: 10}  # NFPROTO_IPV4, NFPROTO_IPV6 (linux/netfilter.h)
_NFPROTO_INET = 1
IPTABLES_TABLE_NAMES = frozenset({"filter", "nat", "mangle", "raw", "security"})


def _table_names(nfproto: int) -> set[str]:
    """The names of nf_tables' tables of one protocol family here; none without nf_tables."""
    try:
        tables = netlink.dump(netlink.NFT_MSG_GETTABLE, netlink.TableMessage(nfproto), netlink.NFT_MSG_NEWTABLE,
                              netlink.NETLINK_NETFILTER)
    except OSError:
        return set()
    names = set()
    for table in tables:
        if table.family == nfproto:
            raw = netlink.attribute(table.attrs, netlink.NFTA_TABLE_NAME) or b""
            names.add(raw.split(b"\0", 1)[0].decode(errors="replace"))
    return names


def iptables_nft_tables(family: int) -> set[str]:
    """The iptables tables that iptables-nft has made in this namespace, for one family (4 or 6)."""
    return _table_names(_NFPROTO[family]) & IPTABLES_TABLE_NAMES


def native_nft_tables() -> set[str]:
    """istio-init's own `inet istio-proxy-{nat,mangle,raw}` tables in this namespace.

    Only the tables a rule set plans are istio-init's: a user's `inet
    istio-proxy-foo` is not, and must neither load libnftables nor be reported
    as removed.
    """
    from istio_init.model import NATIVE_TABLE_PREFIX, NATIVE_TABLES

    return _table_names(_NFPROTO_INET) & {NATIVE_TABLE_PREFIX + table for table in NATIVE_TABLES}
