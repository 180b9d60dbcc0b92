"""The seam between deciding and executing: one small class per way of reaching the kernel.

apply.py reads the live state through a backend, lets reconcile.py decide,
hands the per-table changes back to the same backend and, if anything fails,
asks it to put the saved state back. Nothing else knows whether python-iptables,
`iptables-legacy-restore` or `iptables-nft-restore` did the work, and the
recording stub lets the orchestration be tested without root.
"""

from __future__ import annotations

import contextlib
import subprocess
from typing import Callable, ContextManager, Iterator, Mapping, NamedTuple, Protocol

from istio_init.errors import ApplyError
from istio_init.reconcile import TableChange

# Called after each table commit with (family, table); raising aborts the apply.
CommitHook = Callable[[int, str], None]
WAIT_SECONDS = 30  # how long to wait for the xtables lock, as `iptables -w 30`


class Tools(NamedTuple):
    """The save/restore binaries of one iptables flavour."""

    flavour: str  # "legacy" or "nft"

    def save(self, family: int) -> str:
        return f"{'ip6' if family == 6 else 'ip'}tables-{self.flavour}-save"

    def restore(self, family: int) -> str:
        return f"{'ip6' if family == 6 else 'ip'}tables-{self.flavour}-restore"


# The tools' text is bytes: a rule someone else made (or an old python-iptables
# cut) can hold an interface name that is not UTF-8. Carried as lone surrogates,
# such a rule is read, compared and written back byte for byte instead of
# failing every later run with UnicodeDecodeError.
TOOL_TEXT_ERRORS = "surrogateescape"


def run_tool(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, errors=TOOL_TEXT_ERRORS,
                              timeout=WAIT_SECONDS + 30)
    except FileNotFoundError:
        raise ApplyError(f"{argv[0]} not found; install iptables or choose another --iptables-backend") from None
    except subprocess.TimeoutExpired:
        raise ApplyError(f"{argv[0]} did not finish in {WAIT_SECONDS + 30}s") from None


def save_text(tools: Tools, family: int, counters: bool = True,
              meanwhile: Callable[[], object] | None = None) -> str:
    """Every table of the family as `iptables-save` text (the legacy tools show loaded tables).

    `meanwhile` runs while the tool works: the libiptc backend imports
    python-iptables then, so the two costs of every pod start overlap.
    """
    argv = [tools.save(family)] + (["-c"] if counters else [])
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                errors=TOOL_TEXT_ERRORS)
    except FileNotFoundError:
        raise ApplyError(f"{argv[0]} not found; install iptables or choose another --iptables-backend") from None
    try:
        if meanwhile is not None:
            meanwhile()
        out, err = proc.communicate(timeout=WAIT_SECONDS + 30)
    except subprocess.TimeoutExpired:
        raise ApplyError(f"{argv[0]} did not finish in {WAIT_SECONDS + 30}s") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise ApplyError(f"{argv[0]} failed: {err.strip() or proc.returncode}")
    return out


def restore_saved(tools: Tools, family: int, saved_blocks: str) -> None:
    """Replace the tables named in `saved_blocks` (save -c text) with exactly that content."""
    if not saved_blocks:
        return
    argv = [tools.restore(family), "-c", f"--wait={WAIT_SECONDS}"]
    done = run_tool(argv, saved_blocks)
    if done.returncode != 0:
        raise ApplyError(f"rollback with {argv[0]} failed: {done.stderr.strip()}")


class Backend(Protocol):
    """What apply.py needs from a way of changing iptables."""

    name: str
    tools: Tools  # the save/restore tools that see the same tables (for reading and rollback)

    def session(self) -> ContextManager[None]:
        """Held around read + apply (libiptc: the xtables lock)."""

    def read(self, family: int) -> str:
        """The family's live tables as `iptables-save -c` text."""

    def apply(self, changes: Mapping[int, list[TableChange]], after_commit: CommitHook) -> None:
        """Commit each family's changes, one transaction per table; ApplyError on failure."""

    def restore(self, family: int, saved_blocks: str) -> None:
        """Put tables back to a snapshot (save -c text holding only those tables)."""


class SaveToolsMixin:
    """read() and restore() through the save/restore binaries of `self.tools`."""

    tools: Tools

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        yield

    def read(self, family: int) -> str:
        return save_text(self.tools, family)

    def restore(self, family: int, saved_blocks: str) -> None:
        restore_saved(self.tools, family, saved_blocks)


def get(name: str) -> Backend:
    """The backend for a resolved --iptables-backend value (libiptc, legacy or nft)."""
    if name == "libiptc":
        from istio_init.backends.libiptc import LibiptcBackend

        return LibiptcBackend()
    from istio_init.backends.restore import RestoreBackend

    return RestoreBackend(Tools(name))
