"""Per-phase wall times of one run, for `ISTIO_INIT_TIMING=1` (docs/performance.md reads them).

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
_marks: list[tuple[str, float, int]] = []


def _page_faults() -> int:
    """Minor page faults so far: first touches of new memory, about 4 us each on a VM, show up here."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


_START_FAULTS = _page_faults() if ENABLED else 0


def mark(phase: str) -> None:
    """End the phase called `phase` now (it began at the previous mark, or when this module loaded)."""
    if ENABLED:
        _marks.append((phase, time.perf_counter(), _page_faults()))


def report() -> list[str]:
    """One line per phase, `phase: N.N ms (F page faults)`, and the total since this module was imported."""
    lines = []
    last, last_faults = _START, _START_FAULTS
    for phase, at, faults in _marks:
        lines.append(f"timing: {phase}: {(at - last) * 1000:.1f} ms ({faults - last_faults} page faults)")
        last, last_faults = at, faults
    lines.append(f"timing: total since start-up imports: {(last - _START) * 1000:.1f} ms "
                 f"({last_faults - _START_FAULTS} page faults)")
    _marks.clear()
    return lines
