"""Real connections through istio-init's rules: each capture path, proven on the wire.

One table of paths drives three checks, so they cannot drift apart:

1. the connection, made with real sockets in a pod namespace, is answered by
   the expected listener (the stand-in proxy on a capture port, reporting the
   original destination, or the application/peer when not captured);
2. `istio-init trace` predicts the same outcome, both from the plan for the
   same flags and from the rules read live from the pod (`--live`);
3. breaking the rule that decides the path (deleting it, or moving it to the
   end of its chain) changes the outcome to the one the path names, and
   `trace --live` follows the change. This is what makes each test worth
   having: it fails when its rule is missing or in the wrong place.

Two pods are shared by the module (one per flag set) to keep the suite fast.
"""

from __future__ import annotations

import shlex
import subprocess
from typing import Iterator

import pytest

from podnet import Pod
from trafficpaths import (CONFIGS, PATHS, Path, assert_lands, assert_trace_agrees, connect, outcome, trace_live,
                          trace_plan)

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def pods() -> Iterator[dict[str, Pod]]:
    """One pod per flag set, shared by the module; torn down (namespaces, processes) at the end."""
    made: dict[str, Pod] = {}
    try:
        for name, (args, ipv6) in CONFIGS.items():
            made[name] = Pod.up(args, ipv6=ipv6, tag=name)
        yield made
    finally:
        for pod in made.values():
            pod.down()


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_path(pods: dict[str, Pod], path: Path) -> None:
    pod = pods[path.config]
    answer = connect(pod, path)
    assert_lands(path, answer)
    assert_trace_agrees(trace_plan(path), answer)
    assert_trace_agrees(trace_live(pod, path), answer)


def _restore(pod: Pod, family: int, saved: str) -> None:
    tool = "iptables-legacy-restore" if family == 4 else "ip6tables-legacy-restore"
    subprocess.run(["nsenter", f"--net=/run/netns/{pod.name}", tool], input=saved, text=True, check=True,
                   capture_output=True, timeout=30)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_path_breaks_without_its_rule(pods: dict[str, Pod], path: Path) -> None:
    """Deleting (or moving) the deciding rule changes the outcome, and trace --live sees it."""
    pod = pods[path.config]
    breakage = path.breakage
    saved = pod.save(breakage.family)
    try:
        for rule in breakage.rules:
            table, chain, spec = rule.split(" ", 2)
            assert f"-A {chain} {spec}\n" in saved, f"rule not installed: {rule}"
            pod.iptables("-t", table, "-D", chain, *shlex.split(spec), family=breakage.family)
            if breakage.move_to_end:
                pod.iptables("-t", table, "-A", chain, *shlex.split(spec), family=breakage.family)
        answer = connect(pod, path)
        assert outcome(answer) == path.broken, answer
        assert_trace_agrees(trace_live(pod, path), answer)
    finally:
        _restore(pod, breakage.family, saved)
