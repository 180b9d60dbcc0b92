"""`istio-init check` against real namespaces, through every backend (root only).

Right after an apply, check must say "in sync" (exit 0) for every golden case
and backend. After each kind of drift an operator meets (a flushed chain, a
deleted rule, two rules swapped, a foreign rule in our chain, the TPROXY
route gone, the whole namespace cleaned) it must exit 1 and name exactly
that change, in text and in JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cases import CASES, SEED_ARGS, UNRELATED_V4, UNRELATED_V6, Case
from cases_current import CURRENT_CASES, RULES, CurrentCase
from clirun import clean_environ, given
from istio_init.config import from_sources
from istio_init.check import Difference, chains_from_plan
from istio_init.rulesets import plan
from nsutil import Namespace

pytestmark = pytest.mark.root

BACKENDS = ("libiptc", "legacy", "nft")
FLAVOUR = {"libiptc": "legacy", "legacy": "legacy", "nft": "nft"}
TPROXY_ARGS = ("-m", "TPROXY", "-b", "*", "-d", "15020", "-i", "*")
FLAGS = SEED_ARGS[1:]  # the seed's flags without the `istio-iptables` word only `run` accepts


# istio-init's lock and the xtables lock are one file per machine; other test runs holding them
# (in other namespaces) must not stall these tests.
LOCK_ENV: dict[str, str] = {}


@pytest.fixture(autouse=True, scope="module")
def _private_locks(tmp_path_factory: pytest.TempPathFactory) -> None:
    locks = tmp_path_factory.mktemp("locks")
    LOCK_ENV.update(ISTIO_INIT_LOCKFILE=str(locks / "istio-init.lock"), XTABLES_LOCKFILE=str(locks / "xtables.lock"))


def istio_init(ns: Namespace, *args: str, env: dict[str, str] | None = None, code: int | None = 0):
    done = ns.run(sys.executable, "-m", "istio_init", *args, env=clean_environ({**LOCK_ENV, **(env or {})}),
                  check=False)
    if code is not None and done.returncode != code:
        raise AssertionError(f"istio-init {' '.join(args)}: exit {done.returncode}, wanted {code}: "
                             f"{done.stdout}{done.stderr}")
    return done


def tool(ns: Namespace, flavour: str, family: int, *args: str) -> None:
    ns.run(f"{'ip6' if family == 6 else 'ip'}tables-{flavour}", *args, env=clean_environ(LOCK_ENV))


def pinned(args: tuple[str, ...], ipv6: bool, backend: str) -> list[str]:
    return [*(a for a in args if a != "istio-iptables"), "--ipv6", "true" if ipv6 else "false", "--iptables-backend", backend]


def differences(ns: Namespace, args: list[str], env: dict[str, str] | None = None) -> list[Difference]:
    """check's differences, from its JSON; asserts the text output names the same ones."""
    text = istio_init(ns, "check", *args, env=env, code=1).stdout.splitlines()
    data = json.loads(istio_init(ns, "check", *args, "--json", env=env, code=1).stdout)
    found = [Difference(**d) for d in data["differences"]]
    assert data["in_sync"] is False
    assert text[1:] == [d.line() for d in found]
    return found


def planned_chains(args: tuple[str, ...], ipv6: bool = False, family: int = 4) -> dict:

    rule_plan = plan(from_sources(given(args), environ={}), ipv6)
    return chains_from_plan(rule_plan.ipv6 if family == 6 else rule_plan.ipv4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_in_sync_right_after_an_apply(netns: Namespace, case: Case, backend: str) -> None:
    args = pinned(case.args, case.ipv6, backend)
    istio_init(netns, *args, env=case.env)
    done = istio_init(netns, "check", *args, env=case.env)
    assert done.stdout.startswith("istio-init check: in sync") and done.stdout.count("\n") == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CURRENT_CASES, ids=lambda c: c.name)
def test_current_rule_set_in_sync_right_after_an_apply(netns: Namespace, case: CurrentCase, backend: str,
                                                       tmp_path: Path) -> None:
    """Istio's 27 capture cases (raw DNS zones, owner groups, TPROXY in both families) with every backend."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(case.resolv_conf())
    env = {**case.env, "ISTIO_INIT_RESOLV_CONF": str(resolv)}
    args = [*case.argv(dry_run=False), "--iptables-backend", backend]
    istio_init(netns, *args, env=env)
    done = istio_init(netns, "check", *args, env=env)
    assert done.stdout.startswith("istio-init check: in sync") and done.stdout.count("\n") == 1


def test_current_rule_set_drift_in_raw_and_an_ipv6_tproxy_route(netns: Namespace, tmp_path: Path) -> None:
    """The current rule set's own places: a DNS conntrack-zone rule in raw, and the IPv6 TPROXY route."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\n")
    env = {"ISTIO_INIT_RESOLV_CONF": str(resolv)}
    args = [*RULES, "-m", "TPROXY", "-b", "*", "-i", "*", "--redirect-dns", "--ipv6", "true",
            "--iptables-backend", "legacy"]
    istio_init(netns, *args, env=env)
    tool(netns, "legacy", 4, "-t", "raw", "-D", "ISTIO_OUTPUT_DNS", "2")
    netns.run("ip", "-6", "route", "del", "local", "::/0", "dev", "lo", "table", "133")
    found = differences(netns, args, env)
    assert found == [
        Difference("missing", "rule", "-p udp -m udp --sport 15053 -m owner --uid-owner 1337 -j CT --zone 2",
                   "legacy", 4, "raw", "ISTIO_OUTPUT_DNS", 2),
        Difference("missing", "routing", "ip -6 route local ::/0 dev lo table 133", family=6),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_and_user_rules(netns: Namespace, backend: str) -> None:
    """check --iptables-backend auto finds the flavour the rules are in; the user's rules are no drift."""
    flavour = FLAVOUR[backend]
    netns.run(f"iptables-{flavour}-restore", "--noflush", input=UNRELATED_V4)
    netns.run(f"ip6tables-{flavour}-restore", "--noflush", input=UNRELATED_V6)
    istio_init(netns, *pinned(SEED_ARGS, True, backend))
    tool(netns, flavour, 4, "-t", "nat", "-I", "OUTPUT", "1", "-p", "tcp", "--dport", "9", "-j", "ACCEPT")
    data = json.loads(istio_init(netns, "check", *FLAGS, "--ipv6", "true", "--json").stdout)
    assert data["in_sync"] is True and data["differences"] == [] and data["flavour"] == flavour
    other = "nft" if flavour == "legacy" else "legacy"
    found = differences(netns, [*FLAGS, "--ipv6", "true", "--iptables-backend", other])
    assert {(d.kind, d.flavour) for d in found} == {("missing", other)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flushed_istio_output(netns: Namespace, backend: str) -> None:
    args = pinned(SEED_ARGS, False, backend)
    istio_init(netns, *args)
    tool(netns, FLAVOUR[backend], 4, "-t", "nat", "-F", "ISTIO_OUTPUT")
    planned = planned_chains(SEED_ARGS)["nat"]["ISTIO_OUTPUT"]
    assert [(d.kind, d.what, d.table, d.chain, d.position, d.text) for d in differences(netns, args)] == [
        ("missing", "rule", "nat", "ISTIO_OUTPUT", n, spec) for n, spec in enumerate(planned, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_rule_deleted(netns: Namespace, backend: str) -> None:
    args = pinned(SEED_ARGS, True, backend)
    istio_init(netns, *args)
    tool(netns, FLAVOUR[backend], 6, "-t", "nat", "-D", "ISTIO_OUTPUT", "4")
    assert differences(netns, args) == [Difference(
        "missing", "rule", "-m owner --uid-owner 1337 -j RETURN", FLAVOUR[backend], 6, "nat", "ISTIO_OUTPUT", 4)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_rules_swapped(netns: Namespace, backend: str) -> None:
    args = pinned(SEED_ARGS, False, backend)
    istio_init(netns, *args)
    flavour = FLAVOUR[backend]
    tool(netns, flavour, 4, "-t", "nat", "-D", "ISTIO_INBOUND", "3")  # --dport 15090, now after 15021
    tool(netns, flavour, 4, "-t", "nat", "-I", "ISTIO_INBOUND", "4", "-p", "tcp", "-m", "tcp", "--dport", "15090",
         "-j", "RETURN")
    assert differences(netns, args) == [
        Difference("misordered", "rule", "-p tcp -m tcp --dport 15021 -j RETURN", flavour, 4, "nat",
                   "ISTIO_INBOUND", 3, 4),
        Difference("misordered", "rule", "-p tcp -m tcp --dport 15090 -j RETURN", flavour, 4, "nat",
                   "ISTIO_INBOUND", 4, 3),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_foreign_rule_first_in_istio_inbound(netns: Namespace, backend: str) -> None:
    args = pinned(SEED_ARGS, False, backend)
    istio_init(netns, *args)
    flavour = FLAVOUR[backend]
    tool(netns, flavour, 4, "-t", "nat", "-I", "ISTIO_INBOUND", "1", "-p", "tcp", "--dport", "8080", "-j", "ACCEPT")
    assert differences(netns, args) == [Difference(
        "extra", "rule", "-p tcp -m tcp --dport 8080 -j ACCEPT", flavour, 4, "nat", "ISTIO_INBOUND", 1)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_tproxy_route_removed(netns: Namespace, backend: str) -> None:
    args = pinned(TPROXY_ARGS, False, backend)
    istio_init(netns, *args)
    istio_init(netns, "check", *args)
    netns.run("ip", "route", "del", "local", "default", "dev", "lo", "table", "133")
    assert differences(netns, args) == [
        Difference("missing", "routing", "ip route local default dev lo table 133", family=4)]
    netns.run("ip", "rule", "del", "fwmark", "0x539", "lookup", "133")
    assert [d.text for d in differences(netns, args)] == [
        "ip route local default dev lo table 133", "ip rule fwmark 0x539 lookup 133"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_namespace_cleaned(netns: Namespace, backend: str) -> None:
    args = pinned(TPROXY_ARGS, True, backend)
    istio_init(netns, *args)
    istio_init(netns, "check", *args)
    istio_init(netns, "clean", "--iptables-backend", backend)
    flavour = FLAVOUR[backend]
    want = set()
    for family in (4, 6):
        for table, chains in planned_chains(TPROXY_ARGS, True, family).items():
            for chain, specs in chains.items():
                if chain.startswith("ISTIO_"):
                    want.add(("missing", "chain", flavour, family, table, chain, None, chain))
                want |= {("missing", "rule", flavour, family, table, chain, n, spec)
                         for n, spec in enumerate(specs, 1)}
    want |= {("missing", "routing", None, 4, None, None, None, text)
             for text in ("ip rule fwmark 0x539 lookup 133", "ip route local default dev lo table 133")}
    want.add(("missing", "address", None, None, None, None, None, "::6/128 on lo"))
    found = differences(netns, args)
    assert len(found) == len(want)
    assert {(d.kind, d.what, d.flavour, d.family, d.table, d.chain, d.position, d.text) for d in found} == want


def test_network_namespace_from_outside_and_bad_flags(netns: Namespace) -> None:
    """A debug container checks a pod's namespace by name; a bad flag is exit 2 and one line."""
    import subprocess

    istio_init(netns, *SEED_ARGS)
    run = [sys.executable, "-m", "istio_init", "check", *FLAGS, "--network-namespace", netns.name]
    done = subprocess.run(run, capture_output=True, text=True, env=clean_environ(LOCK_ENV), timeout=60)
    assert done.returncode == 0 and "in sync" in done.stdout, done.stderr
    bad = subprocess.run([*run, "-p", "abc"], capture_output=True, text=True, env=clean_environ(LOCK_ENV), timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "-p/--envoy-port" in bad.stderr


def test_check_changes_nothing_and_needs_no_writable_lock(netns: Namespace) -> None:
    """On a fresh namespace check reports everything missing and creates no table, route or address."""
    def state() -> tuple:
        return tuple(netns.run(t).stdout for t in ("iptables-legacy-save", "ip6tables-legacy-save",
                                                    "iptables-nft-save", "ip6tables-nft-save")) + (
            netns.run("ip", "rule").stdout, netns.run("ip", "-6", "addr").stdout)

    before = state()
    found = differences(netns, [*FLAGS, "-m", "TPROXY", "--ipv6", "true"])
    assert {d.kind for d in found} == {"missing"} and any(d.what == "routing" for d in found)
    assert state() == before
    istio_init(netns, *FLAGS)
    read_only = {"ISTIO_INIT_LOCKFILE": "/proc/istio-init.lock"}  # cannot be created, as on a read-only /run
    assert "in sync" in istio_init(netns, "check", *FLAGS, env=read_only).stdout


def test_a_save_tool_that_fails_is_exit_3_and_one_line(netns: Namespace, tmp_path: Path) -> None:
    """The save tools run while check plans: one that fails is still "cannot read the rules", exit 3."""
    import os

    istio_init(netns, *FLAGS)
    fake = tmp_path / "iptables-legacy-save"
    fake.write_text("#!/bin/sh\necho 'no tables today' >&2\nexit 4\n")
    fake.chmod(0o755)
    done = istio_init(netns, "check", *FLAGS, env={"PATH": f"{tmp_path}:{os.environ['PATH']}"}, code=3)
    assert done.stdout == "" and done.stderr.count("\n") == 1
    assert "cannot read the rules: iptables-legacy-save failed: no tables today" in done.stderr
