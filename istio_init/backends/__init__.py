"""Ways of getting a rule plan into the kernel, and the one place that picks one.

`base.py` is the seam above the backends (what apply.py calls); `iptables/`
holds the libiptc and `iptables-restore` backends with what they share
(reading iptables-save text into the model, reconcile); below them all is
the System (system.py), which does what they decide. The choice of backend for `--iptables-backend`
(resolving `auto`), and which backends hold istio-init's rules today, are
decided here and nowhere else.
"""

from __future__ import annotations

from istio_init.records import TYPE_CHECKING, NamedTuple
from istio_init.system import current

if TYPE_CHECKING:
    from typing import Callable, Iterator, Sequence

    from istio_init.backends.base import Backend
    from istio_init.backends.iptables.backend import IptablesBackend

# `auto` never picks libiptc: importing python-iptables costs more than starting
# iptables-legacy-restore, and python-iptables builds rules far slower than the tool loads them
# (docs/performance.md). libiptc stays for --iptables-backend libiptc.


def get(name: str, start: Sequence[int] = ()) -> IptablesBackend:
    """The backend for a resolved --iptables-backend value (libiptc, legacy or nft).

    `start`: the families whose restore tools start now (IptablesBackend.prepare), before the
    backend's own modules are imported, so those imports too overlap the tools' loading.
    """
    tables = current().iptables(name)
    start_tools = getattr(tables, "start", None)
    if start and start_tools is not None:
        start_tools(start)
    from istio_init.backends.iptables.backend import IptablesBackend

    return IptablesBackend(tables)


def flavour(name: str) -> str:
    """The iptables flavour (which kernel tables) a backend works on."""
    return "legacy" if name == "libiptc" else name


class Choice(NamedTuple):
    name: str
    reason: str


def nft_in_use(families: Sequence[int]) -> bool:
    """Whether iptables-nft has made any of its tables in this namespace (asked over netlink)."""
    system = current()
    return any(system.iptables_nft_tables(family) for family in families)


def legacy_available(families: Sequence[int]) -> bool:
    system = current()
    return all(system.legacy_tables(family) is not None for family in families)


def _legacy_tables(family: int) -> set[str]:
    """The legacy tables instantiated in this namespace (the kernel lists them per namespace)."""
    return current().legacy_tables(family) or set()


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
    return list(each_candidate(requested, families))


def each_candidate(requested: str, families: Sequence[int]) -> Iterator[str]:
    """candidates(), one at a time: a reader starts the legacy tools before nf_tables is asked over netlink."""
    if requested != "auto":
        yield flavour(requested)
        return
    legacy = legacy_available(families)
    if legacy:
        yield "legacy"
    if not legacy or nft_in_use(families):
        yield "nft"


def native_nft_in_use() -> bool:
    """Whether istio-init's native nftables tables exist here (asked over netlink, no libnftables)."""
    return bool(current().native_nft_tables())


def native(rules_version: str = "") -> Backend:
    """The native nftables backend (`rules_version` decides its IPv4-only guard; removing needs none)."""
    from istio_init.backends.nftables import NftablesBackend, guard_single_family

    return NftablesBackend(guard_single_family(rules_version))


def others_holding_ours(chosen: str, families: Sequence[int]) -> list[Backend]:
    """Backends other than `chosen`'s that hold istio-init's rules (left by an earlier run), to remove them.

    `chosen` is a backend's name: an --iptables-backend value or "nftables" (--native-nftables).

    A run that switches backend (auto now sees iptables-nft tables, or the
    flag changed) must remove those, or two rule sets would capture at once.
    Cheap when there is nothing: the nft side is asked over netlink first and
    legacy tables are only read when the kernel has them loaded.
    """
    found = []
    if chosen != "nftables" and native_nft_in_use():
        found.append(native())
    for other in ("legacy", "nft"):
        if other == flavour(chosen):
            continue
        if other == "nft" and not nft_in_use(families):
            continue
        if other == "legacy" and not any(_legacy_tables(f) for f in families):
            continue
        backend = get(other)
        if backend.holds_ours(families):
            found.append(backend)
    return found
