"""What both front doors share: what they write, the Config they load, and how a failure becomes one line.

istio-init has two entry points into one CLI: `entry.py`, which runs Istio's
plain flag list without importing click (every pod start), and `cli.py`, the
click commands (everything else). Both must write the same things the same
way, so stdout (the rules' text), the log lines on stderr (through logs.py's
levels and JSON form), loading the Config with its warnings, and the mapping
from an exception to its one line and exit code live here, once. Together with logs.py these three modules are the
only ones that write (tests/test_layout.py).
"""

from __future__ import annotations

import os
import sys
from istio_init import logs
from istio_init.config import Config, from_sources, ignored_environment, unwritten_flags
from istio_init.errors import IstioInitError
from istio_init.records import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Callable, Mapping

PROG = "istio-init"
DEBUG_ENV = "ISTIO_INIT_DEBUG"


def log(message: str, level: str = "info") -> None:
    """One progress or diagnostic line on stderr at `level` (logs.py filters and formats it)."""
    first, *rest = message.splitlines() or [""]
    # One record per line, as a pod's log (and --log_as_json) wants, written at once (the summary's 30 lines).
    logs.emit_lines(level, [f"{PROG}: {first}" if not first.startswith(f"{PROG} ") else first, *rest])


def out(text: str) -> None:
    """The command's result on stdout (rules, a trace, a graph), flushed."""
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def prepare_stdout() -> None:
    """Rules read back from the namespace may hold bytes that are not UTF-8
    (backends/iptables/spawn.py); they are printed as the bytes they are, whatever the locale."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


def load_config(given: Mapping[str, str | bool | None]) -> Config:
    """Config from the parsed flags (None: not given) and the environment.

    Variables only the other rule set reads are named on stderr, one line each.
    """
    config = from_sources(given)
    for warning in ignored_environment(config):
        logs.emit("warn", f"{PROG}: {warning}")
    for warning in unwritten_flags(logs.ACTIVE.given, config.rules_version):
        logs.emit("warn", f"{PROG}: {warning}")
    return config


def one_line(message: str) -> str:
    """Tool output quoted in an error can span lines; a pod's log gets one."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def guarded(command: Callable[[], None]) -> int:
    """Run `command`; every failure istio-init can meet becomes one stderr line and its exit code."""
    try:
        command()
    except KeyboardInterrupt:
        logs.emit("error", f"{PROG}: aborted")
        return 1
    except IstioInitError as exc:
        logs.emit("error", f"{PROG}: {one_line(str(exc))}")
        return exc.exit_code
    except Exception as exc:  # a bug or an unforeseen kernel refusal: still one line in the pod's log
        if os.environ.get(DEBUG_ENV):
            raise
        logs.emit("error", f"{PROG}: unexpected error: {type(exc).__name__}: {one_line(str(exc))} "
                           f"(set {DEBUG_ENV}=1 for the traceback)")
        return 1
    return 0
