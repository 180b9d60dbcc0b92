"""Ways of getting a rule plan into the kernel, and the one place that picks one.

`base.py` is the seam (what apply.py calls); `iptables/` holds the libiptc and
`iptables-restore` backends with what they share (reading iptables-save text
into the model, reconcile). The choice of backend for `--iptables-backend`
(resolving `auto`), and which backends hold istio-init's rules today, are
decided here and nowhere else.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

if TYPE_CHECKING:
    from istio_init.backends.base import Backend
    from istio_init.backends.iptables.backend import IptablesBackend

NAMES = ("libiptc", "legacy", "nft")
# python-iptables builds about 10 CIDR or 3 port rules per millisecond while
# iptables-legacy-restore loads 1,400 rules in under 10 ms: past this many
# rules `auto` sends the plan to the restore tool (measured with scripts/bench).
AUTO_LIBIPTC_MAX_RULES = 200
_LEGACY_NAMES = {4: "/proc/net/ip_tables_names", 6: "/proc/net/ip6_tables_names"}


def get(name: str) -> IptablesBackend:
    """The backend for a resolved --iptables-backend value (libiptc, legacy or nft)."""
    if name == "libiptc":
        from istio_init.backends.iptables.libiptc import LibiptcBackend

        return LibiptcBackend()
    from istio_init.backends.iptables.restore import RestoreBackend

    return RestoreBackend(name)


def flavour(name: str) -> str:
    """The iptables flavour (which kernel tables) a backend works on."""
    return "legacy" if name == "libiptc" else name


class Choice(NamedTuple):
    name: str
    reason: str


def nft_in_use(families: Sequence[int]) -> bool:
    """Whether iptables-nft has made any of its tables in this namespace (asked over netlink)."""
    from istio_init import netns

    return any(netns.iptables_nft_tables(family) for family in families)


def legacy_available(families: Sequence[int]) -> bool:
    return all(os.path.exists(_LEGACY_NAMES[f]) for f in families)


def _legacy_tables(family: int) -> set[str]:
    """The legacy tables instantiated in this namespace (the kernel lists them per namespace)."""
    try:
        with open(_LEGACY_NAMES[family]) as names:
            return set(names.read().split())
    except OSError:
        return set()


def choose(requested: str, families: Sequence[int], rule_count: int = 0,
           interfaces: Sequence[str] = ()) -> Choice:
    """The backend for --iptables-backend `requested`, resolving `auto`, and why.

    `interfaces` are the names the plan writes into rules (-k): python-iptables
    cannot carry every name the kernel accepts (see ifnames.py).
    """
    if requested != "auto":
        return Choice(requested, f"--iptables-backend {requested}")
    if nft_in_use(families):
        return Choice("nft", "auto: the namespace already has iptables-nft tables")
    if not legacy_available(families):
        return Choice("nft", "auto: the kernel offers no legacy ip_tables")
    from istio_init import ifnames

    if not ifnames.libiptc_can_carry(tuple(interfaces)):
        return Choice("legacy", "auto: python-iptables cannot write the non-ASCII -k names exactly; "
                                "iptables-legacy-restore can")
    if rule_count > AUTO_LIBIPTC_MAX_RULES:
        return Choice("legacy", f"auto: {rule_count} rules, more than {AUTO_LIBIPTC_MAX_RULES}; "
                                "iptables-legacy-restore loads large plans faster than python-iptables builds them")
    return Choice("libiptc", "auto: legacy tables work and the namespace has no iptables-nft rules")


def candidates(requested: str, families: Sequence[int]) -> list[str]:
    """The flavours that may hold istio-init's rules, for clean and for reading (`auto`: every one in use)."""
    if requested != "auto":
        return [flavour(requested)]
    found = ["legacy"] if legacy_available(families) else []
    if not found or nft_in_use(families):
        found.append("nft")
    return found


def native_nft_in_use() -> bool:
    """Whether istio-init's native nftables tables exist here (asked over netlink, no libnftables)."""
    from istio_init import netns

    return bool(netns.native_nft_tables())


def native(rules_version: str) -> Backend:
    from istio_init.backends.nftables import NftablesBackend, guard_single_family

    return NftablesBackend(guard_single_family(rules_version))


def others_holding_ours(chosen: str, families: Sequence[int], rules_version: str = "1.8",
                        make: Callable[[str], Backend] = get) -> list[Backend]:
    """Backends other than `chosen`'s that hold istio-init's rules (left by an earlier run).

    `chosen` is an --iptables-backend name or "nftables" (--native-nftables).

    A run that switches backend (auto now sees iptables-nft tables, or the
    flag changed) must remove those, or two rule sets would capture at once.
    Cheap when there is nothing: the nft side is asked over netlink first and
    legacy tables are only read when the kernel has them loaded.
    """
    found = []
    if chosen != "nftables" and native_nft_in_use():
        found.append(native(rules_version))
    for other in ("legacy", "nft"):
        if other == flavour(chosen):
            continue
        if other == "nft" and not nft_in_use(families):
            continue
        if other == "legacy" and not any(_legacy_tables(f) for f in families):
            continue
        backend = make(other)
        if backend.holds_ours(families):
            found.append(backend)
    return found
