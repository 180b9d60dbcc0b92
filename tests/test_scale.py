"""Cost that grows linearly with the rules, and the largest -x list one argument can carry.

Linux caps one argument (and one NAME=value variable) at 128 KiB (MAX_ARG_STRLEN,
131,072 bytes with its NUL), so an -x list of 10.x.y.z/32 host CIDRs holds at
most about 9,000 of them. What istio-init does per rule (parse, plan, render,
reconcile, restore text, printed tables) must stay linear up to there: the
timing test compares 2,000 and 8,000 CIDRs (4x the rules: linear is 4x the
time, quadratic 16x) with a margin for a shared machine.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cases import SEED_ARGS
from clirun import clean_environ

MAX_ARG = 131072  # bytes, the terminating NUL included


def host_cidrs(count: int) -> str:
    return ",".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32" for i in range(1, count + 1))


def largest_list() -> str:
    cidrs = host_cidrs(10000).split(",")
    while len(",".join(cidrs)) > MAX_ARG - 1:
        cidrs.pop()
    return ",".join(cidrs)


def test_the_largest_x_list_one_argument_holds_is_planned_in_full() -> None:
    cidrs = largest_list()
    count = cidrs.count(",") + 1
    assert 9000 < count < 9300  # about 9,170 10.x.y.z/32 CIDRs
    done = subprocess.run([sys.executable, "-m", "istio_init", *SEED_ARGS, "-x", cidrs, "-n", "--ipv6", "false"],
                          capture_output=True, text=True, env=clean_environ(), timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.count(" -d 10.") == count
    with pytest.raises(OSError, match="Argument list too long"):
        subprocess.run([sys.executable, "-c", "pass", cidrs + ",10.255.255.255/32"], timeout=60)


def _pipeline_seconds(count: int) -> float:
    """Best of 5 (garbage collection off while timed): config, plan, dry-run text, reconcile, restore text and printed tables for `count` CIDRs."""
    from istio_init.backends.iptables.committed import after_commit
    from istio_init.backends.iptables.reconcile import reconcile, restore_text
    from istio_init.config import from_sources
    from istio_init.iptables_save.write import render_plan
    from istio_init.rulesets import plan

    given = {"proxy_uid": "1337", "inbound_ports": "*", "service_cidr": "*", "service_exclude_cidr": host_cidrs(count)}
    best = float("inf")
    for _ in range(5):
        gc.collect()
        gc.disable()  # a collection landing in one run only would be noise, not per-rule cost
        try:
            start = time.perf_counter()
            family = plan(from_sources(given, {}), False).ipv4
            render_plan(plan(from_sources(given, {}), False))
            changes = reconcile({}, family)
            restore_text(changes)
            after_commit("", changes, ["nat"])
            best = min(best, time.perf_counter() - start)
        finally:
            gc.enable()
    return best


def _fresh_process_seconds(count: int) -> float:
    """_pipeline_seconds in a new interpreter, as a pod start runs it: the test process's own heap
    (everything earlier tests left) makes per-object work slower the more objects a step makes."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_scale; " \
           f"print(test_scale._pipeline_seconds({count}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_environ(),
                          timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    return float(done.stdout)


def test_per_rule_work_grows_linearly() -> None:
    small, large = _fresh_process_seconds(2000), _fresh_process_seconds(8000)
    assert large / small < 7, f"2,000 CIDRs {small * 1000:.1f} ms, 8,000 CIDRs {large * 1000:.1f} ms"
