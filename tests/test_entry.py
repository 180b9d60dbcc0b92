"""The click-free entry (entry.py) and the click CLI (cli.py) agree on every command line.

entry.py parses Istio's plain flag list itself so a pod start does not pay for
click; anything else it hands to click. Here both run every case of the
golden table, bad values, and the forms entry.py must hand over, and must
print the same bytes to stdout and stderr and exit with the same code.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from typing import Callable
from unittest import mock

import pytest

from cases import CASES, SEED_ARGS
from clirun import clean_environ, invoke
from istio_init import cli, entry

# Command lines entry.py parses itself (all dry runs, no privileges needed).
OWN = [[*case.args, "-n", "--ipv6", "true" if case.ipv6 else "false"] for case in CASES] + [
    [*SEED_ARGS, "--dry-run", "--ipv6=false"],
    ["-n", "-p", "15001", "-p", "16001"],  # the last one wins, as in click
    ["-n", "-x", ""],
    [*SEED_ARGS, "--dry-run=true", "--redirect-dns=false", "--ipv6=false"],  # Istio's `=VALUE` switches
    [],  # no flags at all: a real run would apply, so only parse_run is checked for it
]
# Mistakes entry.py parses and config.py refuses: one line naming the flag, exit 2.
BAD = [["-n", "-p", "abc"], ["-n", "-x", "*"], ["-n", "-m", "NOPE"], ["-n", "--ipv6", "maybe"],
       ["-n", "-i", "10.0.0.0/33"], ["-n", "-u", "x;y"]]
# Forms entry.py must leave to click.
HANDED_OVER = [["--help"], ["-h"], ["run", "-n"], ["clean", "-n"], ["-n", "--nope"], ["-n", "-p"],
               ["-n", "-p15001"], ["-n", "--", "-p", "1"], ["-n", "-x", "-1"],
               ["-n", "extra"], ["-nx", "1"], ["--cleanup-only", "-n"], ["trace", "--help"]]


def _run(main: Callable[[list[str]], None], argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, clean_environ(), clear=True), redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv", OWN[:-1] + BAD, ids=lambda a: " ".join(a)[:60] or "(none)")
def test_entry_and_click_agree(argv: list[str]) -> None:
    assert entry.parse_run(list(argv)) is not None  # entry.py really parsed it itself
    assert _run(entry.main, argv) == _run(cli.main, argv)


@pytest.mark.parametrize("argv", BAD, ids=lambda a: " ".join(a))
def test_mistakes_are_one_line_and_exit_2(argv: list[str]) -> None:
    code, out, err = _run(entry.main, argv)
    assert (code, out, err.count("\n")) == (2, "", 1) and "invalid value for" in err


@pytest.mark.parametrize("argv", HANDED_OVER, ids=lambda a: " ".join(a))
def test_other_forms_go_to_click(argv: list[str]) -> None:
    assert entry.parse_run(list(argv)) is None
    assert _run(entry.main, argv) == _run(cli.main, argv)


def test_parse_run_gives_what_click_gives_the_run_command() -> None:
    """The dests and raw values click hands run_command, for every flag of config.FLAGS."""
    seen: dict[str, object] = {}

    def capture(config_given):  # type: ignore[no-untyped-def]
        seen.update({k: v for k, v in config_given.items() if v is not None and v is not False})
        raise SystemExit(0)

    from istio_init.config import FLAGS

    argv = []
    for spec in FLAGS:
        if spec.env_only:  # a variable with no flag
            continue
        argv += [f"--{spec.long}"] if spec.is_switch else [f"-{spec.short}" if spec.short else f"--{spec.long}", "v1"]
    with mock.patch.object(cli, "load_config", capture):
        _run(cli.main, argv)
    assert seen and entry.parse_run(argv) == seen
    assert entry.parse_run([]) == {} and entry.parse_run(["istio-iptables"]) == {}


def test_console_script_and_module_use_the_entry() -> None:
    """`python -m istio_init` goes through entry.py and a dry run never imports click."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "istio_init", *SEED_ARGS, "-n",
                           "--ipv6", "false"], capture_output=True, text=True, env=clean_environ(), timeout=60)
    assert done.returncode == 0, done.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "istio_init.entry" in imported and "click" not in imported


@pytest.mark.parametrize("argv", [OWN[0], BAD[0], HANDED_OVER[0], HANDED_OVER[4], ["-n", "-x", "10.0.0.1/32," * 3000]],
                         ids=["dry-run", "bad-value", "help", "unknown-flag", "long-output"])
def test_the_console_script_exits_as_main_does_with_everything_flushed(argv: list[str]) -> None:
    """`console` ends the process with os._exit after flushing: the same bytes and exit code as
    `main` in-process, whether entry.py or click handled the command line, long output included."""
    expected = _run(entry.main, argv)
    done = subprocess.run([sys.executable, "-m", "istio_init", *argv], capture_output=True, text=True,
                          env=clean_environ(), timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == expected
    assert expected[0] in (0, 2)


def test_the_console_script_is_console() -> None:
    """The installed `istio-init` script and `python -m istio_init` both go through entry.console."""
    import configparser
    from pathlib import Path

    root = Path(__file__).parent.parent
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    assert "bin/istio-init" in setup["options"]["scripts"].split()
    script = (root / "bin" / "istio-init").read_text()
    assert "from istio_init.entry import console\n\nconsole()" in script
    main_py = (Path(entry.__file__).parent / "__main__.py").read_text()
    assert "console()" in main_py


def test_a_run_in_process_leaves_the_cycle_collector_on() -> None:
    """main turns the cycle collector off for the run only: a caller in the same interpreter gets it back."""
    import gc

    assert gc.isenabled()
    assert _run(entry.main, OWN[0])[0] == 0
    assert _run(entry.main, BAD[0])[0] == 2
    assert gc.isenabled()


def test_the_console_script_skips_the_interpreter_teardown() -> None:
    """What `console` is for: once the run returned, the process ends without the interpreter's
    exit work (an atexit handler stands for it here), and the run's output is all there."""
    code = ("import atexit, sys; atexit.register(lambda: print('teardown ran', file=sys.stderr)); "
            "sys.argv[0] = 'istio-init'; from istio_init.entry import console; console()")
    done = subprocess.run([sys.executable, "-c", code, *OWN[0]], capture_output=True, text=True,
                          env=clean_environ(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "teardown ran" not in done.stderr
    assert done.stdout == _run(entry.main, OWN[0])[1]


# `check` forms entry.py runs itself (an exec probe starts every few seconds), and ones it leaves to click.
CHECK_OWN = [["check", *SEED_ARGS[1:]], ["check", *SEED_ARGS[1:], "--json"], ["check", "--json", "-p", "15099"],
             ["check", *SEED_ARGS[1:], "--log_output_level=default:warn"]]
CHECK_HANDED_OVER = [["check", "--help"], ["check", "-p15001"], ["check", "--table", "nat"], ["-p", "1", "check"]]


def test_parse_check_takes_only_the_plain_form() -> None:
    assert entry.parse_check(["check", "-p", "15001", "--json"]) == ({"envoy_port": "15001"}, True)
    assert entry.parse_check(["check", "-p", "15001"]) == ({"envoy_port": "15001"}, False)
    for argv in CHECK_HANDED_OVER:
        assert entry.parse_check(argv) is None, argv


@pytest.mark.root
@pytest.mark.parametrize("argv", [*CHECK_OWN, *CHECK_HANDED_OVER[:2]], ids=lambda a: " ".join(a)[:40])
def test_check_prints_and_exits_as_the_click_command_does(netns, argv: list[str], tmp_path) -> None:
    """In sync (exit 0), drifted (exit 1), JSON or text: the same bytes and code from both front doors."""
    env = clean_environ({"ISTIO_INIT_LOCKFILE": str(tmp_path / "istio-init.lock")})
    netns.run(sys.executable, "-m", "istio_init", *SEED_ARGS[1:], "--ipv6", "false", env=env)
    ours = netns.run(sys.executable, "-X", "importtime", "-m", "istio_init", *argv, env=env, check=False)
    theirs = netns.run(sys.executable, "-c", "import sys; from istio_init import cli; cli.main(sys.argv[1:])", *argv,
                       env=env, check=False)
    imported = {line.rsplit("|", 1)[1].strip() for line in ours.stderr.splitlines() if line.startswith("import time:")}
    stderr = "".join(line + "\n" for line in ours.stderr.splitlines() if not line.startswith("import time:"))
    assert (ours.returncode, ours.stdout, stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)
    assert ("click" in imported) == (argv in CHECK_HANDED_OVER)
    if argv in CHECK_OWN:
        assert ours.returncode == (1 if "15099" in argv else 0), ours.stdout + stderr


# ---- `--switch=true|false`, as Istio's boolean flags (one grammar: config.take_switch_values) ----

SWITCH_FORMS = [("--redirect-dns=true", True), ("--redirect-dns=True", True), ("--redirect-dns=1", True),
                ("--redirect-dns=t", True), ("--redirect-dns=false", False), ("--redirect-dns=FALSE", False),
                ("--redirect-dns=0", False), ("--redirect-dns=f", False)]


@pytest.mark.parametrize("word,on", SWITCH_FORMS)
def test_switch_value_forms_work_in_both_front_doors(word: str, on: bool) -> None:
    from istio_init import entry

    argv = ["-i", "*", word, "-n", "--ipv6", "false"]
    given = entry.parse_run(argv)
    assert given is not None and given["redirect_dns"] == ("true" if on else "false")
    for env in ({}, {"REDIRECT_DNS": "true"}):  # a given false beats the variable, as in Istio
        click_door = invoke(argv, env)
        assert click_door.code == 0, click_door.stderr
        assert ("15053" in click_door.stdout) == on


def test_every_switch_row_takes_true_and_false() -> None:
    from istio_init.config import FLAGS, take_switch_values

    switches = [spec for spec in FLAGS if spec.is_switch and not spec.env_only]
    assert len(switches) >= 15
    for spec in switches:
        for value, want in (("true", "true"), ("False", "false")):
            assert take_switch_values([f"--{spec.long}={value}"]) == ([], {spec.dest: want})


def test_a_bad_switch_value_names_the_flag() -> None:
    result = invoke(["--redirect-dns=yes", "-n"])
    assert result.code == 2
    assert result.stderr.splitlines() == ["istio-init: invalid value for --redirect-dns: 'yes': must be true or false"]


def test_click_only_switches_take_values_too() -> None:
    on = invoke(["trace", "-i", "*", "--ipv6", "false", "--direction", "out", "--dst", "198.51.100.1", "--dport", "80",
                 "--json=true"])
    assert on.code == 0 and on.stdout.lstrip().startswith("{")
    off = invoke(["trace", "-i", "*", "--ipv6", "false", "--direction", "out", "--dst", "198.51.100.1", "--dport", "80",
                  "--json=false"])
    assert off.code == 0 and not off.stdout.lstrip().startswith("{")
