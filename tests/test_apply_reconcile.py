"""Reconcile and the apply orchestration, without a kernel (no root).

reconcile.py decides every change from parsed iptables-save text, so re-runs,
flag changes and clean are checked here on text; the in-memory host
(tests/fakehost.py) checks that a failed commit rolls back exactly the
touched tables.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest

from cases import CASES, Case
from cases import UNRELATED_V4 as UNRELATED
from fakehost import FakeHost
from istio_init import apply, backends, model, system
from istio_init.config import from_sources
from istio_init.errors import ApplyError
from istio_init.rulesets import plan
from istio_init.backends.iptables.reconcile import TableChange, is_ours, reconcile, restore_text, simulate
from istio_init.iptables_save.write import render_family, rule_spec, split_families
from istio_init.iptables_save.read import SavedTable, normalize, parse_save, table_blocks


def _family(args: dict[str, str], ipv6: bool = False, family: int = 4):
    rule_plan = plan(from_sources(args, environ={}), ipv6)
    return rule_plan.ipv6 if family == 6 else rule_plan.ipv4


def _after(live: dict[str, SavedTable], changes: list[TableChange]) -> dict[str, object]:
    """Each table's state after the changes (simulate), as comparable data."""
    out = {}
    names = set(live) | {c.table for c in changes}
    for name in names:
        change = next((c for c in changes if c.table == name), None)
        state = simulate(live.get(name), change)
        if state != (frozenset(), {}):  # an empty table equals no table
            out[name] = state
    return out


def _merge(*texts: str) -> dict[str, SavedTable]:
    """Live state holding several save texts' tables (rules of later texts appended)."""
    merged: dict[str, SavedTable] = {}
    for text in texts:
        for name, table in parse_save(text).items():
            into = merged.setdefault(name, SavedTable(name))
            into.chains.update(table.chains)
            into.rules += table.rules
    return merged


def _case_plan(case: Case):
    """The RulePlan the CLI builds for a case's flags and environment."""
    from clirun import clean_environ

    from istio_init.cli import load_config, run_command

    args = [a for a in case.args if a != "istio-iptables"]
    with mock.patch.dict(os.environ, clean_environ(case.env), clear=True):
        ctx = run_command.make_context("run", args)
        config = load_config({k: v for k, v in ctx.params.items() if k != "cleanup_only"})
    return plan(config, case.ipv6)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_golden_case_from_empty_and_rerun(case: Case) -> None:
    """From nothing, the changes give the golden text; on the golden text, there is nothing to do."""
    rule_plan = _case_plan(case)
    for family, text in zip(rule_plan.families(), split_families(case.golden.read_text())):
        golden = parse_save(text)
        assert _after({}, reconcile({}, family)) == {n: simulate(t) for n, t in golden.items()}
        assert reconcile(golden, family) == []


def test_first_run_on_empty_state_gives_the_plan() -> None:
    family = _family({"service_cidr": "*", "inbound_ports": "*", "kube_virt_interfaces": "eth1"})
    changes = reconcile({}, family)
    after = _after({}, changes)
    expected = parse_save(render_family(family))
    assert after == {name: simulate(table) for name, table in expected.items()}


def test_rerun_keeps_unrelated_rules_and_leaves_one_run() -> None:
    family = _family({"service_cidr": "*", "inbound_ports": "*", "redirect_dns": "true"})
    live = _merge(UNRELATED, render_family(family))
    assert reconcile(live, family) == []
    # The same rules once more (as a buggy earlier tool would leave them) converge to one copy.
    doubled = _merge(UNRELATED, render_family(family), render_family(family))
    after = _after(doubled, reconcile(doubled, family))
    assert after == _after(live, [])


def test_different_flags_converge_and_drop_stale_chains() -> None:
    old = _family({"inbound_interception_mode": "TPROXY", "inbound_ports": "*", "service_cidr": "*",
                   "kube_virt_interfaces": "eth1,eth2", "redirect_dns": "true"})
    new = _family({"service_cidr": "10.0.0.0/8"})
    live = _merge(UNRELATED, render_family(old))
    changes = reconcile(live, new)
    assert {c.table for c in changes} == {"nat", "mangle"}
    mangle = next(c for c in changes if c.table == "mangle")
    assert set(mangle.delete_chains) == {"ISTIO_DIVERT", "ISTIO_INBOUND", "ISTIO_TPROXY"}
    assert _after(live, changes) == _after(_merge(UNRELATED, render_family(new)), [])


def test_clean_removes_only_ours() -> None:
    family = _family({"inbound_interception_mode": "TPROXY", "inbound_ports": "80", "service_cidr": "*",
                      "kube_virt_interfaces": "eth1", "redirect_dns": "true"})
    live = _merge(UNRELATED, render_family(family))
    changes = reconcile(live, None)
    assert _after(live, changes) == _after(parse_save(UNRELATED), [])
    assert reconcile(parse_save(UNRELATED), None) == []


def test_builtin_deletions_run_highest_number_first() -> None:
    family = _family({"service_cidr": "*", "kube_virt_interfaces": "eth1,eth2"})
    live = _merge(render_family(family), UNRELATED)  # ours first, then foreign rules
    change = next(c for c in reconcile(live, None) if c.table == "nat")
    prerouting = [n for chain, n in change.delete_rules if chain == "PREROUTING"]
    assert prerouting == sorted(prerouting, reverse=True) and len(prerouting) == 4
    text = restore_text([change])
    assert text.index("-D PREROUTING 4") < text.index("-D PREROUTING 1")
    assert text.index("-F ISTIO_OUTPUT") < text.index("-X ISTIO_OUTPUT")


@pytest.mark.parametrize("table, chain, spec, ours", [
    ("nat", "PREROUTING", "-i eth1 -j RETURN", True),
    ("nat", "PREROUTING", "-i eth1 -p tcp -j RETURN", False),
    ("nat", "OUTPUT", "-p tcp -j ISTIO_OUTPUT", True),
    ("nat", "OUTPUT", "-p udp -m udp --dport 53 -m owner --gid-owner 7 -j RETURN", True),
    ("nat", "OUTPUT", "-p udp -m udp --dport 53 -j DNAT --to-destination 127.0.0.1:15053", True),
    ("nat", "OUTPUT", "-p udp -m udp --dport 53 -j DNAT --to-destination 10.0.0.1:53", False),
    ("nat", "POSTROUTING", "-p udp -m udp --dport 15053 -j SNAT --to-source 127.0.0.1", True),
    ("mangle", "OUTPUT", "-s 127.0.0.1/32 ! -d 127.0.0.1/32 -p tcp -j MARK --set-xmark 0x539/0xffffffff", True),
    ("filter", "INPUT", "-i eth1 -j RETURN", False),
    ("nat", "MY_CHAIN", "-j RETURN", False),
    # Issue 9: only the chains a rule set plans are istio-init's; a user's ISTIO_FOO is not.
    ("nat", "ISTIO_OUTPUT", "-j RETURN", True),
    ("mangle", "ISTIO_DIVERT", "-j ACCEPT", True),
    ("nat", "ISTIO_FOO", "-j RETURN", False),
    ("nat", "PREROUTING", "-i eth0p -j ISTIO_FOO", False),
    ("nat", "PREROUTING", "-i cni0 -p tcp -j RETURN", False),
    ("nat", "PREROUTING", "-p udp -m udp --dport 53 -j RETURN", False),
    ("nat", "OUTPUT", "-o lo -p udp -j RETURN", False),
])
def test_which_rules_are_ours(table: str, chain: str, spec: str, ours: bool) -> None:
    assert is_ours(table, chain, spec) is ours


def test_restore_text_declares_plan_chains_and_inserts_at_one() -> None:
    family = _family({"service_cidr": "*", "kube_virt_interfaces": "eth1"})
    text = restore_text(reconcile({}, family))
    assert text.startswith("*nat\n:ISTIO_INBOUND - [0:0]\n")
    assert "-I PREROUTING 1 -i eth1 -j RETURN" in text
    assert text.rstrip().endswith("COMMIT")


def test_table_blocks_keeps_counters_and_fills_absent_tables() -> None:
    saved = "# c\n*nat\n:PREROUTING ACCEPT [1:2]\n[3:4] -A PREROUTING -j RETURN\nCOMMIT\n*filter\nCOMMIT\n"
    assert table_blocks(saved, ["nat", "mangle"]) == (
        "*nat\n:PREROUTING ACCEPT [1:2]\n[3:4] -A PREROUTING -j RETURN\nCOMMIT\n*mangle\nCOMMIT\n")


def _run_with(host: FakeHost, args: dict[str, str], ipv6: bool) -> None:
    config = from_sources({**args, "iptables_backend": "legacy"}, environ={})
    with system.using(host):
        apply.install(plan(config, ipv6), backends.get("legacy"))


def _restores(host: FakeHost) -> list[tuple]:
    return [c for c in host.calls if c[0] == "restore"]


def test_failed_ipv6_commit_restores_both_families() -> None:
    host = FakeHost({("legacy", 4): UNRELATED, ("legacy", 6): UNRELATED}, fail_at="legacy IPv6 nat")
    with pytest.raises(ApplyError, match="IPv6 nat: refused.*put back"):
        _run_with(host, {"service_cidr": "*"}, ipv6=True)
    restores = _restores(host)
    # IPv4's committed nat is put back; IPv6's refused nat never changed, so it needs no restore.
    assert [(c[2], c[3].splitlines()[0]) for c in restores] == [(4, "*nat")]
    assert "-A MY_CHAIN -p udp -m udp --dport 5353 -j RETURN" in restores[0][3]
    assert "*filter" not in restores[0][3]
    assert normalize(host.text[("legacy", 4)]) == normalize(UNRELATED)
    assert normalize(host.text[("legacy", 6)]) == normalize(UNRELATED)


def test_injected_fault_after_nat_commit_rolls_back() -> None:
    host = FakeHost({("legacy", 4): UNRELATED}, fail_at="legacy IPv4 nat", after=True)
    args = {"service_cidr": "*", "inbound_ports": "*", "inbound_interception_mode": "TPROXY"}
    with pytest.raises(ApplyError, match="after its commit"):
        _run_with(host, args, ipv6=False)
    assert ("commit", "legacy", 4, "nat") in host.calls and ("commit", "legacy", 4, "mangle") not in host.calls
    restores = _restores(host)
    assert len(restores) == 1 and restores[0][3] == table_blocks(UNRELATED, ["nat"])
    assert normalize(host.text[("legacy", 4)]) == normalize(UNRELATED)


def test_unexpected_exception_after_a_commit_rolls_back_too() -> None:
    """Issue 12, finding 2: not only ApplyError: an encoding error, a bug, anything."""
    error = UnicodeDecodeError("utf-8", b"\xc3", 0, 1, "invalid continuation byte")
    host = FakeHost({("legacy", 4): UNRELATED}, fail_at="legacy IPv4 nat", after=True, error=error)
    with pytest.raises(ApplyError, match="UnicodeDecodeError.*put back"):
        _run_with(host, {"service_cidr": "*", "inbound_ports": "*", "kube_virt_interfaces": "eth1"}, ipv6=False)
    assert normalize(host.text[("legacy", 4)]) == normalize(UNRELATED)


def test_refusal_before_any_change_says_nothing_was_changed() -> None:
    """Issue 12, finding 6: a failure that changed nothing is not reported as an incomplete rollback."""
    host = FakeHost({("legacy", 4): UNRELATED}, fail_at="legacy IPv4 nat")
    with pytest.raises(ApplyError, match=r"refused \(nothing had been changed\)"):
        _run_with(host, {"service_cidr": "*"}, ipv6=False)
    assert not _restores(host)


def test_a_failed_rollback_says_what_may_be_left() -> None:
    """The rollback's own failure is reported with what to run, not as a success."""
    host = FakeHost({("legacy", 4): UNRELATED}, fail_at="legacy IPv4 nat", after=True)
    original = host.iptables

    def no_restore(name: str):  # type: ignore[no-untyped-def]
        tables = original(name)
        tables.restore = lambda family, blocks: (_ for _ in ()).throw(ApplyError("restore refused"))
        return tables

    host.iptables = no_restore  # type: ignore[method-assign]
    with pytest.raises(ApplyError, match="rollback incomplete: IPv4 tables nat may still hold this run's rules "
                                         r"\(restore refused\); `istio-init clean --iptables-backend legacy`"):
        _run_with(host, {"service_cidr": "*"}, ipv6=False)


def test_skip_rule_apply_touches_nothing() -> None:
    from istio_init import runner

    host = FakeHost({("legacy", 4): ""})
    config = from_sources({"skip_rule_apply": "true", "iptables_backend": "legacy", "ipv6": "false"}, environ={})
    logged: list[str] = []
    with system.using(host):
        runner.run(config, logged.append)
    assert host.calls == [] and host.steps == []
    assert any("--skip-rule-apply" in line for line in logged)


def _long_x_family(cidrs: list[str], ipv6: bool = False):
    rule_plan = plan(from_sources({"service_cidr": "*", "service_exclude_cidr": ",".join(cidrs)}, environ={}), ipv6)
    return rule_plan.ipv6 if ipv6 else rule_plan.ipv4


def test_an_x_list_goes_to_the_restore_tool_as_address_lists_that_expand_to_its_rules() -> None:
    """`-A ISTIO_OUTPUT -d A,B,... -j RETURN` lines, each list under xtables' parameter limit,
    expand (one rule per address, in order) to exactly the rules spelled one by one."""
    from istio_init.backends.iptables.reconcile import MAX_PARAMETER

    cidrs = [f"10.{i >> 8}.{i & 255}.0/24" for i in range(300)] + [f"192.0.2.{i}/32" for i in range(200)]
    changes = reconcile({}, _long_x_family(cidrs))
    text = restore_text(changes)
    grouped = [line for line in text.splitlines() if "," in line]
    assert grouped and all(len(line.split()[3]) < MAX_PARAMETER for line in grouped)
    expanded = []
    for line in text.splitlines():
        words = line.split()
        if line.startswith("-A ") and words[2] == "-d" and "," in words[3]:
            expanded += [" ".join([*words[:3], address, *words[4:]]) for address in words[3].split(",")]
        else:
            expanded.append(line)
    with mock.patch.object(model, "DESTINATION_RUN_MIN", 10**9):  # no run known: one line per rule
        one_by_one = restore_text(reconcile({}, _long_x_family(cidrs)))
    assert len(one_by_one.splitlines()) > len(text.splitlines()) + 400
    assert expanded == one_by_one.splitlines()


def test_an_x_list_holding_a_slash_0_is_written_rule_by_rule() -> None:
    """A /0 is planned as a rule without an address, which no address list can carry."""
    cidrs = [f"192.0.2.{i}/32" for i in range(100)] + ["0.0.0.0/0"]
    text = restore_text(reconcile({}, _long_x_family(cidrs)))
    assert not [line for line in text.splitlines() if "," in line]
    assert "-A ISTIO_OUTPUT -j RETURN" in text.splitlines()
    with mock.patch.object(model, "DESTINATION_RUN_MIN", 10**9):
        assert text == restore_text(reconcile({}, _long_x_family(cidrs)))


def test_an_x_list_is_spelled_as_each_rule_spells_itself() -> None:
    from istio_init.backends.iptables.reconcile import spell

    for ipv6, cidrs in ((False, [f"10.0.{i >> 8}.{i & 255}/32" for i in range(1000)]),
                        (True, [f"2001:db8::{i:x}/128" for i in range(100)])):
        family = _long_x_family(cidrs, ipv6)
        assert spell(family.steps) == tuple(rule_spec(step.rule) for step in family.steps)
        assert any(f"-d {cidrs[-1]} -j RETURN" == spec for spec in spell(family.steps))
        # A slice that cuts a run is spelled rule by rule, and still the same.
        assert spell(family.steps[5:-3]) == tuple(rule_spec(step.rule) for step in family.steps[5:-3])
