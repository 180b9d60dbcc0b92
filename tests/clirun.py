"""Running the istio-init CLI in-process, as a test sees it: its environment, its parser, its error line."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Sequence
from unittest import mock

from istio_init.cli import cli, main

# Variables istio-init reads; cleared so the developer's shell cannot leak into a test.
_ISTIO_ENV_PREFIXES = ("ISTIO_", "ENVOY_", "PROXY_", "INBOUND_", "KUBE_VIRT", "DRY_RUN", "SKIP_RULE",
                       "RUN_VALIDATION", "IPTABLES_PROBE", "IPTABLES_TRACE", "PROBE_TIMEOUT", "NETWORK_NAMESPACE", "REDIRECT_DNS",
                       "DROP_INVALID", "INVALID_DROP", "DUAL_STACK", "CAPTURE_ALL_DNS", "CNI_MODE", "RECONCILE",
                       "FORCE_APPLY", "FORCE_IPTABLES_BINARY", "CLEANUP_ONLY", "NATIVE_NFTABLES")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def clean_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    # Istio's variables go; the session's lock directory (conftest.py) stays.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_ISTIO_ENV_PREFIXES) or k == "ISTIO_INIT_LOCK_DIR"}
    env.update(extra or {})
    return env


def given(args: Sequence[str]) -> dict[str, str | bool]:
    """Istio's argument list (`istio-iptables` first or not) as the `run` command's own parser reads it:
    the dict config.from_sources takes."""
    ctx = cli.commands["run"].make_context("run", [a for a in args if a != "istio-iptables"])
    return {k: v for k, v in ctx.params.items() if k != "cleanup_only"}


def assert_one_error_line(result: Result, expected: str) -> None:
    """A user mistake: exit 2, nothing on stdout, one `invalid value for` line on stderr holding `expected`."""
    assert result.code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("istio-init: invalid value for ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def invoke(argv: list[str], env: dict[str, str] | None = None) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, clean_environ(env), clear=True), redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return Result(code, out.getvalue(), err.getvalue())
