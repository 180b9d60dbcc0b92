"""The seam between deciding and executing: what apply.py needs from a way of reaching the kernel.

A backend converges the namespace to a plan (or removes istio-init's rules)
in as few transactions as its kernel interface allows, and hands back an
`Undo` that puts everything it changed back. apply.py only sequences that
with the routes and addresses and undoes on failure; nothing above the
backends knows whether python-iptables, an `iptables-restore` binary or nft
did the work. Below the backends is the System (system.py), which tests
replace with an in-memory host.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from istio_init.model import RulePlan


class Undo(Protocol):
    """What one converge changed, and how to put it back."""

    @property
    def changed(self) -> tuple[str, ...]:
        """What was changed ("IPv4 nat", ...); empty when the namespace was already right."""

    @property
    def previous_marks(self) -> frozenset[int]:
        """TPROXY marks istio-init's rules used before this change (their policy routes may be stale)."""

    def undo(self) -> list[str]:
        """Put back everything changed; returns the problems met (empty: all put back)."""


class Backend(Protocol):
    name: str

    def read(self, family: int) -> Any:
        """The family's live state (iptables: tables parsed into the model; nftables: its JSON objects)."""

    def dump(self, family: int, tables: Sequence[str]) -> str:
        """What Istio prints after applying, for the family: `tables` (the plan's) and whatever else the
        last converge changed (iptables: their iptables-save text)."""

    def converge(self, plan: RulePlan, families: Sequence[int]) -> Undo:
        """Make istio-init's rules exactly `plan` in `families`; ApplyError (nothing changed) on failure."""

    def remove(self, families: Sequence[int]) -> Undo:
        """Remove istio-init's rules from `families`; ApplyError (nothing changed) on failure."""

    def holds_ours(self, families: Sequence[int]) -> bool:
        """Whether any of istio-init's rules are in this backend's tables."""

    def describe_removal(self, families: Sequence[int]) -> str:
        """What `remove` would change, as text, changing nothing (`clean -n`)."""
