"""The `iptables-restore` backend, with the legacy or the nft binaries.

One `iptables-restore --noflush` call per family, fed the reconcile decision
as text on stdin: each table is one `*table ... COMMIT` block, so each table
changes in one transaction and rules outside ours are never rewritten. This
is the backend for nodes whose iptables is nftables-based, and a fallback when
python-iptables is unavailable.
"""

from __future__ import annotations

import re
from typing import Mapping

from istio_init.backends.base import WAIT_SECONDS, CommitHook, SaveToolsMixin, Tools, run_tool
from istio_init.errors import ApplyError
from istio_init.reconcile import TableChange, restore_text

_FAILED_LINE = re.compile(r"line (\d+) failed")


def describe_line(text: str, number: int) -> str:
    """'table nat, chain X, rule `-A X ...`' for line `number` (1-based) of restore text."""
    lines = text.splitlines()
    if not 1 <= number <= len(lines):
        return f"line {number}"
    table = next((ln[1:] for ln in reversed(lines[:number]) if ln.startswith("*")), "?")
    line = lines[number - 1]
    words = line.split()
    chain = words[1] if len(words) > 1 and line.startswith("-") else line.lstrip(":").split()[0]
    return f"table {table}, chain {chain}, rule `{line}`"


class RestoreBackend(SaveToolsMixin):
    """Applies through `ip(6)tables-{legacy,nft}-restore --noflush`."""

    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self.name = tools.flavour

    def apply(self, changes: Mapping[int, list[TableChange]], after_commit: CommitHook) -> None:
        for family, family_changes in changes.items():
            text = restore_text(family_changes)
            if not text:
                continue
            argv = [self.tools.restore(family), "--noflush", f"--wait={WAIT_SECONDS}"]
            done = run_tool(argv, text)
            if done.returncode != 0:
                error = done.stderr.strip()
                found = _FAILED_LINE.search(error)
                where = describe_line(text, int(found.group(1))) if found else "tables " + ", ".join(
                    c.table for c in family_changes)
                raise ApplyError(f"{argv[0]}: {where} failed: {error.splitlines()[-1] if error else done.returncode}")
            for change in family_changes:
                after_commit(family, change.table)
