"""The current rule set's wire paths (test_traffic_current.py) with --native-nftables (root only).

Same pods, flags and resolv.conf as test_traffic_current.py, applied with
`--native-nftables`. Each path lands where it should; then its breakage
(rules deleted, or replaced by the rule it names) is made in the plan, that
plan's transaction is loaded as the pod's ruleset, and the outcome must
change, so each test fails when its nft rule is missing or wrong.
"""

from __future__ import annotations

import subprocess
from typing import Iterator

import pytest

from clirun import clean_environ, given
from istio_init.config import from_sources
from istio_init.model import RulePlan
from istio_init.backends.nftables import guard_single_family
from istio_init.iptables_save.write import rule_spec
from istio_init.nft.write import render_transaction
from istio_init.rulesets import plan
from istio_init.trace import parse_rule
from podnet import Pod
from trafficpaths_current import (CONFIGS, PATHS, RESOLVER, Breakage, Path_, connect, every_pod, outcome,
                                    write_resolv_conf)

pytestmark = pytest.mark.root

NATIVE = ("--rules-version", "current", "--native-nftables")


@pytest.fixture(scope="module")
def nft_pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Pod]]:
    yield from every_pod(write_resolv_conf(tmp_path_factory.mktemp("pod")), NATIVE, "curnft")


def pod_plan(name: str) -> tuple[RulePlan, bool]:
    args, env = CONFIGS[name]
    config = from_sources(given([*NATIVE, *args, "--ipv6", "false"]), clean_environ(env))
    return plan(config, False, [RESOLVER]), guard_single_family(config.rules_version)


def broken_plan(rule_plan: RulePlan, breakage: Breakage) -> RulePlan:
    """The IPv4 plan with the breakage's rules deleted, or replaced in place."""
    steps = list(rule_plan.ipv4.steps)

    def index(wanted: str) -> int:
        found = [i for i, s in enumerate(steps) if f"{s.rule.table} {s.rule.chain} {rule_spec(s.rule)}" == wanted]
        assert found, f"rule not in the plan: {wanted}"
        return found[0]

    for rule in breakage.delete:
        del steps[index(rule)]
    for old, new in breakage.replace:
        at = index(old)
        table = old.split(" ", 1)[0]
        chain, spec = new.split(" ", 1)
        steps[at] = steps[at]._replace(rule=parse_rule(table, chain, spec))
    return rule_plan._replace(ipv4=rule_plan.ipv4._replace(steps=tuple(steps)))


def load(pod: Pod, text: str) -> None:
    subprocess.run(["nsenter", f"--net=/run/netns/{pod.name}", "nft", "-f", "-"], input=text, text=True,
                   check=True, capture_output=True, timeout=30)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_current_path_with_native_nftables(nft_pods: dict[str, Pod], path: Path_) -> None:
    pod = nft_pods[path.config]
    assert outcome(connect(pod, path)) == path.expect
    rule_plan, guard = pod_plan(path.config)
    try:
        load(pod, render_transaction(broken_plan(rule_plan, path.breakage), guard))
        assert outcome(connect(pod, path)) == path.broken
    finally:
        load(pod, render_transaction(rule_plan, guard))
    assert outcome(connect(pod, path)) == path.expect
