"""Reconcile and the apply orchestration, without a kernel (no root).

reconcile.py decides every change from parsed iptables-save text, so re-runs,
flag changes and clean are checked here on text; a recording backend checks
that a failed commit rolls back exactly the touched tables.
"""

from __future__ import annotations

import contextlib
import os
from typing import Mapping
from unittest import mock

import pytest

from cases import CASES, Case
from cases import UNRELATED_V4 as UNRELATED
from istio_init import apply
from istio_init.config import from_sources
from istio_init.errors import ApplyError
from istio_init.rulesets import plan
from istio_init.backends.iptables.reconcile import TableChange, is_ours, reconcile, restore_text, simulate
from istio_init.render import render_family, split_families
from istio_init.backends.iptables.backend import IptablesBackend
from istio_init.backends.iptables.savefile import SavedTable, normalize, parse_save, table_blocks


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


class RecordingBackend(IptablesBackend):
    """An iptables backend passed in by the test: it records calls, keeps state as text, fails on request.

    A commit appends a rule to the table's text, so the rollback sees which
    tables really changed; `fail_on` refuses one (family, table) and
    `fail_after` raises right after committing one (a fault after a commit).
    """

    name = "recording"

    def __init__(self, snapshots: Mapping[int, str], fail_on: tuple[int, str] | None,
                 fail_after: tuple[int, str] | None = None) -> None:
        self.live = dict(snapshots)
        self.fail_on = fail_on
        self.fail_after = fail_after
        self.calls: list[tuple] = []

    def session(self) -> contextlib.AbstractContextManager[None]:
        self.calls.append(("session",))
        return contextlib.nullcontext()

    def save(self, family: int, counters: bool = True) -> str:
        self.calls.append(("read", family))
        return self.live[family]

    def commit_family(self, family: int, changes: list[TableChange]) -> None:
        for change in changes:
            if (family, change.table) == self.fail_on:
                raise ApplyError(f"table {change.table}: refused")
            self.calls.append(("commit", family, change.table))
            self.live[family] += f"*{change.table}\n-A OUTPUT -j RECORDED_COMMIT\nCOMMIT\n"
            if (family, change.table) == self.fail_after:
                raise ApplyError(f"table {change.table}: fault injected after its commit")

    def restore(self, family: int, saved_blocks: str) -> None:
        self.calls.append(("restore", family, saved_blocks))
        tables = parse_save(saved_blocks)
        kept = [b for b in self.live[family].split("COMMIT\n") if b.strip() and
                b.strip().splitlines()[0][1:] not in tables and not b.startswith("#")]
        self.live[family] = "".join(b + "COMMIT\n" for b in kept) + saved_blocks


def _run_with(backend: RecordingBackend, args: dict[str, str], ipv6: bool) -> None:
    config = from_sources({**args, "iptables_backend": "legacy"}, environ={})
    apply.run(plan(config, ipv6), backend, lock=contextlib.nullcontext)


def test_failed_ipv6_commit_restores_both_families() -> None:
    backend = RecordingBackend({4: UNRELATED, 6: UNRELATED}, fail_on=(6, "nat"))
    with pytest.raises(ApplyError, match="table nat: refused.*put back"):
        _run_with(backend, {"service_cidr": "*"}, ipv6=True)
    restores = [c for c in backend.calls if c[0] == "restore"]
    # IPv4's committed nat is put back; IPv6's refused nat never changed, so it needs no restore.
    assert [(c[1], c[2].splitlines()[0]) for c in restores] == [(4, "*nat")]
    assert "-A MY_CHAIN -p udp -m udp --dport 5353 -j RETURN" in restores[0][2]
    assert "*filter" not in restores[0][2]
    assert normalize(backend.live[4]) == normalize(UNRELATED) and normalize(backend.live[6]) == normalize(UNRELATED)


def test_injected_fault_after_nat_commit_rolls_back() -> None:
    backend = RecordingBackend({4: UNRELATED}, fail_on=None, fail_after=(4, "nat"))
    args = {"service_cidr": "*", "inbound_ports": "*", "inbound_interception_mode": "TPROXY"}
    with pytest.raises(ApplyError, match="after its commit"):
        _run_with(backend, args, ipv6=False)
    assert ("commit", 4, "nat") in backend.calls and ("commit", 4, "mangle") not in backend.calls
    restores = [c for c in backend.calls if c[0] == "restore"]
    assert len(restores) == 1 and restores[0][2] == table_blocks(UNRELATED, ["nat"])
    assert normalize(backend.live[4]) == normalize(UNRELATED)


def test_unexpected_exception_after_a_commit_rolls_back_too() -> None:
    """Issue 12, finding 2: not only ApplyError: an encoding error, a bug, anything."""

    class Broken(RecordingBackend):
        def commit_family(self, family: int, changes: list[TableChange]) -> None:
            super().commit_family(family, changes[:1])
            raise UnicodeDecodeError("utf-8", b"\xc3", 0, 1, "invalid continuation byte")

    backend = Broken({4: UNRELATED}, fail_on=None)
    with pytest.raises(ApplyError, match="UnicodeDecodeError.*put back"):
        _run_with(backend, {"service_cidr": "*", "inbound_ports": "*", "kube_virt_interfaces": "eth1"}, ipv6=False)
    assert normalize(backend.live[4]) == normalize(UNRELATED)


def test_refusal_before_any_change_says_nothing_was_changed() -> None:
    """Issue 12, finding 6: a failure that changed nothing is not reported as an incomplete rollback."""
    backend = RecordingBackend({4: UNRELATED}, fail_on=(4, "nat"))
    with pytest.raises(ApplyError, match=r"refused \(nothing had been changed\)"):
        _run_with(backend, {"service_cidr": "*"}, ipv6=False)
    assert not [c for c in backend.calls if c[0] == "restore"]


def test_skip_rule_apply_touches_nothing() -> None:
    from istio_init import runner

    backend = RecordingBackend({4: ""}, fail_on=None)
    config = from_sources({"skip_rule_apply": "true", "iptables_backend": "legacy", "ipv6": "false"}, environ={})
    logged: list[str] = []
    runner.run(config, logged.append, wrap=lambda chosen: backend)
    assert backend.calls == []
    assert any("--skip-rule-apply" in line for line in logged)
