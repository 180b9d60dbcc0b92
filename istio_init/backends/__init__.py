"""Ways of getting a rule plan into the kernel, and the one place that picks one.

`base.py` is the seam (what apply.py calls); `iptables/` holds the libiptc and
`iptables-restore` backends with what they share (reading iptables-save text
into the model, reconcile). The choice of backend for `--iptables-backend`
(resolving `auto`), and which backends hold istio-init's rules today, are
decided here and nowhere else.
"""

from __future__ import annotations

import os
from istio_init.records import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from typing import Callable, Sequence

    from istio_init.backends.base import Backend
    from istio_init.backends.iptables.backend import IptablesBackend

# `auto` never picks libiptc: importing python-iptables (about 12 ms of ctypes
# structures and libxtables) costs more than starting iptables-legacy-restore
# (about 4 ms), and python-iptables builds rules far slower than the tool loads
# them, so the restore tool is faster for every plan size, the seed's included
# (README, "Start-up time"; scripts/bench shows both). libiptc stays for --iptables-backend libiptc.
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


def choose(requested: str, families: Sequence[int]) -> Choice:
    """The backend for --iptables-backend `requested`, resolving `auto`, and why."""
    if requested != "auto":
        return Choice(requested, f"--iptables-backend {requested}")
    if nft_in_use(families):
        return Choice("nft", "auto: the namespace already has iptables-nft tables")
    if not legacy_available(families):
        return Choice("nft", "auto: the kernel offers no legacy ip_tables")
    return Choice("legacy", "auto: legacy tables work and the namespace has no iptables-nft rules")


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
