"""The console script's entry point: Istio's plain flag list runs without importing click.

Every pod start runs `istio-init istio-iptables -p 15001 ... -d 15090,...`, the
default `run` command with flags from config.FLAGS. Importing click, building
the CLI's commands from it and letting it parse those flags took about 20 ms
of a 50 ms start (docs/perf.md), more than everything else istio-init does
on a dry run. This module reads exactly that form itself, from the same flag
table: `-f VALUE`, `--flag VALUE`, `--flag=VALUE` and switches. Anything else
(help, subcommands, `--cleanup-only`, attached or stacked short flags, `--`, a
value starting with `-`, an unknown or incomplete flag) goes to the click CLI
(cli.py), which then does exactly what it always did, its errors included.
Like cli.py it prints (tests/test_layout.py allows the two): it is the CLI's
click-free front door. tests/test_entry.py checks that both give the same
output, errors and exit codes.
"""

from __future__ import annotations

import os
import sys

from istio_init import timing
from istio_init.config import FLAGS
from istio_init.errors import IstioInitError

PROG = "istio-init"
ISTIO_BINARY_NAME = "istio-iptables"
DEBUG_ENV = "ISTIO_INIT_DEBUG"


def parse_run(argv: list[str]) -> dict[str, str | bool] | None:
    """The flags of a plain `run` command line as cli.py's run command receives them, or None.

    None means "not this simple form": the click CLI must parse it.
    """
    args = argv[1:] if argv[:1] == [ISTIO_BINARY_NAME] else argv
    short = {f"-{spec.short}": spec for spec in FLAGS if spec.short}
    long = {f"--{spec.long}": spec for spec in FLAGS}
    given: dict[str, str | bool] = {}
    i = 0
    while i < len(args):
        word, value = args[i], None
        if word.startswith("--") and "=" in word:
            word, value = word.split("=", 1)
        spec = short.get(word) if len(word) == 2 else long.get(word)
        if spec is None:
            return None
        if spec.is_switch:
            if value is not None:
                return None
            given[spec.dest] = True
            i += 1
            continue
        if value is None:
            if i + 1 >= len(args) or args[i + 1].startswith("-"):
                return None
            value = args[i + 1]
            i += 1
        given[spec.dest] = value
        i += 1
    return given


def log(message: str) -> None:
    """One line on stderr, as cli.log writes it."""
    print(f"{PROG}: {message}" if not message.startswith(f"{PROG} ") else message, file=sys.stderr, flush=True)


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> None:
    """`istio-init ARGS`: the plain run form here, everything else through cli.main."""
    args = sys.argv[1:] if argv is None else list(argv)
    given = parse_run(args)
    if given is None:
        from istio_init import cli

        cli.main(args)
        return
    timing.mark("imports: config (no click)")
    try:
        from istio_init import runner
        from istio_init.config import from_sources

        timing.mark("parse the command line")
        config = from_sources(given)
        timing.mark("config: validate flags and environment")
        out = runner.run(config, log)
        if out:
            sys.stdout.write(out)
            sys.stdout.flush()
    except KeyboardInterrupt:  # as click reports it: an empty line, then "aborted"
        print(file=sys.stderr)
        print(f"{PROG}: aborted", file=sys.stderr)
        sys.exit(1)
    except IstioInitError as exc:
        print(f"{PROG}: {_one_line(str(exc))}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Exception as exc:  # as cli.main: a bug or an unforeseen kernel refusal stays one line
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{PROG}: unexpected error: {type(exc).__name__}: {_one_line(str(exc))} "
              f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
    finally:
        if timing.ENABLED:
            for line in timing.report():
                log(line)
    sys.exit(0)
