"""The iptables save/restore binaries of one flavour (legacy or nft), run as subprocesses."""

from __future__ import annotations

import subprocess
from typing import Callable, NamedTuple

from istio_init.errors import ApplyError

WAIT_SECONDS = 30  # how long to wait for the xtables lock, as `iptables -w 30`


class Tools(NamedTuple):
    """The save/restore binaries of one iptables flavour."""

    flavour: str  # "legacy" or "nft"

    def save(self, family: int) -> str:
        return f"{'ip6' if family == 6 else 'ip'}tables-{self.flavour}-save"

    def restore(self, family: int) -> str:
        return f"{'ip6' if family == 6 else 'ip'}tables-{self.flavour}-restore"


def run_tool(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=WAIT_SECONDS + 30)
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
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
