"""Which policy rules and routes are istio-init's (issue 19, findings 2 and 3).

istio-init's policy routing is exactly what a rule set plans: `fwmark MARK
lookup TABLE` (mask all ones, no other selector; no priority is planned) and
`local default dev lo table TABLE`, for the flags' TPROXY mark and route table
(and marks istio-init's replaced rules set). `clean` used to delete any rule
with the mark and every local default route of its table (a user's `fwmark
1337 lookup 200` and its route), and a REDIRECT run never removed a stale
TPROXY rule and route, which `check` called "in sync". Route removals are now
undone like every other change.
"""

from __future__ import annotations

import subprocess
from typing import Iterator, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakehost import FakeHost
from hostile import istio_init, pod_namespaces
from istio_init import apply, system
from istio_init.errors import ApplyError
from istio_init.host.routing import Routing
from nsutil import Namespace

TPROXY = ("-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-i", "*", "-b", "*")
REDIRECT = ("-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*")
FULL = 0xFFFFFFFF


class Rule(NamedTuple):
    """A policy rule as the test sees it: what `ip rule` was given."""

    mark: int
    mask: int
    table: int
    priority: int | None
    selector: str  # "" or extra `ip rule` words (iif, from, to)

    def argv(self) -> list[str]:
        mark = f"{self.mark:#x}" + ("" if self.mask == FULL else f"/{self.mask:#x}")
        return ["rule", "add", "fwmark", mark, *self.selector.split(), "lookup", str(self.table),
                *(["priority", str(self.priority)] if self.priority else [])]

    def ours(self, mark: int = 1337, table: int = 133) -> bool:
        """The shape a rule set plans, for the flags' mark and table (any priority)."""
        return self.mark == mark and self.mask == FULL and self.table == table and not self.selector


def _ip(ns: Namespace, *argv: str, family: str = "-4") -> str:
    """`ip` in the namespace; a table that does not exist lists nothing (ip exits 2 for it)."""
    return ns.run("ip", family, *argv, check=argv[:1] != ("route",) or argv[1:2] != ("show",)).stdout


def _rules(ns: Namespace) -> list[str]:
    return [line.split(":", 1)[1].strip() + f" @{line.split(':')[0]}"
            for line in (_ip(ns, "rule") + _ip(ns, "rule", family="-6")).splitlines() if "fwmark" in line]


def _routes(ns: Namespace, table: int) -> list[str]:
    return sorted(_ip(ns, "route", "show", "table", str(table)).splitlines()
                  + _ip(ns, "route", "show", "table", str(table), family="-6").splitlines())


# ---- the reproducers -------------------------------------------------------------------

@pytest.mark.root
def test_clean_removes_only_istio_inits_policy_routing(pod: Namespace) -> None:
    assert istio_init(pod, *TPROXY).returncode == 0
    _ip(pod, "rule", "add", "fwmark", "1337", "lookup", "200")
    _ip(pod, "route", "add", "local", "default", "dev", "lo", "table", "200")
    _ip(pod, "rule", "add", "fwmark", "0x539/0xffff", "lookup", "main")
    _ip(pod, "route", "add", "198.51.100.0/24", "dev", "lo", "table", "133")  # the user's, in our table
    users_rules = [r for r in _rules(pod) if "lookup 133" not in r]
    cleaned = istio_init(pod, "clean")
    assert cleaned.returncode == 0, cleaned.stderr
    assert _rules(pod) == users_rules
    assert _routes(pod, 200) == ["local default dev lo scope host "]
    assert _routes(pod, 133) == ["198.51.100.0/24 dev lo scope link "]


@pytest.mark.root
def test_a_new_tproxy_mark_leaves_a_users_rule_with_the_old_mark(pod: Namespace) -> None:
    assert istio_init(pod, *TPROXY).returncode == 0
    _ip(pod, "rule", "add", "fwmark", "1337", "lookup", "300")
    rerun = istio_init(pod, *TPROXY, "-t", "1338")
    assert rerun.returncode == 0, rerun.stderr
    rules = _rules(pod)
    assert [r for r in rules if "lookup 300" in r] == [next(r for r in rules if "lookup 300" in r)]
    assert not any("fwmark 0x539 lookup 133" in r for r in rules), rules
    assert sum("fwmark 0x53a lookup 133" in r for r in rules) == 1, rules


@pytest.mark.root
def test_stale_tproxy_routing_is_reported_and_removed_by_a_re_run(pod: Namespace) -> None:
    """After a REDIRECT apply, a rule and route of istio-init's shape (left by a killed switch) are extra."""
    assert istio_init(pod, *REDIRECT).returncode == 0
    _ip(pod, "rule", "add", "fwmark", "1337", "lookup", "133")
    _ip(pod, "route", "add", "local", "default", "dev", "lo", "table", "133")
    drift = istio_init(pod, "check", *REDIRECT)
    assert drift.returncode == 1, drift.stdout + drift.stderr
    assert "extra      routing ip rule fwmark 0x539 lookup 133" in drift.stdout
    assert "extra      routing ip route local default dev lo table 133" in drift.stdout
    assert istio_init(pod, *REDIRECT).returncode == 0
    assert _rules(pod) == [] and _routes(pod, 133) == []
    assert istio_init(pod, "check", *REDIRECT).returncode == 0


@pytest.mark.root
@pytest.mark.parametrize("table", ["133", "1000"])
def test_the_rule_and_route_as_the_kernel_holds_them(pod: Namespace, table: str) -> None:
    """Priority 32000, istio-init's protocol 73 on both, a table id above 255 kept whole; clean takes both."""
    assert istio_init(pod, *TPROXY, "-r", table).returncode == 0
    assert _rules(pod) == [f"from all fwmark 0x539 lookup {table} proto 73 @32000"]
    assert _routes(pod, int(table)) == ["local default dev lo proto 73 scope host "]
    assert istio_init(pod, "clean", "-r", table).returncode == 0
    assert _rules(pod) == [] and _routes(pod, int(table)) == []


@pytest.mark.root
def test_switching_tproxy_to_redirect_removes_the_routing(pod: Namespace) -> None:
    assert istio_init(pod, *TPROXY).returncode == 0
    assert len(_rules(pod)) == 1
    assert istio_init(pod, *REDIRECT).returncode == 0
    assert _rules(pod) == [] and _routes(pod, 133) == []


# ---- every mark, mask, table, priority and selector ----------------------------------------------

_RULES = st.builds(Rule, st.sampled_from([1337, 1338, 0x539 | 0x10000]), st.sampled_from([FULL, 0xFFFF, 0xFF0]),
                   st.sampled_from([133, 200, 254]), st.sampled_from([None, 100, 32000, 32765]),
                   st.sampled_from(["", "iif lo", "from 192.0.2.0/24", "to 198.51.100.0/24"]))


@pytest.fixture(scope="module")
def routing_ns() -> Iterator[Namespace]:
    yield from pod_namespaces("prp")


@pytest.mark.root
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(_RULES, min_size=1, max_size=4, unique_by=lambda r: (r.mark, r.mask, r.table, r.selector)),
       st.booleans(), st.sampled_from([("1337", "133"), ("1338", "200")]))
def test_clean_removes_exactly_the_planned_shape(routing_ns: Namespace, rules: list[Rule], with_route: bool,
                                                 flags: tuple[str, str]) -> None:
    ns = routing_ns
    mark, table = int(flags[0]), int(flags[1])
    for rule in rules:
        ns.run("ip", *rule.argv())
    for user_table in (200, 300):
        ns.run("ip", "route", "replace", "local", "default", "dev", "lo", "table", str(user_table))
    if with_route:
        ns.run("ip", "route", "replace", "local", "default", "dev", "lo", "table", "133")
    try:
        cleaned = istio_init(ns, "clean", "-t", flags[0], "-r", flags[1])
        assert cleaned.returncode == 0, cleaned.stderr
        left = [rule for rule in rules if not rule.ours(mark, table)]
        assert len(_rules(ns)) == len(left), (rules, _rules(ns))
        for rule in left:  # each stays, with its own priority
            listed = [r for r in _rules(ns) if f"lookup {'main' if rule.table == 254 else rule.table}" in r]
            assert any((rule.priority is None or r.endswith(f"@{rule.priority}")) for r in listed), (rule, listed)
        assert (_routes(ns, 133) == []) == (not with_route or table == 133), _routes(ns, 133)
        assert _routes(ns, 300) != []  # never the flags' table: never ours
        assert (_routes(ns, 200) == []) == (table == 200)
    finally:
        subprocess.run(["ip", "-n", ns.name, "-4", "rule", "flush"], check=False)  # back to the default rules
        subprocess.run(["ip", "-n", ns.name, "rule", "add", "from", "all", "lookup", "main", "priority", "32766"],
                       check=False)
        subprocess.run(["ip", "-n", ns.name, "rule", "add", "from", "all", "lookup", "default", "priority",
                        "32767"], check=False)
        for user_table in (133, 200, 300):
            subprocess.run(["ip", "-n", ns.name, "route", "flush", "table", str(user_table)], check=False)


# ---- route removals are undone like every other change (no kernel needed) --------------------------

def _host(fail_at: str | None = None) -> FakeHost:
    """The in-memory host (tests/fakehost.py) with istio-init's TPROXY routing and ::6 on lo."""
    host = FakeHost(fail_at=fail_at)
    host.routing = [Routing("rule", 4, 1337, 133), Routing("route", 4, 0, 133)]
    host.lo_addresses = ["::6/128"]
    return host


@pytest.mark.parametrize("fail_at", ["remove address ::6/128 on lo", "remove ip route local default dev lo table 133"],
                         ids=["address", "second removal"])
def test_a_failed_clean_puts_the_removed_routing_back(fail_at: str) -> None:
    host = _host(fail_at)
    before = host.state()
    with system.using(host), pytest.raises(ApplyError) as raised:
        apply.clean([], {1337}, tables=frozenset({133}))
    assert "everything changed in this run was put back" in str(raised.value)
    assert host.state() == before


def test_a_clean_without_failure_removes_the_routing_and_the_address() -> None:
    host = _host()
    with system.using(host):
        result = apply.clean([], {1337}, tables=frozenset({133}))
    assert host.routing == [] and host.lo_addresses == []
    assert result.changed == ["ip rule fwmark 0x539 lookup 133", "ip route local default dev lo table 133",
                              "address ::6/128 on lo"]


# ---- a switch to REDIRECT killed at any moment: the re-run removes the TPROXY routing --------------

@pytest.mark.root
@pytest.mark.parametrize("backend", [("--iptables-backend", "legacy"), ("--native-nftables",)], ids=["legacy", "nft"])
@pytest.mark.parametrize("delay", [0.1, 0.25, 0.4])
def test_a_killed_switch_to_redirect_converges_without_tproxy_routing(pod: Namespace, backend: tuple[str, ...],
                                                                      delay: float) -> None:
    """The rules may be replaced before the kill and the routing not yet removed: a re-run finds it."""
    import signal
    import sys
    import time

    from clirun import clean_environ

    assert istio_init(pod, *TPROXY, *backend).returncode == 0
    killed = subprocess.Popen(["nsenter", f"--net={pod.path}", sys.executable, "-m", "istio_init", *REDIRECT,
                               *backend], env=clean_environ(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(delay)
    killed.send_signal(signal.SIGKILL)  # nsenter execs the interpreter: this is the apply itself
    killed.wait(timeout=30)
    assert istio_init(pod, *REDIRECT, *backend).returncode == 0
    assert _rules(pod) == [] and _routes(pod, 133) == []
    check = istio_init(pod, "check", *REDIRECT, *backend)
    assert check.returncode == 0, check.stdout
