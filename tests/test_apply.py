"""Real applies in fresh network namespaces, through every backend (root only).

Every case of the golden table goes through the kernel with libiptc, legacy
iptables-restore and nft iptables-restore, and iptables-save must give back
the golden text. The rest covers what an init container meets in a cluster:
re-runs, changed flags, clean, failures half way, two runs at once, another
namespace, and auto picking the flavour the namespace already uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from appliedns import (BACKENDS, SAVE_TOOL, check_state, exact, expected, istio_init, restore, routing, save,
                       snapshot)
from cases import CASES, UNRELATED_V4, UNRELATED_V6, Case
from clirun import clean_environ
from istio_init.iptables_save.write import split_families
from istio_init.iptables_save.read import normalize
from nsutil import Namespace

pytestmark = pytest.mark.root


# ---- the golden round trip ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_round_trip_rerun_other_flags_clean(netns: Namespace, case: Case, backend: str) -> None:
    args = [*case.args, "--ipv6", "true" if case.ipv6 else "false", "--iptables-backend", backend]
    golden_v4, golden_v6 = (normalize(part) for part in split_families(case.golden.read_text()))
    flavour = SAVE_TOOL[backend]
    fresh_routing = routing(netns)

    first = istio_init(netns, *args, env=case.env)
    assert normalize(save(netns, flavour, 4)) == golden_v4
    assert normalize(save(netns, flavour, 6)) == golden_v6
    printed_v4, printed_v6 = split_families(first.stdout)  # what Istio prints after applying
    assert normalize(printed_v4) == golden_v4 and normalize(printed_v6) == golden_v6
    assert f"iptables backend {backend}" in first.stderr

    before = exact(save(netns, flavour, 4)), exact(save(netns, flavour, 6))
    istio_init(netns, *args, env=case.env)
    assert (exact(save(netns, flavour, 4)), exact(save(netns, flavour, 6))) == before

    # Different flags (the next case of the same family) converge to that case's golden text.
    other = _next_case(case)
    istio_init(netns, *other.args, "--ipv6", "true" if other.ipv6 else "false", "--iptables-backend", backend,
               env=other.env)
    other_v4, other_v6 = (normalize(part) for part in split_families(other.golden.read_text()))
    assert normalize(save(netns, flavour, 4)) == other_v4
    assert normalize(save(netns, flavour, 6)) == other_v6

    istio_init(netns, "clean", "--iptables-backend", backend)
    assert normalize(save(netns, flavour, 4)) == {} and normalize(save(netns, flavour, 6)) == {}
    assert routing(netns) == fresh_routing  # TPROXY rule and route, ::6 on lo: gone


def _next_case(case: Case) -> Case:
    same_family = [c for c in CASES if c.ipv6 == case.ipv6]
    return same_family[(same_family.index(case) + 1) % len(same_family)]


# ---- re-runs with other flags, then clean ---------------------------------------------

FIRST_FLAGS = ["-m", "TPROXY", "-b", "*", "-d", "15020", "-i", "*", "-k", "eth1,eth2", "--redirect-dns",
               "-t", "1338", "-r", "134"]
SECOND_FLAGS = ["-i", "10.0.0.0/8,fd00::/8", "-x", "10.96.0.0/12", "-b", "8080", "-q", "3306"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_different_flags_converge_and_clean_leaves_unrelated_rules(netns: Namespace, backend: str) -> None:
    flavour = SAVE_TOOL[backend]
    restore(netns, flavour, 4, UNRELATED_V4)
    restore(netns, flavour, 6, UNRELATED_V6)
    unrelated = snapshot(netns, flavour)

    istio_init(netns, *FIRST_FLAGS, "--ipv6", "true", "--iptables-backend", backend)
    want_v4, want_v6 = expected(FIRST_FLAGS, ipv6=True)
    check_state(netns, flavour, 4, want_v4, UNRELATED_V4)
    check_state(netns, flavour, 6, want_v6, UNRELATED_V6)
    assert "fwmark 0x53a lookup 134" in netns.run("ip", "rule").stdout

    istio_init(netns, *SECOND_FLAGS, "--ipv6", "true", "--iptables-backend", backend)
    want_v4, want_v6 = expected(SECOND_FLAGS, ipv6=True)
    check_state(netns, flavour, 4, want_v4, UNRELATED_V4)
    check_state(netns, flavour, 6, want_v6, UNRELATED_V6)
    assert "ISTIO_DIVERT" not in save(netns, flavour, 4)
    assert "fwmark" not in netns.run("ip", "rule").stdout  # the earlier TPROXY route went with its rules

    dry = istio_init(netns, "clean", "-n", "--iptables-backend", backend)
    assert "-X ISTIO_OUTPUT" in dry.stdout and "ISTIO_OUTPUT" in save(netns, flavour, 4)
    istio_init(netns, "clean", "--iptables-backend", backend)
    assert snapshot(netns, flavour) == unrelated
    again = istio_init(netns, "clean", "--iptables-backend", backend)
    assert "nothing to remove" in again.stderr


def test_cleanup_only_flag_removes_tproxy_route_and_address(netns: Namespace) -> None:
    istio_init(netns, "-m", "TPROXY", "-b", "80", "-i", "*", "--ipv6", "true")
    assert "::6/128" in netns.run("ip", "-6", "addr", "show", "dev", "lo").stdout
    istio_init(netns, "--cleanup-only")
    assert "ISTIO" not in save(netns, "legacy", 4) + save(netns, "legacy", 6)
    assert "fwmark" not in netns.run("ip", "rule").stdout
    assert netns.run("ip", "route", "show", "table", "133").stdout == ""
    assert "::6/128" not in netns.run("ip", "-6", "addr", "show", "dev", "lo").stdout


def test_skip_rule_apply_changes_nothing(netns: Namespace) -> None:
    before = snapshot(netns, "legacy")
    istio_init(netns, "-i", "*", "-b", "*", "--skip-rule-apply")
    assert snapshot(netns, "legacy") == before


# ---- all-or-nothing -------------------------------------------------------------------

FAULT_FLAGS = ["-m", "TPROXY", "-b", "*", "-i", "*", "-k", "eth1", "--ipv6", "true"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fault", ["after-commit:nat", "ipv6", "route"])
def test_fault_leaves_namespace_as_before(netns: Namespace, backend: str, fault: str) -> None:
    flavour = SAVE_TOOL[backend]
    restore(netns, flavour, 4, UNRELATED_V4)
    restore(netns, flavour, 6, UNRELATED_V6)
    # An earlier run with other flags: the failed run must give its rules back too.
    istio_init(netns, "-i", "10.0.0.0/8", "-b", "80", "--ipv6", "false", "--iptables-backend", backend)
    before = snapshot(netns, flavour)

    failed = istio_init(netns, *FAULT_FLAGS, "--iptables-backend", backend, fault=fault, check=False)
    assert failed.returncode == 1
    message = failed.stderr.strip().splitlines()[-1]
    assert message.startswith("istio-init: ") and "put back" in message
    assert ("route step" in message) if fault == "route" else ("table nat" in message)
    assert snapshot(netns, flavour) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_second_table_names_table_chain_and_rule(netns: Namespace, backend: str) -> None:
    """The kernel (or restore tool) refuses a rule in mangle after nat was committed."""
    flavour = SAVE_TOOL[backend]
    restore(netns, flavour, 4, UNRELATED_V4)
    before = snapshot(netns, flavour)
    failed = istio_init(netns, "-m", "TPROXY", "-b", "*", "-i", "*", "--ipv6", "false", "--iptables-backend",
                        backend, fault="reject:mangle", check=False)
    assert failed.returncode == 1
    message = failed.stderr.strip().splitlines()[-1]
    assert "table mangle, chain OUTPUT" in message and "-A OUTPUT -j NO_SUCH_CHAIN_FAULT" in message
    assert snapshot(netns, flavour) == before


# ---- concurrency ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_two_applies_at_once_end_in_one_rule_set(netns: Namespace, backend: str) -> None:
    flags_a = ["-i", "*", "-b", "*", "--ipv6", "true"]
    flags_b = ["-i", "10.0.0.0/8", "-b", "80", "--ipv6", "true"]
    procs = [subprocess.Popen(["nsenter", f"--net={netns.path}", sys.executable, "-m", "istio_init", *flags,
                               "--iptables-backend", backend], env=clean_environ(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for flags in (flags_a, flags_b)]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    flavour = SAVE_TOOL[backend]
    state = normalize(save(netns, flavour, 4)), normalize(save(netns, flavour, 6))
    assert state in (expected(flags_a[:-2], True), expected(flags_b[:-2], True))


# ---- --network-namespace --------------------------------------------------------------

def test_network_namespace_by_name_changes_only_that_namespace(netns: Namespace) -> None:
    target = Namespace.create()
    try:
        caller_before = snapshot(netns, "legacy")
        istio_init(netns, "-i", "*", "-b", "*", "--ipv6", "false", "--network-namespace", target.name)
        assert normalize(save(target, "legacy", 4)) == expected(["-i", "*", "-b", "*"], False)[0]
        assert snapshot(netns, "legacy") == caller_before
    finally:
        target.remove()


def test_network_namespace_by_proc_path_changes_only_that_namespace(netns: Namespace) -> None:
    sleeper = subprocess.Popen(["unshare", "-n", "sleep", "30"])
    try:
        path = f"/proc/{sleeper.pid}/ns/net"
        deadline = time.monotonic() + 5
        while os.readlink(path) == os.readlink("/proc/self/ns/net") and time.monotonic() < deadline:
            time.sleep(0.01)  # unshare has not switched yet
        caller_before = snapshot(netns, "legacy")
        istio_init(netns, "-i", "*", "--ipv6", "false", "--network-namespace", path, "--iptables-backend", "nft")
        inside = subprocess.run(["nsenter", f"--net={path}", "iptables-nft-save"], capture_output=True, text=True,
                                check=True).stdout
        assert normalize(inside) == expected(["-i", "*"], False)[0]
        assert snapshot(netns, "legacy") == caller_before
        assert normalize(save(netns, "nft", 4)) == {}
    finally:
        sleeper.kill()
        sleeper.wait()


# ---- auto -----------------------------------------------------------------------------

def test_auto_uses_nft_when_the_namespace_has_nft_rules(netns: Namespace) -> None:
    restore(netns, "nft", 4, UNRELATED_V4)
    done = istio_init(netns, "-i", "*", "--ipv6", "false")
    assert "iptables backend nft (auto: the namespace already has iptables-nft tables)" in done.stderr
    check_state(netns, "nft", 4, expected(["-i", "*"], False)[0], UNRELATED_V4)
    assert "ISTIO" not in save(netns, "legacy", 4)


def test_auto_uses_the_legacy_restore_tool_when_the_namespace_has_legacy_rules(netns: Namespace) -> None:
    restore(netns, "legacy", 4, UNRELATED_V4)
    done = istio_init(netns, "-i", "*", "--ipv6", "false")
    assert "iptables backend legacy (auto: legacy tables work" in done.stderr
    check_state(netns, "legacy", 4, expected(["-i", "*"], False)[0], UNRELATED_V4)
    assert save(netns, "nft", 4) == ""
