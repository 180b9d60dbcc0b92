"""The iptables rules installed in this namespace, read once, and the one answer to "which store holds ours".

A namespace can hold rules in both iptables flavours (legacy and nft; the
kernel runs both flavours' hooks), for instance when a run was killed during
a backend switch. `check`, `trace --live` and `graph --live` must then look at
the same store, or `trace` walks one rule set while `check` judges the other.
So they all read through `read()` and use its `store`, decided here by one
policy (`holding_store`), which agrees with where an apply writes
(`backends.choose`) and what it removes from the other stores
(`backends.others_holding_ours`, by the same `tables_hold_ours` test):

- an explicit --iptables-backend names the store;
- with `auto`, the store an apply would write to, when it holds istio-init's
  rules or no store does; otherwise the one store that does (an apply would
  move them, but until then that is where they capture).

`clean` needs no store: it removes istio-init's rules from every flavour in use.

The rest of what an apply leaves is read here too, for the same commands:
istio-init's native nftables tables, its policy routing and the addresses on
lo. Everything is read through the System (system.py), so the in-memory host
of the tests answers as the kernel does.
"""

from __future__ import annotations

from istio_init.records import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from typing import Any, Mapping, Sequence

    from istio_init.iptables_save.read import SavedTable
    from istio_init.host.routing import Routing

FLAVOURS = ("legacy", "nft")
FAMILIES = (4, 6)


class Installed(NamedTuple):
    """Every flavour's parsed tables (flavours and families the kernel lacks are absent), and the store."""

    store: str  # "legacy" or "nft": the flavour that holds (or, holding none, would get) istio-init's rules
    tables: dict[str, dict[int, dict[str, SavedTable]]]  # flavour -> family -> table name -> parsed table

    def of_store(self, family: int) -> dict[str, SavedTable]:
        return self.tables.get(self.store, {}).get(family, {})


def holding_store(requested: str, holding: Sequence[str], apply_would_use: str) -> str:
    """The one policy: the store that holds istio-init's rules (see the module's docstring). Pure."""
    from istio_init.backends import flavour

    if requested != "auto":
        return flavour(requested)
    if apply_would_use in holding or not holding:
        return apply_would_use
    return holding[0]


def stores_holding_ours(tables: Mapping[str, Mapping[int, Mapping[str, SavedTable]]]) -> list[str]:
    """The flavours whose tables (any family) hold istio-init's rules, in FLAVOURS order."""
    from istio_init.backends.iptables.reconcile import tables_hold_ours

    return [name for name in FLAVOURS
            if any(tables_hold_ours(family) for family in tables.get(name, {}).values())]


class Reading:
    """read(), started: the save tools of every flavour and family to read run from here on, and
    `finish` parses what they printed and picks the store. `check` plans while they run.

    Tables without `start_save` (the tests' in-memory host) are read at `finish`.
    ApplyError when a tool cannot be started or fails.
    """

    def __init__(self, requested: str) -> None:
        from istio_init import backends
        from istio_init.system import current

        self.requested = requested
        self.pending: list[tuple[str, int, Any, Any]] = []  # flavour, family, tables, started save or None
        # One answer per kernel question for the whole reading: its choice of store included (finish).
        self.facts = backends.KernelFacts()
        # The legacy tools start before nf_tables is asked (netlink, and the module that asks).
        for name in backends.each_candidate(requested, list(FAMILIES), self.facts):
            reader = current().iptables(name)  # the tables alone: no backend around them for reading
            for family in FAMILIES:
                if name == "legacy" and not self.facts.legacy_available([family]):
                    continue
                if name == "nft" and not self.facts.nft_in_use([family]):
                    continue
                start = getattr(reader, "start_save", None)
                self.pending.append((name, family, reader, start(family, False) if start else None))

    def finish(self) -> Installed:
        # What reading the text needs is loaded first, while the tools still run: the parser and
        # reconcile (stores_holding_ours).
        from istio_init import backends
        from istio_init.backends.iptables import reconcile  # noqa: F401 (stores_holding_ours)
        from istio_init.iptables_save.read import parse_save

        tables: dict[str, dict[int, dict[str, SavedTable]]] = {}
        pending, self.pending = self.pending, []
        for index, (name, family, reader, started) in enumerate(pending):
            try:
                text = started.result() if started is not None else reader.save(family, counters=False)
            except BaseException:
                _abandon(pending[index + 1:])
                raise
            tables.setdefault(name, {})[family] = parse_save(text)
        if self.requested != "auto":
            return Installed(holding_store(self.requested, [], ""), tables)
        would_use = backends.choose("auto", [4], self.facts).name  # every plan has IPv4 rules
        return Installed(holding_store(self.requested, stores_holding_ours(tables), would_use), tables)

    def abandon(self) -> None:
        """Wait for the started tools without reading them (the caller failed meanwhile)."""
        pending, self.pending = self.pending, []
        _abandon(pending)


def _abandon(pending: list[tuple[str, int, Any, Any]]) -> None:
    for _, _, _, started in pending:
        if started is not None:
            try:
                started.result()
            except Exception:  # only reaping it matters here
                pass


def read(requested: str) -> Installed:
    """Read every flavour that may hold istio-init's rules (both families, each once) and pick the store.

    Reads only: a flavour the kernel lacks (no legacy ip_tables, or no
    iptables-nft tables) is left out instead of being created. With a backend
    other than auto only its flavour is read. ApplyError when a tool fails.
    """
    return Reading(requested).finish()


def native_objects() -> list[dict[str, Any]]:
    """istio-init's native nftables tables (`inet istio-proxy-*`), as `nft -j list ruleset` objects."""
    from istio_init.backends.nftables import NftablesBackend

    return NftablesBackend().ours()


def policy_routing(marks: set[int], tables: set[int]) -> frozenset[Routing]:
    """istio-init's policy rules and routes for `marks` and `tables` in both families."""
    from istio_init.system import current

    system = current()
    return frozenset(item for family in FAMILIES for item in system.owned_routing(family, marks, tables))


def loopback_ipv6() -> set[str]:
    """The IPv6 addresses on lo, as "::6/128"."""
    from istio_init.system import current

    return current().loopback_ipv6_addresses()
