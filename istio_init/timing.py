"""Per-phase wall times of one run, for `ISTIO_INIT_TIMING=1` (the README's "Start-up time" reads them).

An init container's start-up is spent in a handful of phases (imports, parsing,
planning, reading the tables, committing, printing), and a change that makes
one slower must be visible without a profiler. With the variable unset,
`mark` is one test of a module constant: nothing is recorded or printed. With
it set, each `mark(name)` closes the phase that started at the previous mark,
and the CLI logs the list to stderr when the run ends.
"""

from __future__ import annotations

import os
import time

ENABLED = os.environ.get("ISTIO_INIT_TIMING", "") not in ("", "0")
_START = time.perf_counter()
_marks: list[tuple[str, float]] = []


def mark(phase: str) -> None:
    """End the phase called `phase` now (it began at the previous mark, or when this module loaded)."""
    if ENABLED:
        _marks.append((phase, time.perf_counter()))


def report() -> list[str]:
    """One line per phase, `phase: N.N ms`, and the total since this module was imported."""
    lines = []
    last = _START
    for phase, at in _marks:
        lines.append(f"timing: {phase}: {(at - last) * 1000:.1f} ms")
        last = at
    lines.append(f"timing: total since start-up imports: {(last - _START) * 1000:.1f} ms")
    _marks.clear()
    return lines
