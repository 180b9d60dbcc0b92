"""The tables as `iptables-save` prints them after a commit, derived without running it again.

Istio prints the touched tables after applying. Reading them back costs one
more `iptables-save` process per family on every pod start, yet the backend
already holds everything that text is made of: the snapshot it read just
before committing (under the lock, so nothing else changed them) and the
changes it committed. `reconcile.simulate` applies those changes to the
snapshot, and the iptables-save dialect's writer spells the result
(`iptables_save.write.table_text`: built-in chains in the kernel's order with
their policy and counters, user chains sorted, then each chain's rules). Planned rules are already in canonical form
(the goldens' round trip through both restore tools checks that), so the
text is what the kernel holds; tests/test_committed.py compares it with a real
iptables-save after applies through every backend.
"""

from __future__ import annotations

from istio_init.backends.iptables.reconcile import TableChange, simulate
from istio_init.iptables_save.read import SavedTable, parse_save
from istio_init.iptables_save.write import table_text
from istio_init.model import BUILTIN_CHAINS
from istio_init.records import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Sequence


def _table(name: str, live: SavedTable | None, change: TableChange | None) -> str:
    if live is None and change is None:
        return f"*{name}\nCOMMIT\n"  # as table_blocks spells a table the kernel does not have
    chains, rules = change.after if change is not None and change.after is not None else simulate(live, change)
    present = live.chains if live is not None else {}
    # A table the kernel makes (legacy or nft) comes with all its built-in chains.
    builtins = [(c, present.get(c, "ACCEPT"), live.counters.get(c, "[0:0]") if live else "[0:0]")
                for c in BUILTIN_CHAINS.get(name, ()) if live is None or c in present or c in rules]
    return table_text(name, builtins, sorted(chains), rules)


def after_commit(snapshot: str, changes: Sequence[TableChange], tables: Sequence[str]) -> str:
    """`tables` of the family as iptables-save text, once `changes` are committed on top of `snapshot`."""
    live = parse_save(snapshot)
    by_table = {change.table: change for change in changes}
    return "".join(_table(name, live.get(name), by_table.get(name)) for name in tables)
