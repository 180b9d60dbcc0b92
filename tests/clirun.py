"""Running the istio-init CLI in-process, as a test sees it."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from unittest import mock

from istio_init.cli import main

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
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ISTIO_ENV_PREFIXES)}
    env.update(extra or {})
    return env


def invoke(argv: list[str], env: dict[str, str] | None = None) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, clean_environ(env), clear=True), redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return Result(code, out.getvalue(), err.getvalue())
