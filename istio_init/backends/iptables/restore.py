"""The `iptables-restore` backend's commit, with the legacy or the nft binaries.

One `iptables-restore --noflush` call per family, fed the reconcile decision
as text on stdin: each table is one `*table ... COMMIT` block, so each table
changes in one transaction and rules outside ours are never rewritten. This
is the backend for nodes whose iptables is nftables-based, and a fallback when
python-iptables is unavailable.
"""

from __future__ import annotations

from istio_init.records import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Mapping, Sequence

    from istio_init.backends.iptables.reconcile import TableChange
    from istio_init.backends.iptables.spawn import Running

from istio_init.backends.iptables.spawn import ToolTimeout
from istio_init.backends.iptables.tools import WAIT_SECONDS, ToolTables, run_tool, start_tool
from istio_init.errors import ApplyError

# The tool's error text is read with these only when it failed: `re` is no import of every start.
_FAILED_LINE = r"(?:line:? (\d+) failed|Error occurred at line: (\d+))"
_QUOTED = r"[`'](\S+?)'"


def describe_line(text: str, number: int, error: str = "") -> str:
    """'table nat, chain X, rule `-A X ...`' for line `number` (1-based) of restore text.

    iptables-nft-restore reports some refusals at the COMMIT line; then the
    rule is found by the name the error quotes (a missing chain or target).
    """
    lines = text.splitlines()
    if not 1 <= number <= len(lines):
        return f"line {number}"
    start = max(i for i in range(number) if lines[i].startswith("*"))
    table = lines[start][1:]
    line = lines[number - 1]
    if line == "COMMIT":
        import re

        named = re.findall(_QUOTED, error)
        line = next((ln for ln in lines[start:number] for name in named if f" {name}" in f" {ln} " and
                     ln.startswith("-")), line)
    words = line.split()
    if line.startswith("-") and len(words) > 1:
        return f"table {table}, chain {words[1]}, rule `{line}`"
    return f"table {table}, `{line}`"


def _reason(error: str) -> str:
    """The tool's first line without its `iptables-restore v1.8.9 (legacy): ` prefix."""
    first = error.strip().splitlines()[0] if error.strip() else "failed"
    import re

    return re.sub(r"^\S*tables\S*restore v[\d.]+ \(\w+\): ", "", first)


class RestoreTables(ToolTables):
    """A flavour's tables, changed through `ip(6)tables-{legacy,nft}-restore --noflush`."""

    def __init__(self, flavour: str) -> None:
        super().__init__(flavour, flavour)
        self.started: dict[int, Running] = {}

    def _argv(self, family: int) -> list[str]:
        return [self.tools.restore(family), "--noflush", f"--wait={WAIT_SECONDS}"]

    def start(self, families: Sequence[int]) -> None:
        """Start each family's restore tool now, its input to come with the commit.

        Starting one (exec, its libraries) costs about as much as what a
        seed apply's commit then asks of it; started before the lock is taken
        and the change decided, that part of every pod start overlaps them.
        A tool fed nothing exits without touching a table (stop).
        """
        for family in families:
            if family not in self.started:
                self.started[family] = start_tool(self._argv(family))

    def stop(self) -> None:
        """Let every started tool not used by a commit end: it reads end of file and exits, and is reaped."""
        started, self.started = self.started, {}
        for running in started.values():
            try:
                running.wait(WAIT_SECONDS)
            except ToolTimeout:
                pass

    def commit(self, changes: Mapping[int, list[TableChange]]) -> None:
        """One restore call per family."""
        for family, family_changes in changes.items():
            self.commit_family(family, family_changes)

    def commit_family(self, family: int, changes: list[TableChange]) -> None:
        from istio_init.backends.iptables.reconcile import restore_text  # not for a check, which only reads

        text = restore_text(changes)
        if not text:
            return
        argv = self._argv(family)
        done = run_tool(argv, text, self.started.pop(family, None))
        if done.returncode != 0:
            import re

            found = re.search(_FAILED_LINE, done.stderr)
            where = (describe_line(text, int(found.group(1) or found.group(2)), done.stderr) if found
                     else "tables " + ", ".join(c.table for c in changes))
            raise ApplyError(f"{argv[0]}: {where}: {_reason(done.stderr)}")
