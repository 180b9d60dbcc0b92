"""The console script's entry point: Istio's plain flag list runs without importing click.

Every pod start runs `istio-init istio-iptables -p 15001 ... -d 15090,...`, the
default `run` command with flags from config.FLAGS. Importing click, building
the CLI's commands from it and letting it parse those flags costs more than
everything else istio-init does on a dry run (docs/performance.md, "What start-up avoids"). This module reads exactly that form itself, from the same flag
table: `-f VALUE`, `--flag VALUE`, `--flag=VALUE` and switches. Anything else
(help, subcommands, `--cleanup-only`, attached or stacked short flags, `--`, a
value starting with `-`, an unknown or incomplete flag) goes to the click CLI
(cli.py), which then does exactly what it always did, its errors included.
pilot-agent's logging flags are taken out first, as cli.py does. Both front
doors write through frontdoor.py (tests/test_layout.py allows only those), and
tests/test_entry.py checks that both give the same output, errors and exit codes.
"""

from __future__ import annotations

import gc
import os
import sys

from istio_init import frontdoor, logs, timing
from istio_init.config import CLEANUP_ONLY_ENV, ISTIO_BINARY_NAME, option_words, take_switch_values
from istio_init.errors import IstioInitError

CHECK_COMMAND = "check"


def parse_run(argv: list[str]) -> dict[str, str | bool] | None:
    """The flags of a plain `run` command line as cli.py's run command receives them, or None.

    None means "not this simple form": the click CLI must parse it.
    """
    args = argv[1:] if argv[:1] == [ISTIO_BINARY_NAME] else argv
    try:
        args, switch_values = take_switch_values(args)
    except IstioInitError:
        return None  # the click CLI reports it
    words = option_words()  # the rows' grammar, as click's options (cli.py) have it
    given: dict[str, str | bool] = dict(switch_values)
    i = 0
    while i < len(args):
        word, value = args[i], None
        if word.startswith("--") and "=" in word:
            word, value = word.split("=", 1)
        spec = words.get(word)
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


def parse_check(argv: list[str]) -> tuple[dict[str, str | bool], bool] | None:
    """`check` with run's flags in the plain form, and whether `--json` was given; None: click parses it.

    `check` is an exec probe, run every few seconds in every pod that has it,
    so it too starts without click.
    """
    if argv[:1] != [CHECK_COMMAND]:
        return None
    rest = [arg for arg in argv[1:] if arg != "--json"]
    given = parse_run(rest) if rest[:1] != [ISTIO_BINARY_NAME] else None
    return None if given is None else (given, len(rest) < len(argv) - 1)


def main(argv: list[str] | None = None) -> None:
    """`istio-init ARGS`: the plain run and check forms here, everything else through cli.main."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        rest, log_options = logs.split_args(args)  # pilot-agent's logging flags (current Istio always passes one)
    except IstioInitError:
        rest = None  # cli.main reports it, as for any other command line
    plain = rest is not None and os.environ.get(CLEANUP_ONLY_ENV) is None
    given = parse_run(rest) if plain and rest is not None else None
    check = parse_check(rest) if plain and rest is not None and given is None else None
    if given is None and check is None:
        from istio_init import cli

        cli.main(args)
        return
    timing.mark("imports: config (no click)")
    frontdoor.prepare_stdout()
    # One run builds up to 8,000 rules' tuples and creates no reference cycle worth collecting:
    # the cycle collector would only walk them, again and again (docs/performance.md, "What start-up avoids").
    gc.disable()
    flags = given if check is None else check[0]
    exit_code = 0

    def command() -> None:
        from istio_init import runner

        timing.mark("parse the command line")
        config = frontdoor.load_config(flags or {})
        timing.mark("config: validate flags and environment")
        if check is None:
            frontdoor.out(runner.run(config, frontdoor.log))
            return
        nonlocal exit_code
        from istio_init import check as checking  # as cli.py's check command

        timing.mark("imports: check")
        runner.enter_namespace(config)
        report = checking.compare_installed(config, frontdoor.log)
        frontdoor.out((checking.to_json(report) if check[1] else checking.format_text(report)) + "\n")
        timing.mark("the report")
        exit_code = report.exit_code

    try:
        with logs.configured(log_options):
            code = frontdoor.guarded(command) or exit_code
            if timing.ENABLED:
                for line in timing.report():
                    frontdoor.log(line)
    finally:
        gc.enable()  # for a caller in the same interpreter (the tests)
    sys.exit(code)


def console() -> None:
    """The `istio-init` console script and `python -m istio_init`: `main`, then exit at once.

    Once a run has returned, what the interpreter would still do at exit is
    free every object the run made (8,000 rules' worth) and tear its modules
    down: time of every pod start for nothing (docs/performance.md, "What start-up avoids"), as the kernel releases the
    memory, the descriptors and with them the flock()s. So stdout and stderr
    are flushed and the process ends with its exit code. istio-init starts
    no thread and registers no atexit handler. An exception other than
    SystemExit (a bug) still goes the normal way, traceback and all.
    """
    try:
        main()
        code: object = 0
    except SystemExit as done:
        code = done.code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said on it anyway
            pass
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"), as the interpreter prints it
        print(code, file=sys.stderr, flush=True)
        status = 1
    os._exit(status)
