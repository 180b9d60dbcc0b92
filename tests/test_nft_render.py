"""The --native-nftables transaction as text (pure: no kernel, no root).

The kernel-side checks (each text loads, applies and reads back the same) are
in test_nft_apply.py; these pin the shape the spec asks for and the CLI's
dry run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cases import CASES, Case
from clirun import clean_environ, given, invoke
from istio_init.backends.nftables import _describe
from istio_init.config import from_sources
from istio_init.model import Match, Option, Rule
from istio_init.nft.write import (NftRenderError, TransactionLine, clean_transaction, render_transaction,
                                   transaction, write_rule)
from istio_init.rulesets import plan


def case_plan(case: Case):
    """The 1.8 plan of a case, through the CLI's own flag parsing."""
    return plan(from_sources(given(case.argv), case.env), case.ipv6)


def commands(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_transaction_shape(case: Case) -> None:
    text = render_transaction(case_plan(case), guard_single_family=True)
    lines = commands(text)
    # Our three tables are reset first (add + delete: works whether or not they exist).
    assert [" ".join(w) for w in lines[:6]] == [f"{verb} table inet istio-proxy-{t}"
                                                for t in ("nat", "mangle", "raw") for verb in ("add", "delete")]
    body = lines[6:]
    assert all(w[2] == "inet" and w[3].startswith("istio-proxy-") for w in body)
    rules = [w for w in body if w[:2] == ["add", "rule"]]
    assert rules and all("counter" in w for w in rules)
    chains = {(w[3], w[4]) for w in body if w[:2] == ["add", "chain"]}
    used = {(w[3], w[4]) for w in rules} | {(w[3], w[w.index("jump") + 1]) for w in rules if "jump" in w}
    assert chains == used  # only chains that hold rules (or are jumped to)
    tables = [w[3] for w in body if w[:2] == ["add", "table"]]
    assert set(tables) == {w[3] for w in rules}  # no empty table
    assert all(c == c.lower() and "_" not in c for _, c in chains)


def test_ipv4_and_ipv6_twins_are_neighbours_and_single_family_rules_are_guarded() -> None:
    dns = next(c for c in CASES if c.name == "dns_capture")
    text = render_transaction(case_plan(Case("v6dns", dns.args, ipv6=True)), guard_single_family=True)
    rules = [line.split(" ", 5)[5] for line in text.splitlines() if line.startswith("add rule")]
    six = rules.index('oifname "lo" ip saddr 127.0.0.6/32 counter return')
    assert rules[six + 1] == 'oifname "lo" ip6 saddr ::6/128 counter return'
    assert 'meta skuid 1337 counter return' in rules  # the same in both families: written once
    assert rules.count('meta skuid 1337 counter return') == 1
    # 1.8 captures DNS in IPv4 only: those rules say so.
    assert "meta nfproto ipv4 meta l4proto udp udp dport 53 counter dnat ip to 127.0.0.1:15053" in rules
    assert "meta nfproto ipv4 meta l4proto tcp tcp dport 53 counter redirect to :15053" in rules


def test_ipv4_only_plan_leaves_ipv6_alone_when_guarded() -> None:
    seed = case_plan(CASES[0])
    guarded = [l for l in render_transaction(seed, True).splitlines() if l.startswith("add rule")]
    plain = [l for l in render_transaction(seed, False).splitlines() if l.startswith("add rule")]
    base = [l for l in guarded if l.split()[4] in ("prerouting", "output")]
    assert base and all("meta nfproto ipv4" in l for l in base)
    assert not any("nfproto" in l for l in plain)  # Istio's form: IPv4 rules see IPv6 packets too
    assert len(guarded) == len(plain)


def test_tproxy_mark_and_order() -> None:
    rule = Rule("mangle", "ISTIO_TPROXY", "TPROXY", destination="::1/128", negate_destination=True, protocol="tcp",
                target_options=(Option("tproxy-mark", "1337/0xffffffff"), Option("on-port", "15006")))
    assert write_rule(rule, 6).text == ("meta l4proto tcp ip6 daddr != ::1/128 tproxy ip6 to :15006 "
                                        "meta mark set 1337 counter accept")


@pytest.mark.parametrize("rule,text", [
    (Rule("mangle", "PREROUTING", "CONNMARK", protocol="tcp", matches=(Match("mark", (Option("mark", "1337"),)),),
          target_options=(Option("save-mark"),)),
     "meta l4proto tcp meta mark 1337 counter ct mark set meta mark"),
    (Rule("mangle", "OUTPUT", "CONNMARK", protocol="tcp", matches=(Match("connmark", (Option("mark", "1337"),)),),
          target_options=(Option("restore-mark"),)),
     "meta l4proto tcp ct mark 1337 counter meta mark set ct mark"),
    (Rule("raw", "ISTIO_OUTPUT_DNS", "CT", destination="127.0.0.53/32", protocol="udp",
          matches=(Match("udp", (Option("dport", "53"),)),), target_options=(Option("zone", "2"),)),
     "meta l4proto udp udp dport 53 ip daddr 127.0.0.53/32 counter ct zone set 2"),
    (Rule("nat", "ISTIO_OUTPUT", "ISTIO_IN_REDIRECT", out_interface="lo", protocol="tcp",
          matches=(Match("multiport", (Option("dports", "53,15008", negated=True),)),
                   Match("owner", (Option("uid-owner", "3"),)))),
     'oifname "lo" meta l4proto tcp tcp dport != { 53, 15008 } meta skuid 3 counter jump istio-in-redirect'),
    (Rule("nat", "PREROUTING", "RETURN", in_interface="veth+"), 'iifname "veth*" counter return'),
    (Rule("mangle", "ISTIO_DIVERT", "MARK", target_options=(Option("set-xmark", "0x539/0xffffffff"),)),
     "counter meta mark set 1337"),
])
def test_rule_forms(rule: Rule, text: str) -> None:
    assert write_rule(rule, 4).text == text


def test_unknown_match_is_a_planner_error() -> None:
    with pytest.raises(NftRenderError, match="-m statistic"):
        write_rule(Rule("nat", "OUTPUT", "RETURN", matches=(Match("statistic", (Option("mode", "random"),)),)), 4)


def test_clean_only_deletes() -> None:
    lines = clean_transaction().splitlines()
    assert len(lines) == 6 and all(l.split()[0] in ("add", "delete") and l.split()[1] == "table" for l in lines)


def test_error_names_table_chain_and_rule() -> None:
    text, where = transaction(case_plan(CASES[0]))
    number = next(i for i, place in enumerate(where) if place.chain == "istio-output" and place.rule) + 1
    err = (f"/proc/self/fd/4:{number}:51-63: Error: Could not process rule: No such file or directory\n"
           f"{text.splitlines()[number - 1]}\n     ^^^^\n")
    message = _describe(err, text, where)
    assert message.startswith(f"nft transaction refused at line {number} (table inet istio-proxy-nat, "
                              "chain istio-output, rule '")
    assert "Could not process rule" in message
    assert _describe("Error: out of memory", text, where) == "nft transaction refused: Error: out of memory"
    assert isinstance(where[0], TransactionLine)


def test_dry_run_prints_the_transaction() -> None:
    seed = CASES[0]
    result = invoke([*seed.argv, "--native-nftables"])
    assert result.code == 0, result.stderr
    assert result.stdout == render_transaction(case_plan(seed), guard_single_family=True)
    assert "native_nftables: True" in result.stderr
    by_env = invoke(seed.argv, env={"NATIVE_NFTABLES": "true"})
    assert by_env.stdout == result.stdout


def test_bad_native_nftables_value_names_the_variable() -> None:
    result = invoke(["-n"], env={"NATIVE_NFTABLES": "maybe"})
    assert result.code == 2
    assert result.stderr.strip() == ("istio-init: invalid value for --native-nftables (from NATIVE_NFTABLES): "
                                     "'maybe': must be true or false")


def test_dry_run_needs_no_privileges() -> None:
    """As an unprivileged user (nobody, no capabilities) the dry run still prints the transaction."""
    argv = [sys.executable, "-m", "istio_init", *CASES[0].argv, "--native-nftables"]
    if os.geteuid() == 0:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, env=clean_environ(), timeout=60,
                          cwd="/", check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == render_transaction(case_plan(CASES[0]), guard_single_family=True)


def test_live_json_reads_back_as_the_planned_rules_per_family() -> None:
    """nft.read undoes nft.write: each family's rules come back as that family's plan (JSON as nft gives it)."""
    from istio_init.nft.read import ruleset_from_json

    objects = [
        {"chain": {"family": "inet", "table": "istio-proxy-nat", "name": "output", "hook": "output",
                   "type": "nat", "prio": -100, "policy": "accept"}},
        {"chain": {"family": "inet", "table": "istio-proxy-nat", "name": "istio-output"}},
        {"rule": {"family": "inet", "table": "istio-proxy-nat", "chain": "output", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}},
            {"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "istio-output"}}]}},
        {"rule": {"family": "inet", "table": "istio-proxy-nat", "chain": "istio-output", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "lo"}},
            {"match": {"op": "!=", "left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": "::1"}},
            {"match": {"op": "!=", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                       "right": {"set": [53, 15008]}}},
            {"match": {"op": "==", "left": {"meta": {"key": "skuid"}}, "right": 1337}},
            {"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "istio-in-redirect"}}]}},
        {"rule": {"family": "inet", "table": "istio-proxy-nat", "chain": "istio-output", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": {"prefix": {"addr": "10.0.0.0", "len": 8}}}},
            {"counter": {"packets": 0, "bytes": 0}}, {"redirect": {"port": 15001}}]}},
    ]
    from istio_init.iptables_save.write import rule_spec

    v4 = {chain: [rule_spec(r) for r in rules] for chain, rules in ruleset_from_json(objects, 4)["nat"].items()}
    v6 = {chain: [rule_spec(r) for r in rules] for chain, rules in ruleset_from_json(objects, 6)["nat"].items()}
    assert v4 == {"OUTPUT": ["-j ISTIO_OUTPUT"], "ISTIO_OUTPUT": ["-d 10.0.0.0/8 -j REDIRECT --to-ports 15001"]}
    assert v6 == {"OUTPUT": [], "ISTIO_OUTPUT": [
        "! -d ::1/128 -o lo -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT"]}
