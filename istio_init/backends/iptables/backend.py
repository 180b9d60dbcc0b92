"""What the iptables backends share: one read -> decide -> commit -> undo-on-failure path.

The snapshot taken before anything changes (`iptables-save -c`) is both the
live state reconcile.py decides from and what a failure restores. The
kernel side is a `Tables` the System hands out (system.py): how the tables
are saved, restored and how one family's decided changes reach the kernel
(libiptc in-process, or one `iptables-restore --noflush`), and the lock held
around read and commit. Any exception after the first commit, not only the
expected ones, puts every table that differs from its snapshot back.
"""

from __future__ import annotations

from istio_init.backends.iptables.committed import after_commit
from istio_init.backends.iptables.reconcile import TableChange, reconcile, restore_text, tables_hold_ours
from istio_init.iptables_save.read import (DIVERT_CHAIN, SavedTable, divert_marks, normalize, parse_save,
                                                   table_blocks)
from istio_init import timing
from istio_init.errors import ApplyError, rollback_outcome
from istio_init.model import RulePlan
from istio_init.records import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import ContextManager, Mapping, Protocol, Sequence

    class Tables(Protocol):
        """One flavour's iptables tables in the kernel: what the backend reads, commits and puts back."""

        name: str  # the backend's name: "libiptc", "legacy" or "nft"

        def session(self) -> ContextManager[None]:
            """Held around read and commit (libiptc: the xtables lock)."""

        def save(self, family: int, counters: bool = True) -> str:
            """The family's tables as `iptables-save` text."""

        def snapshot(self, family: int) -> str:
            """The family's tables with counters, read before anything changes."""

        def restore(self, family: int, saved_blocks: str) -> None:
            """Replace the tables of `saved_blocks` (save -c text) with exactly that content."""

        def commit(self, changes: Mapping[int, list[TableChange]]) -> None:
            """Commit each family's changes, table by table (ApplyError names what was refused)."""

        def restore_tool(self, family: int) -> str:
            """The restore tool's name, as `clean -n` shows its input."""


class IptablesUndo:
    """Snapshots of every family read, and the tables a commit may have changed.

    A plain class: importing dataclasses is start-up time (docs/performance.md).
    """

    def __init__(self, tables: Tables) -> None:
        self.tables = tables
        self.snapshots: dict[int, str] = {}
        self.touched: dict[int, list[str]] = {}
        # The decision, kept for `clean -n`, the printed tables and tests.
        self.decided: dict[int, list[TableChange]] = {}
        self.restored: list[str] = []

    @property
    def changed(self) -> tuple[str, ...]:
        return tuple(f"IPv{family} {table}" for family, tables in self.touched.items() for table in tables)

    @property
    def previous_marks(self) -> frozenset[int]:
        """TPROXY marks set by istio-init's ISTIO_DIVERT rules before this run (their routes may be stale)."""
        marks: set[int] = set()
        for text in self.snapshots.values():
            mangle = parse_save(text).get("mangle")
            marks |= divert_marks(saved.spec for saved in mangle.chain_rules(DIVERT_CHAIN)) if mangle else set()
        return frozenset(marks)

    def undo(self) -> list[str]:
        """Restore each touched table that no longer equals its snapshot."""
        problems = []
        for family, tables in self.touched.items():
            try:
                now = normalize(self.tables.save(family, counters=False))
                before = normalize(self.snapshots[family])
                differ = [t for t in tables if now.get(t, []) != before.get(t, [])]
                if differ:
                    self.tables.restore(family, table_blocks(self.snapshots[family], differ))
                    self.restored += [f"IPv{family} {table}" for table in differ]
            except ApplyError as exc:
                problems.append(f"IPv{family} tables {', '.join(tables)} may still hold this run's rules "
                                f"({exc}); `istio-init clean --iptables-backend {self.tables.name}` removes them")
        return problems


class IptablesBackend:
    """An iptables backend: libiptc or a flavour's restore tool, as the `Tables` it is given."""

    # The last successful converge: the printed tables are derived from its snapshot and decision.
    converged: IptablesUndo | None = None

    def __init__(self, tables: Tables) -> None:
        self.tables = tables
        self.name = tables.name

    def release(self) -> None:
        """End the restore tools started for the commit (backends.get's `start`) that it did not use."""
        stop = getattr(self.tables, "stop", None)
        if stop is not None:
            stop()

    def save(self, family: int, counters: bool = True) -> str:
        return self.tables.save(family, counters)

    def read(self, family: int) -> dict[str, SavedTable]:
        return parse_save(self.save(family, counters=False))

    def dump(self, family: int, tables: Sequence[str]) -> str:
        """`tables`, and any other table the last converge changed (stale rules removed), as iptables-save text.

        After a converge it is derived from the snapshot and the changes (committed.py); else read.
        """
        last = self.converged
        if last is not None and family in last.snapshots:
            changes = last.decided.get(family, [])
            names = list(dict.fromkeys([*tables, *(change.table for change in changes)]))
            return after_commit(last.snapshots[family], changes, names)
        return table_blocks(self.save(family, counters=False), list(tables))

    def holds_ours(self, families: Sequence[int]) -> bool:
        return any(tables_hold_ours(self.read(family)) for family in families)

    def decide(self, live: Mapping[int, dict[str, SavedTable]], plan: RulePlan | None,
               families: Sequence[int]) -> dict[int, list[TableChange]]:
        plans = {f.family: f for f in plan.families()} if plan is not None else {}
        return {family: reconcile(live[family], plans.get(family)) for family in families}

    def commit(self, changes: Mapping[int, list[TableChange]], undo: IptablesUndo) -> None:
        """Commit every family's changes; every table is recorded as touched before the first commit."""
        todo = {family: family_changes for family, family_changes in changes.items() if family_changes}
        for family, family_changes in todo.items():
            undo.touched[family] = [c.table for c in family_changes]
        if todo:
            self.tables.commit(todo)

    def converge(self, plan: RulePlan | None, families: Sequence[int]) -> IptablesUndo:
        undo = IptablesUndo(self.tables)
        with self.tables.session():
            timing.mark("backend session (libiptc: the xtables lock)")
            live = {}
            for family in families:
                undo.snapshots[family] = self.tables.snapshot(family)
                timing.mark(f"snapshot IPv{family} (iptables-save -c)")
                live[family] = parse_save(undo.snapshots[family])
                timing.mark(f"parse the IPv{family} snapshot")
            undo.decided = self.decide(live, plan, families)
            timing.mark("decide (reconcile)")
            error: BaseException | None = None
            try:
                self.commit(undo.decided, undo)
                timing.mark("commit")
            except BaseException as exc:  # an encoding error, a bug, a signal: all roll back the same
                error = exc
            finally:
                self.release()  # before a rollback: its restore tool takes the xtables lock too
        if error is not None:
            # After the session: the restore tool takes the xtables lock libiptc's session holds.
            problems = undo.undo()
            raise rollback_outcome(error, problems, bool(undo.restored)) from None
        self.converged = undo
        return undo

    def remove(self, families: Sequence[int]) -> IptablesUndo:
        return self.converge(None, families)

    def plan_removal(self, families: Sequence[int]) -> dict[int, list[TableChange]]:
        """What `remove` would change, without changing it (for `clean -n`)."""
        live = {family: parse_save(self.save(family, counters=False)) for family in families}
        return self.decide(live, None, families)

    def describe_removal(self, families: Sequence[int]) -> str:
        """`clean -n`: the restore text `remove` would feed, per family, under a comment naming the tool."""
        out = []
        for family, changes in self.plan_removal(families).items():
            text = restore_text(changes)
            if text:
                out.append(f"# {self.tables.restore_tool(family)} --noflush\n{text}")
        return "".join(out)

