"""Every wire path of test_traffic.py again, with --native-nftables, for both rule sets (root only).

The pods are made by the same harness (tests/podnet.py) with the flags of
test_traffic.py plus `--native-nftables`; for the current rule set also
`--rules-version current --capture-all-dns` (the current rule set captures
DNS to the resolvers of /etc/resolv.conf only, and the paths' DNS server is
the peer). Each path's connection must be answered as test_traffic.py says,
with the original destination intact; then the path's deciding rule is taken
out of the plan (or moved to the end of its chain), that plan is loaded as the
pod's whole ruleset, and the outcome must change as the path names. So each
test fails when its nft rule is missing or misplaced.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Iterator

import pytest

from clirun import clean_environ, given
from istio_init.config import from_sources
from istio_init.model import APPEND, RulePlan, Step
from istio_init.backends.nftables import guard_single_family
from istio_init.iptables_save.write import rule_spec
from istio_init.nft.write import render_transaction
from istio_init.rulesets import plan
from podnet import Pod
from trafficpaths import (CONFIGS, PATHS, Breakage, Path, assert_lands, assert_trace_agrees, connect, outcome,
                          trace_args)

pytestmark = pytest.mark.root

RULE_SETS = {"1.8": ("--native-nftables",),
             "current": ("--native-nftables", "--rules-version", "current", "--capture-all-dns")}
# The current rule set captures DNS in ISTIO_OUTPUT_DNS (REDIRECT), not with 1.8's DNAT/REDIRECT rules.
CURRENT_BREAKAGE = {
    "dns_udp_captured": Breakage(("nat ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053",)),
    "dns_tcp_captured": Breakage(("nat ISTIO_OUTPUT_DNS -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053",)),
}


def pod_args(config: str, rule_set: str) -> tuple[tuple[str, ...], bool]:
    args, ipv6 = CONFIGS[config]
    return (*args, *RULE_SETS[rule_set]), ipv6


def pod_plan(args: tuple[str, ...], ipv6: bool) -> tuple[RulePlan, bool]:
    """The plan the pod got (same flag parsing as the CLI) and whether its nft form is guarded."""
    config = from_sources(given([*args, "--ipv6", "true" if ipv6 else "false"]), clean_environ())
    return plan(config, ipv6), guard_single_family(config.rules_version)


@pytest.fixture(scope="module", params=list(RULE_SETS))
def nft_pods(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, Pod]]]:
    """One pod per flag set and rule set, shared by the module; torn down at the end."""
    rule_set = request.param
    made: dict[str, Pod] = {}
    try:
        for name in CONFIGS:
            args, ipv6 = pod_args(name, rule_set)
            made[name] = Pod.up(args, ipv6=ipv6, tag=f"nft{rule_set.replace('.', '')}-{name}")
        yield rule_set, made
    finally:
        for pod in made.values():
            pod.down()


def load(pod: Pod, text: str) -> None:
    subprocess.run(["nsenter", f"--net=/run/netns/{pod.name}", "nft", "-f", "-"], input=text, text=True,
                   check=True, capture_output=True, timeout=30)


def without(rule_plan: RulePlan, breakage: Breakage) -> RulePlan:
    """`rule_plan` with the breakage's rules deleted (or moved to the end of their chain)."""
    family = rule_plan.ipv4 if breakage.family == 4 else rule_plan.ipv6
    assert family is not None
    steps = list(family.steps)
    for wanted in breakage.rules:
        found = [s for s in steps if f"{s.rule.table} {s.rule.chain} {rule_spec(s.rule)}" == wanted]
        assert found, f"rule not in the plan: {wanted}"
        steps.remove(found[0])
        if breakage.move_to_end:
            steps.append(Step(APPEND, found[0].rule))
    changed = family._replace(steps=tuple(steps))
    return rule_plan._replace(**{"ipv4" if breakage.family == 4 else "ipv6": changed})


def trace_live(pod: Pod, rule_set: str, path: Path) -> dict:
    """`istio-init trace --live --native-nftables` in the pod: the live nft rules, walked."""
    done = subprocess.run([sys.executable, "-m", "istio_init", "trace", "--live", *RULE_SETS[rule_set],
                           "--network-namespace", f"/run/netns/{pod.name}", *trace_args(path)],
                          capture_output=True, text=True, timeout=60, check=False, env=clean_environ())
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["rules"] == "live (nft -j list ruleset)"
    return result


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_path_with_native_nftables(nft_pods: tuple[str, dict[str, Pod]], path: Path) -> None:
    rule_set, pods = nft_pods
    pod = pods[path.config]
    answer = connect(pod, path)
    assert_lands(path, answer)
    # trace.py cannot evaluate -m mark (the current rule set's TPROXY rules), with iptables or nft alike.
    traceable = not (rule_set == "current" and path.config == "tproxy")
    if traceable:
        assert_trace_agrees(trace_live(pod, rule_set, path), answer)

    rule_plan, guard = pod_plan(*pod_args(path.config, rule_set))
    breakage = CURRENT_BREAKAGE.get(path.name, path.breakage) if rule_set == "current" else path.breakage
    try:
        load(pod, render_transaction(without(rule_plan, breakage), guard))
        broken = connect(pod, path)
        assert outcome(broken) == path.broken, broken
        if traceable:
            assert_trace_agrees(trace_live(pod, rule_set, path), broken)
    finally:
        load(pod, render_transaction(rule_plan, guard))
    assert outcome(connect(pod, path)) == path.expect
