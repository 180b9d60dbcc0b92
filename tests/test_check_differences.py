"""`istio-init check`'s comparison without a kernel: planned and live state as data.

The root tests (test_check.py) prove the same against real namespaces; these
pin what counts as drift (and what does not) case by case, so a change of
rule shows up here first, with no root needed.
"""

from __future__ import annotations

import json

import pytest

from cases import CASES, SEED_ARGS, UNRELATED_V4, Case
from clirun import given
from istio_init.config import from_sources
from istio_init.check import (Difference, Live, chains_from_plan, chains_from_save, compare, compare_chain,
                              format_text, planned_state, to_json)
from istio_init.iptables_save.read import parse_save
from istio_init.installed import holding_store, stores_holding_ours
from istio_init.host.routing import Routing
from istio_init.iptables_save.write import render_family, render_plan, split_families
from istio_init.rulesets import plan


def _plan(args: tuple[str, ...], ipv6: bool = False, env: dict | None = None):
    return plan(from_sources(given(args), environ=env or {}), ipv6)


def _live_as_installed(rule_plan, flavour: str = "legacy", extra_v4: str = "") -> Live:
    """The live state right after an apply: the plan's text, read back as iptables-save would show it."""
    families = {f.family: chains_from_save(render_family(f)) for f in rule_plan.families()}
    if extra_v4:
        for table, chains in chains_from_save(extra_v4).items():
            for chain, specs in chains.items():
                families[4].setdefault(table, {}).setdefault(chain, [])[0:0] = specs
    routing = planned_state(rule_plan).routing
    return Live({flavour: families}, routing, frozenset(rule_plan.loopback_addresses))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_golden_case_is_in_sync_with_its_own_text(case: Case) -> None:
    rule_plan = _plan(case.args, case.ipv6, case.env)
    golden = split_families(case.golden.read_text())
    families = {f.family: chains_from_save(text) for f, text in zip(rule_plan.families(), golden)}
    planned = planned_state(rule_plan)
    report = compare(planned, Live({"legacy": families}, planned.routing, planned.addresses), "legacy")
    assert report.differences == ()
    assert report.exit_code == 0
    assert format_text(report).count("\n") == 0 and "in sync" in format_text(report)


def test_chain_missing_extra_and_swapped() -> None:
    planned = ["a", "b", "c", "d", "e"]
    live = [(1, "a"), (2, "x"), (3, "c"), (4, "b"), (5, "e")]
    assert sorted(compare_chain(planned, live)) == sorted([
        Difference("missing", "rule", "d", position=4),
        Difference("extra", "rule", "x", position=2),
        Difference("misordered", "rule", "c", position=3, planned_position=3),
        Difference("misordered", "rule", "b", position=4, planned_position=2),
    ])


def test_duplicates_pair_up_one_to_one() -> None:
    assert compare_chain(["a", "a"], [(1, "a"), (2, "a"), (3, "a")]) == [
        Difference("extra", "rule", "a", position=3)]
    assert compare_chain(["a", "b", "a"], [(1, "a"), (2, "b")]) == [
        Difference("missing", "rule", "a", position=3)]


def test_a_swap_far_apart_names_only_the_two_rules() -> None:
    planned = list("abcdef")
    live = list(enumerate("aecdbf", 1))
    assert [(d.text, d.position, d.planned_position) for d in compare_chain(planned, live)] == [
        ("e", 2, 5), ("b", 5, 2)]


def test_user_rules_and_chains_are_not_drift() -> None:
    rule_plan = _plan(SEED_ARGS)
    live = _live_as_installed(rule_plan, extra_v4=UNRELATED_V4)
    assert "MY_CHAIN" in live.rules["legacy"][4]["nat"]
    assert compare(planned_state(rule_plan), live, "legacy").differences == ()


def test_a_users_istio_named_chain_is_not_drift() -> None:
    """Ownership comes from the rule sets' chains, not the ISTIO_ prefix (as in reconcile)."""
    rule_plan = _plan(SEED_ARGS)
    live = _live_as_installed(rule_plan)
    live.rules["legacy"][4]["nat"]["ISTIO_FOO"] = ["-p tcp -j ACCEPT"]
    live.rules["legacy"][4]["nat"]["OUTPUT"].append("-j ISTIO_FOO")
    assert compare(planned_state(rule_plan), live, "legacy").differences == ()


def test_foreign_rule_in_our_chain_and_our_rule_in_a_builtin_are_drift() -> None:
    rule_plan = _plan(SEED_ARGS)
    live = _live_as_installed(rule_plan)
    nat = live.rules["legacy"][4]["nat"]
    nat["ISTIO_INBOUND"].insert(0, "-p tcp -m tcp --dport 9 -j ACCEPT")
    nat["PREROUTING"].insert(0, "-p tcp -j ISTIO_OUTPUT")  # a jump to our chain is ours wherever it is
    nat["OUTPUT"].insert(0, "-p tcp -j ACCEPT")  # the user's: not drift
    diffs = compare(planned_state(rule_plan), live, "legacy").differences
    assert [(d.kind, d.table, d.chain, d.position, d.text) for d in diffs] == [
        ("extra", "nat", "PREROUTING", 1, "-p tcp -j ISTIO_OUTPUT"),
        ("extra", "nat", "ISTIO_INBOUND", 1, "-p tcp -m tcp --dport 9 -j ACCEPT"),
    ]


def test_missing_chain_and_stale_chain() -> None:
    rule_plan = _plan(SEED_ARGS)
    live = _live_as_installed(rule_plan)
    nat = live.rules["legacy"][4]["nat"]
    del nat["ISTIO_REDIRECT"]
    nat["ISTIO_OUTPUT"].remove("-j ISTIO_REDIRECT")
    live.rules["legacy"][4]["mangle"] = {"PREROUTING": [], "ISTIO_DIVERT": ["-j ACCEPT"]}
    diffs = compare(planned_state(rule_plan), live, "legacy").differences
    assert [(d.kind, d.what, d.table, d.chain, d.text) for d in diffs] == [
        ("missing", "chain", "nat", "ISTIO_REDIRECT", "ISTIO_REDIRECT"),
        ("missing", "rule", "nat", "ISTIO_OUTPUT", "-j ISTIO_REDIRECT"),
        ("missing", "rule", "nat", "ISTIO_REDIRECT", "-p tcp -j REDIRECT --to-ports 15001"),
        ("extra", "chain", "mangle", "ISTIO_DIVERT", "ISTIO_DIVERT"),
        ("extra", "rule", "mangle", "ISTIO_DIVERT", "-j ACCEPT"),
    ]


def test_rules_in_the_other_flavour_or_an_unplanned_family_are_extra() -> None:
    rule_plan = _plan(SEED_ARGS)
    live = _live_as_installed(rule_plan)
    v6 = chains_from_save(render_family(_plan(SEED_ARGS, ipv6=True).ipv6))
    live.rules["legacy"][6] = v6
    live.rules["nft"] = {4: chains_from_save(render_family(rule_plan.ipv4))}
    diffs = compare(planned_state(rule_plan), live, "legacy").differences
    rules = sum(len(specs) for chains in v6.values() for specs in chains.values())
    assert {(d.kind, d.flavour, d.family) for d in diffs} == {("extra", "legacy", 6), ("extra", "nft", 4)}
    assert len([d for d in diffs if d.family == 6 and d.what == "rule"]) == rules


def test_routing_and_address_missing_and_extra() -> None:
    rule_plan = _plan(("-m", "TPROXY", "-b", "*", "-i", "*"), ipv6=True)
    live = _live_as_installed(rule_plan)
    route = Routing("route", 4, 0, 133)
    stale = Routing("rule", 4, 0x53a, 134)
    live = live._replace(routing=(live.routing - {route}) | {stale}, addresses=frozenset())
    report = compare(planned_state(rule_plan), live, "legacy")
    assert [(d.kind, d.what, d.family, d.text) for d in report.differences] == [
        ("missing", "routing", 4, "ip route local default dev lo table 133"),
        ("extra", "routing", 4, "ip rule fwmark 0x53a lookup 134"),
        ("missing", "address", None, "::6/128 on lo"),
    ]
    text = format_text(report).splitlines()
    assert text[0].startswith("istio-init check: out of sync") and "2 missing, 1 extra, 0 misordered" in text[0]
    assert text[1:] == ["missing    routing ip route local default dev lo table 133",
                        "extra      routing ip rule fwmark 0x53a lookup 134",
                        "missing    address ::6/128 on lo"]
    data = json.loads(to_json(report))
    assert data["in_sync"] is False and [Difference(**d) for d in data["differences"]] == list(report.differences)


def test_text_lines_name_tool_table_chain_position_and_rule() -> None:
    rule_plan = _plan(SEED_ARGS, ipv6=True)
    live = _live_as_installed(rule_plan, flavour="nft")
    out = live.rules["nft"][6]["nat"]["ISTIO_OUTPUT"]
    out[2], out[3] = out[3], out[2]
    report = compare(planned_state(rule_plan), live, "nft")
    assert format_text(report).splitlines()[1:] == [
        "misordered ip6tables-nft nat ISTIO_OUTPUT rule 3 (planned 4): -m owner --uid-owner 1337 -j RETURN",
        "misordered ip6tables-nft nat ISTIO_OUTPUT rule 4 (planned 3): -o lo -m owner ! --uid-owner 1337 -j RETURN",
    ]


def test_the_store_policy() -> None:
    """installed.holding_store: the backend's flavour; for auto apply's choice unless only the other holds ours."""
    assert holding_store("libiptc", ["nft"], "nft") == "legacy"
    assert holding_store("nft", ["legacy"], "legacy") == "nft"
    assert holding_store("auto", ["legacy"], "nft") == "legacy"   # ours only in legacy: that is where they capture
    assert holding_store("auto", ["legacy", "nft"], "nft") == "nft"  # leftovers in both: the one apply keeps
    assert holding_store("auto", ["legacy", "nft"], "legacy") == "legacy"
    assert holding_store("auto", [], "legacy") == "legacy"
    assert holding_store("auto", [], "nft") == "nft"


def test_which_stores_hold_ours() -> None:
    seed = parse_save(render_plan(_plan(SEED_ARGS)))
    user = parse_save("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp -j ACCEPT\nCOMMIT\n")
    assert stores_holding_ours({"legacy": {4: user}, "nft": {4: seed}}) == ["nft"]
    assert stores_holding_ours({"legacy": {4: seed, 6: user}, "nft": {6: seed}}) == ["legacy", "nft"]
    assert stores_holding_ours({"legacy": {4: user}}) == []


def test_the_kubernetes_probe_checks_the_init_containers_args() -> None:
    """check-probe.yaml's exec command is `istio-init check` + deployment.yaml's init args, minus the first word."""
    import re
    from pathlib import Path

    kube = Path(__file__).parent.parent / "container" / "kubernetes"
    deployment = (kube / "deployment.yaml").read_text()
    block = deployment.split("initContainers:\n      - args:\n", 1)[1].split("        env:", 1)[0]
    items = re.findall(r"^        - (.*)$", block, re.M)
    init_args = [json.loads(i) if i.startswith('"') else i.strip("'") for i in items]
    probe = (kube / "check-probe.yaml").read_text()
    command = json.loads(re.search(r"command: (\[\"istio-init\", \"check\".*?\])", probe, re.S).group(1))
    assert init_args[0] == "istio-iptables"
    assert command == ["istio-init", "check", *init_args[1:]]
