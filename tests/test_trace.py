"""`istio-init trace` without a kernel: parsing rule text back, and walking the plan.

The wire tests (test_traffic.py) check trace against real connections; these
pin the evaluator's semantics and output on its own, so a change in wording
or in netfilter modelling shows up here first, with no root needed.
"""

from __future__ import annotations

import json

import pytest

from cases import CASES, SEED_ARGS, Case
from clirun import given, invoke
from istio_init.config import from_sources
from istio_init.model import Rule
from istio_init.rulesets import plan
from istio_init.iptables_save.write import rule_spec, split_families
from istio_init.trace import (TraceError, Verdict, make_connection, parse_rule, ruleset_from_plan,
                              ruleset_from_save, trace)


def _plan_rules(case: Case) -> list[Rule]:
    config = from_sources(dict(given(case.args)), environ=case.env)
    rule_plan = plan(config, case.ipv6)
    return [rule for family in rule_plan.families() for table in family.tables()
            for rules in family.final_rules(table).values() for rule in rules]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_rule_text_parses_back_to_the_planned_rule(case: Case) -> None:
    for rule in _plan_rules(case):
        assert parse_rule(rule.table, rule.chain, rule_spec(rule)) == rule


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_golden_text_and_plan_give_the_same_ruleset(case: Case) -> None:
    config = from_sources(given(case.args), environ=case.env)
    rule_plan = plan(config, case.ipv6)
    texts = split_families(case.golden.read_text())
    for family, text in zip(rule_plan.families(), texts):
        from_text = {t: {c: r for c, r in chains.items() if r} for t, chains in ruleset_from_save(text).items()}
        assert from_text == ruleset_from_plan(family)


def _seed_verdict(direction: str, dst: str, dport: int, **kw) -> Verdict:
    config = from_sources(given(SEED_ARGS), environ={})
    family = plan(config, ":" in dst)
    rules = ruleset_from_plan(family.ipv6 if ":" in dst else family.ipv4)
    return trace(rules, make_connection(direction, dst, dport, **kw))


@pytest.mark.parametrize("direction,dst,dport,kw,outcome", [
    ("out", "198.51.100.20", 80, {"uid": 1000, "gid": 1000}, "captured: REDIRECT to 15001"),
    ("out", "198.51.100.20", 80, {"uid": 1337, "gid": 1000},
     "not captured: RETURN at ISTIO_OUTPUT rule 4 (-m owner --uid-owner 1337 -j RETURN)"),
    ("out", "198.51.100.20", 80, {"uid": 1000, "gid": 1337},
     "not captured: RETURN at ISTIO_OUTPUT rule 7 (-m owner --gid-owner 1337 -j RETURN)"),
    ("out", "127.0.0.1", 80, {"uid": 1000, "gid": 1000},
     "not captured: RETURN at ISTIO_OUTPUT rule 3 (-o lo -m owner ! --uid-owner 1337 -j RETURN)"),
    ("out", "192.0.2.10", 8080, {"uid": 1337, "gid": 1337, "src": "127.0.0.6", "out_interface": "lo"},
     "not captured: RETURN at ISTIO_OUTPUT rule 1 (-s 127.0.0.6/32 -o lo -j RETURN)"),
    ("out", "192.0.2.10", 8080, {"uid": 1337, "gid": 1337, "out_interface": "lo"}, "captured: REDIRECT to 15006"),
    ("in", "192.0.2.10", 8080, {}, "captured: REDIRECT to 15006"),
    ("in", "192.0.2.10", 15020, {}, "not captured: RETURN at ISTIO_INBOUND rule 5 (-p tcp -m tcp --dport 15020 -j RETURN)"),
    ("in", "192.0.2.10", 22, {}, "not captured: RETURN at ISTIO_INBOUND rule 2 (-p tcp -m tcp --dport 22 -j RETURN)"),
    ("in", "192.0.2.10", 53, {"protocol": "udp"}, "not captured: no rule matched in nat PREROUTING"),
    ("in", "2001:db8::10", 8080, {}, "captured: REDIRECT to 15006"),
    ("out", "2001:db8::20", 80, {"uid": 1000}, "captured: REDIRECT to 15001"),
])
def test_seed_outcomes(direction: str, dst: str, dport: int, kw: dict, outcome: str) -> None:
    assert _seed_verdict(direction, dst, dport, **kw).outcome == outcome


def test_captured_verdict_names_port_address_and_path() -> None:
    verdict = _seed_verdict("out", "198.51.100.20", 80, uid=1000, gid=1000)
    assert (verdict.captured, verdict.to_port, verdict.to_address) == (True, 15001, "127.0.0.1")
    assert [(h.chain, h.number, h.depth) for h in verdict.hits] == [
        ("OUTPUT", 1, 0), ("ISTIO_OUTPUT", 9, 1), ("ISTIO_REDIRECT", 1, 2)]
    assert verdict.tables == ("mangle OUTPUT", "nat OUTPUT", "nat POSTROUTING")


def _verdict(args: tuple[str, ...], direction: str, dst: str, dport: int, **kw) -> Verdict:
    config = from_sources(given(args), environ={})
    rules = ruleset_from_plan(plan(config, False).ipv4)
    return trace(rules, make_connection(direction, dst, dport, **kw))


def test_tproxy_inbound_is_captured_in_mangle() -> None:
    verdict = _verdict(("-m", "TPROXY", "-b", "*", "-i", "*"), "in", "192.0.2.10", 8080)
    assert verdict.outcome == "captured: TPROXY to 15006"
    assert verdict.decided_by is not None and verdict.decided_by.table == "mangle"
    assert verdict.to_address == "192.0.2.10"  # TPROXY keeps the destination


def test_dns_udp_is_dnat_and_snat_follows() -> None:
    verdict = _verdict(("--redirect-dns", "-i", "*"), "out", "198.51.100.53", 53, protocol="udp", uid=1000)
    assert verdict.outcome == "captured: DNAT to 127.0.0.1:15053"
    assert verdict.hits[-1].target == "SNAT"  # POSTROUTING saw the translated destination port
    proxy = _verdict(("--redirect-dns", "-i", "*"), "out", "198.51.100.53", 53, protocol="udp", uid=1337)
    assert proxy.outcome.startswith("not captured: RETURN at OUTPUT rule 2")


def test_multiport_and_kube_virt_interfaces() -> None:
    args = ("--multiport", "-b", "*", "-d", "9000,9001,9002", "-i", "*", "-k", "eth1")
    assert not _verdict(args, "in", "192.0.2.10", 9001).captured
    assert _verdict(args, "in", "192.0.2.10", 9003).outcome == "captured: REDIRECT to 15006"
    # KubeVirt: traffic arriving on eth1 is the VM's outbound traffic.
    assert _verdict(args, "in", "198.51.100.20", 80, in_interface="eth1").outcome == "captured: REDIRECT to 15001"


def test_outside_cidrs_falls_through_to_the_final_return() -> None:
    verdict = _verdict(("-i", "10.0.0.0/8",), "out", "198.51.100.20", 80, uid=1000)
    assert verdict.outcome == "not captured: RETURN at ISTIO_OUTPUT rule 10 (-j RETURN)"


def test_rules_it_cannot_evaluate_are_refused_not_guessed() -> None:
    with pytest.raises(TraceError, match="negated -s"):
        parse_rule("nat", "OUTPUT", "! -s 10.0.0.0/8 -j RETURN")
    rules = ruleset_from_save("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -m statistic --mode random -j RETURN\nCOMMIT\n")
    with pytest.raises(TraceError, match="cannot evaluate -m statistic --mode"):
        trace(rules, make_connection("out", "198.51.100.1", 80))


def test_a_jump_loop_is_bounded() -> None:
    text = "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_LOOP - [0:0]\n-A OUTPUT -j ISTIO_LOOP\n-A ISTIO_LOOP -j ISTIO_LOOP\nCOMMIT\n"
    with pytest.raises(TraceError, match="deeper than 64|more than"):
        trace(ruleset_from_save(text), make_connection("out", "198.51.100.1", 80))


def test_cli_text_output_shows_chains_rules_and_outcome() -> None:
    result = invoke(["trace", *SEED_ARGS[1:], "--direction", "out", "--dst", "198.51.100.20", "--dport", "80",
                     "--uid", "1337"])
    assert result.code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "connection: out tcp (pod address) -> 198.51.100.20:80 (uid 1337 gid 0, out eth0)",
        "rules: plan for the given flags",
        "mangle OUTPUT:",
        "  (no rule matched; policy ACCEPT)",
        "nat OUTPUT:",
        "  OUTPUT rule 1: -p tcp -j ISTIO_OUTPUT",
        "    ISTIO_OUTPUT rule 4: -m owner --uid-owner 1337 -j RETURN",
        "nat POSTROUTING:",
        "  (no rule matched; policy ACCEPT)",
        "not captured: RETURN at ISTIO_OUTPUT rule 4 (-m owner --uid-owner 1337 -j RETURN)",
    ]


def test_cli_accepts_every_run_flag_and_json() -> None:
    result = invoke(["trace", "-p", "16001", "-i", "*", "--direction", "out",
                     "--dst", "198.51.100.20", "--dport", "80", "--uid", "1000", "--json"])
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["captured"] and data["to_port"] == 16001 and data["outcome"] == "captured: REDIRECT to 16001"
    assert data["connection"]["dst"] == "198.51.100.20"
    env = invoke(["trace", "--direction", "out", "--dst", "198.51.100.20", "--dport", "80", "--json"],
                 env={"ISTIO_SERVICE_CIDR": "*", "ENVOY_PORT": "16002"})
    assert json.loads(env.stdout)["to_port"] == 16002


def test_cli_ipv6_destination_without_ipv6_rules() -> None:
    result = invoke(["trace", "-i", "*", "--ipv6", "false", "--direction", "out", "--dst", "2001:db8::20",
                     "--dport", "80"])
    assert result.code == 0, result.stderr
    assert "no IPv6 rules" in result.stdout
    assert result.stdout.rstrip().endswith("not captured: no rule matched in nat OUTPUT")


def test_cli_bad_connection_is_one_line_error() -> None:
    result = invoke(["trace", "--direction", "out", "--dst", "not-an-ip", "--dport", "80"])
    assert result.code == 2
    assert result.stderr == "istio-init: invalid value for --dst: 'not-an-ip': not an IPv4 or IPv6 address\n"
    assert invoke(["trace", "-p", "99999", "--direction", "out", "--dst", "198.51.100.1", "--dport", "80"]).code == 2
