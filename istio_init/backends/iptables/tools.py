"""The iptables save/restore binaries of one flavour (legacy or nft), run as child processes (spawn.py)."""

from __future__ import annotations

from istio_init.backends.iptables.spawn import LATER, Finished, Running, ToolTimeout
from istio_init.errors import ApplyError
from istio_init.records import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from typing import Callable, ContextManager, Mapping

    from istio_init.backends.iptables.reconcile import TableChange

WAIT_SECONDS = 30  # how long to wait for the xtables lock, as `iptables -w 30`


def command(family: int, suffix: str = "") -> str:
    """The iptables command of a family: `iptables`/`ip6tables`, then `suffix` ("-legacy-save", ...)."""
    return f"{'ip6' if family == 6 else 'ip'}tables{suffix}"


class Tools(NamedTuple):
    """The save/restore binaries of one iptables flavour."""

    flavour: str  # "legacy" or "nft"

    def save(self, family: int) -> str:
        return command(family, f"-{self.flavour}-save")

    def restore(self, family: int) -> str:
        return command(family, f"-{self.flavour}-restore")


def _start(argv: list[str], stdin: str | None = None) -> Running:
    try:
        return Running(argv, stdin)
    except FileNotFoundError:
        raise ApplyError(f"{argv[0]} not found; install iptables or choose another --iptables-backend") from None


def _finish(argv: list[str], running: Running) -> Finished:
    try:
        return running.wait(WAIT_SECONDS + 30)
    except ToolTimeout:
        raise ApplyError(f"{argv[0]} did not finish in {WAIT_SECONDS + 30}s") from None


def start_tool(argv: list[str]) -> Running:
    """Start a tool whose input is given later (run_tool's `started`): it loads meanwhile."""
    return _start(argv, LATER)


def run_tool(argv: list[str], stdin: str | None = None, started: Running | None = None) -> Finished:
    """Run a tool to its end.

    `started`: the same tool, started with start_tool, is fed `stdin` instead of starting one now.
    """
    if started is not None:
        running = started
        try:
            running.feed(stdin or "", WAIT_SECONDS + 30)
        except ToolTimeout:
            raise ApplyError(f"{argv[0]} did not read its input in {WAIT_SECONDS + 30}s") from None
    else:
        running = _start(argv, stdin)
    return _finish(argv, running)


def save_text(tools: Tools, family: int, counters: bool = True,
              meanwhile: Callable[[], object] | None = None) -> str:
    """Every table of the family as `iptables-save` text (the legacy tools show loaded tables).

    `meanwhile` runs while the tool works (the tool is killed if it raises):
    the libiptc backend imports python-iptables then, so the two costs of
    every pod start overlap.
    """
    pending = PendingSave(tools, family, counters)
    if meanwhile is not None:
        try:
            meanwhile()
        except BaseException:
            pending.kill()
            raise
    return pending.result()


class PendingSave:
    """A save tool started now and read later: its run overlaps the caller's work (`check` plans meanwhile)."""

    def __init__(self, tools: Tools, family: int, counters: bool = True) -> None:
        self.argv = [tools.save(family)] + (["-c"] if counters else [])
        # A new pod's namespace: the kernel lists no legacy table of the family, so the tool would
        # print nothing, and starting it is one more process of every pod's apply (and check).
        self.running = None if tools.flavour == "legacy" and _no_legacy_tables(family) else _start(self.argv)

    def result(self) -> str:
        """The tool's text (ApplyError when it failed)."""
        if self.running is None:
            return ""
        done, self.running = _finish(self.argv, self.running), None
        if done.returncode != 0:
            raise ApplyError(f"{self.argv[0]} failed: {done.stderr.strip() or done.returncode}")
        return done.stdout

    def kill(self) -> None:
        """End the tool without reading it (the caller failed meanwhile)."""
        running, self.running = self.running, None
        if running is not None:
            try:
                running.wait(0)  # kills and reaps the tool
            except ToolTimeout:
                pass


# Where the kernel lists the legacy (x_tables) tables loaded in this namespace, per family.
LEGACY_TABLE_NAMES = {4: "/proc/net/ip_tables_names", 6: "/proc/net/ip6_tables_names"}


def _no_legacy_tables(family: int) -> bool:
    """Whether the kernel lists no legacy table of `family` in this namespace (False: cannot tell)."""
    try:
        with open(LEGACY_TABLE_NAMES[family], "rb") as names:
            return not names.read().strip()
    except OSError:
        return False


def restore_saved(tools: Tools, family: int, saved_blocks: str) -> None:
    """Replace the tables named in `saved_blocks` (save -c text) with exactly that content."""
    if not saved_blocks:
        return
    argv = [tools.restore(family), "-c", f"--wait={WAIT_SECONDS}"]
    done = run_tool(argv, saved_blocks)
    if done.returncode != 0:
        raise ApplyError(f"rollback with {argv[0]} failed: {done.stderr.strip()}")


class ToolTables:
    """A flavour's tables as its save and restore tools read and put them back (the `Tables` both
    iptables backends share; each adds its own commit)."""

    def __init__(self, name: str, flavour: str) -> None:
        self.name = name
        self.tools = Tools(flavour)

    def session(self) -> ContextManager[None]:
        return _NO_SESSION

    def save(self, family: int, counters: bool = True) -> str:
        return save_text(self.tools, family, counters=counters)

    def snapshot(self, family: int) -> str:
        return self.save(family)

    def start_save(self, family: int, counters: bool = True) -> PendingSave:
        """`save`, started now and read with the result's `result()`."""
        return PendingSave(self.tools, family, counters)

    def restore(self, family: int, saved_blocks: str) -> None:
        restore_saved(self.tools, family, saved_blocks)

    def restore_tool(self, family: int) -> str:
        return self.tools.restore(family)


class _NoSession:
    """Nothing held around read and commit (contextlib.nullcontext without importing contextlib)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SESSION = _NoSession()
