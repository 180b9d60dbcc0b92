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


class KernelFacts:
    """The kernel's answers that decide between backends, each question asked once.

    Choosing a backend, listing the flavours that may hold istio-init's rules
    and reading them all ask the same few questions: which legacy tables the
    kernel lists for a family, which iptables-nft tables and which of
    istio-init's native tables exist. One KernelFacts answers them for one
    step, asking the System at most once per question and family (reading
    for `check` asked eight questions where four answer, one of them three
    times). A step that changes tables, or takes the lock after asking,
    takes a new one.
    """

    def __init__(self) -> None:
        self._legacy: dict[int, set[str] | None] = {}
        self._nft: dict[int, set[str]] = {}
        self._native: set[str] | None = None

    def legacy_tables(self, family: int) -> set[str] | None:
        """The legacy tables the kernel lists here for `family`; None when it offers no legacy ip_tables."""
        if family not in self._legacy:
            self._legacy[family] = current().legacy_tables(family)
        return self._legacy[family]

    def iptables_nft_tables(self, family: int) -> set[str]:
        """The iptables tables iptables-nft has made here for `family` (asked over netlink)."""
        if family not in self._nft:
            self._nft[family] = current().iptables_nft_tables(family)
        return self._nft[family]

    def native_nft_tables(self) -> set[str]:
        """istio-init's own `inet istio-proxy-*` tables here (asked over netlink, no libnftables)."""
        if self._native is None:
            self._native = current().native_nft_tables()
        return self._native

    def nft_in_use(self, families: Sequence[int]) -> bool:
        """Whether iptables-nft has made any of its tables here for one of `families`."""
        return any(self.iptables_nft_tables(family) for family in families)

    def legacy_available(self, families: Sequence[int]) -> bool:
        """Whether the kernel offers legacy ip_tables for every one of `families`."""
        return all(self.legacy_tables(family) is not None for family in families)


def choose(requested: str, families: Sequence[int], facts: KernelFacts | None = None) -> Choice:
    """The backend for --iptables-backend `requested`, resolving `auto`, and why."""
    if requested != "auto":
        return Choice(requested, f"--iptables-backend {requested}")
    facts = facts or KernelFacts()
    if facts.nft_in_use(families):
        return Choice("nft", "auto: the namespace already has iptables-nft tables")
    if not facts.legacy_available(families):
        return Choice("nft", "auto: the kernel offers no legacy ip_tables")
    return Choice("legacy", "auto: legacy tables work and the namespace has no iptables-nft rules")


def candidates(requested: str, families: Sequence[int], facts: KernelFacts | None = None) -> list[str]:
    """The flavours that may hold istio-init's rules, for clean and for reading (`auto`: every one in use)."""
    return list(each_candidate(requested, families, facts))


def each_candidate(requested: str, families: Sequence[int], facts: KernelFacts | None = None) -> Iterator[str]:
    """candidates(), one at a time: a reader starts the legacy tools before nf_tables is asked over netlink."""
    if requested != "auto":
        yield flavour(requested)
        return
    facts = facts or KernelFacts()
    legacy = facts.legacy_available(families)
    if legacy:
        yield "legacy"
    if not legacy or facts.nft_in_use(families):
        yield "nft"


def native_nft_in_use(facts: KernelFacts | None = None) -> bool:
    """Whether istio-init's native nftables tables exist here (asked over netlink, no libnftables)."""
    return bool((facts or KernelFacts()).native_nft_tables())


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
    facts = KernelFacts()
    if chosen != "nftables" and facts.native_nft_tables():
        found.append(native())
    for other in ("legacy", "nft"):
        if other == flavour(chosen):
            continue
        if other == "nft" and not facts.nft_in_use(families):
            continue
        if other == "legacy" and not any(facts.legacy_tables(f) for f in families):
            continue
        backend = get(other)
        if backend.holds_ours(families):
            found.append(backend)
    return found
