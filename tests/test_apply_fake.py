"""Apply, converge, clean, rollback after a failure at every step, and backend switches, without root.

Each test runs the real runner (the CLI's `run` and `clean` below click) on
an in-memory host (tests/fakehost.py) installed as the process's System:
only the kernel is simulated, every decision and every rollback is
istio-init's own. The same behaviour is checked against the kernel as root
by test_apply.py, test_apply_safety.py and test_nft_apply.py.
"""

from __future__ import annotations

import pytest

from cases import UNRELATED_V4, UNRELATED_V6
from fakehost import FakeHost
from istio_init import runner, system
from istio_init.iptables_save.read import normalize
from istio_init.config import from_sources
from istio_init.errors import ApplyError
from istio_init.iptables_save.write import render_plan, split_families
from istio_init.rulesets import plan

BACKENDS = ("legacy", "nft", "libiptc", "nftables")  # nftables: --native-nftables
FLAVOUR = {"legacy": "legacy", "libiptc": "legacy", "nft": "nft"}
EARLIER = {"inbound_ports": "80", "service_cidr": "10.0.0.0/8", "ipv6": "true"}
TPROXY = {"inbound_interception_mode": "TPROXY", "inbound_ports": "*", "service_cidr": "*",
          "kube_virt_interfaces": "eth1", "ipv6": "true"}


def _config(flags: dict[str, str], backend: str):
    chosen = {"native_nftables": "true"} if backend == "nftables" else {"iptables_backend": backend}
    return from_sources({**flags, **chosen}, environ={})


def apply(host: FakeHost, flags: dict[str, str], backend: str) -> tuple[str, list[str]]:
    """`istio-init FLAGS --iptables-backend BACKEND` on `host`: what it prints and logs."""
    logged: list[str] = []
    with system.using(host):
        out = runner.run(_config(flags, backend), lambda message, level="info": logged.append(message))
    return out, logged


def clean(host: FakeHost, backend: str = "auto") -> list[str]:
    logged: list[str] = []
    flags = {"tproxy_mark": "1337"}
    with system.using(host):
        runner.clean(_config(flags, backend), lambda message, level="info": logged.append(message))
    return logged


def _unrelated() -> FakeHost:
    return FakeHost({("legacy", 4): UNRELATED_V4, ("legacy", 6): UNRELATED_V6,
                     ("nft", 4): UNRELATED_V4, ("nft", 6): UNRELATED_V6})


def _planned(flags: dict[str, str]) -> list[dict[str, list[str]]]:
    """Each family's tables as the dry run gives them, normalized."""
    return [normalize(text) for text in split_families(render_plan(plan(_config(flags, "legacy"),
                                                                          flags.get("ipv6") == "true")))]


def _ours(host: FakeHost, backend: str) -> object:
    """istio-init's part of the host for one backend (iptables: the tables minus the unrelated ones)."""
    if backend == "nftables":
        return host.state()["nftables"]
    unrelated = {4: normalize(UNRELATED_V4), 6: normalize(UNRELATED_V6)}
    out = {}
    for family in (4, 6):
        tables = normalize(host.text[(FLAVOUR[backend], family)])
        out[family] = {name: [line for line in lines if line not in unrelated[family].get(name, [])]
                       for name, lines in tables.items()}
        out[family] = {name: lines for name, lines in out[family].items() if lines}
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_apply_installs_the_plan_and_prints_it(backend: str) -> None:
    host = FakeHost()
    out, logged = apply(host, TPROXY, backend)
    assert host.routing and host.lo_addresses == ["::6/128"]
    if backend == "nftables":
        assert host.native_nft_tables() == {"istio-proxy-nat", "istio-proxy-mangle"}
        assert out.startswith("add table inet istio-proxy-nat")  # the transaction the kernel accepted
        return
    v4, v6 = _planned(TPROXY)
    assert normalize(host.text[(FLAVOUR[backend], 4)]) == v4
    assert normalize(host.text[(FLAVOUR[backend], 6)]) == v6
    # What is printed is the tables as iptables-save would print them now.
    printed_v4, printed_v6 = split_families(out)
    assert normalize(printed_v4) == v4 and normalize(printed_v6) == v6


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerun_changes_nothing(backend: str) -> None:
    host = _unrelated()
    apply(host, TPROXY, backend)
    made = list(host.steps)
    _, logged = apply(host, TPROXY, backend)
    assert host.steps == made or backend == "nftables"  # nft replaces its tables in one transaction
    if backend != "nftables":
        assert any(line.startswith("no change") for line in logged)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_flags_converge_and_clean_leaves_only_the_unrelated(backend: str) -> None:
    host = _unrelated()
    apply(host, TPROXY, backend)
    apply(host, EARLIER, backend)
    fresh = _unrelated()
    apply(fresh, EARLIER, backend)
    assert _ours(host, backend) == _ours(fresh, backend)
    assert host.routing == []  # the TPROXY routes went with the flags (::6 on lo stays until clean)
    clean(host, "nft" if backend == "nft" else "auto")
    assert host.state() == _unrelated().state()


def _earlier_run(backend: str, earlier_backend: str) -> FakeHost:
    host = _unrelated()
    apply(host, {**EARLIER, "inbound_interception_mode": "TPROXY", "tproxy_route_table": "134"}, earlier_backend)
    host.steps.clear()
    return host


# A run replacing an earlier one with the same backend, and one switching from another backend.
SCENARIOS = [(backend, backend) for backend in BACKENDS] + [
    ("nft", "legacy"), ("legacy", "nft"), ("nftables", "legacy"), ("legacy", "nftables")]


@pytest.mark.parametrize("backend, earlier", SCENARIOS, ids=[f"{b}-after-{e}" for b, e in SCENARIOS])
def test_a_failure_at_any_step_leaves_the_host_as_it_was(backend: str, earlier: str) -> None:
    before = _earlier_run(backend, earlier)
    done = before.copy()
    apply(done, TPROXY, backend)
    assert done.steps, "the run changed nothing, so there is no step to fail"
    for step in done.steps:
        for after in (False, True):
            host = before.copy(fail_at=step, after=after)
            with pytest.raises(ApplyError) as failed:
                apply(host, TPROXY, backend)
            message = str(failed.value)
            assert step in message and ("put back" in message or "nothing had been changed" in message), message
            assert host.state() == before.state(), (step, after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failure_at_any_step_of_clean_leaves_the_host_as_it_was(backend: str) -> None:
    before = _earlier_run(backend, backend)
    done = before.copy()
    clean(done, "nftables" if backend == "nftables" else FLAVOUR[backend])
    assert done.state() == _unrelated().state()
    for step in done.steps:
        host = before.copy(fail_at=step)
        with pytest.raises(ApplyError, match="put back|nothing had been changed"):
            clean(host, "nftables" if backend == "nftables" else FLAVOUR[backend])
        assert host.state() == before.state(), step


@pytest.mark.parametrize("backend, earlier", [("nft", "legacy"), ("legacy", "nft"), ("nftables", "legacy"),
                                              ("legacy", "nftables")])
def test_switching_backend_removes_the_other_backends_rules(backend: str, earlier: str) -> None:
    host = _unrelated()
    apply(host, EARLIER, earlier)
    _, logged = apply(host, TPROXY, backend)
    left = "nftables" if earlier == "nftables" else FLAVOUR[earlier]
    assert any(f"removed istio-init's rules from the {left} tables" in line for line in logged), logged
    fresh = _unrelated()
    apply(fresh, TPROXY, backend)
    assert host.state() == fresh.state()  # one rule set, the new backend's


def test_auto_uses_nft_when_the_namespace_has_nft_tables() -> None:
    host = FakeHost({("nft", 4): "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p udp -m udp --dport 9 -j DROP\nCOMMIT\n"})
    _, logged = apply(host, EARLIER, "auto")
    assert "iptables backend nft (auto: the namespace already has iptables-nft tables)" in logged
    assert normalize(host.text[("legacy", 4)]) == {}
    host = FakeHost()
    _, logged = apply(host, EARLIER, "auto")
    assert any(line.startswith("iptables backend legacy (auto") for line in logged)
    host = FakeHost(legacy=False)
    _, logged = apply(host, EARLIER, "auto")
    assert "iptables backend nft (auto: the kernel offers no legacy ip_tables)" in logged


def test_the_fake_fails_where_told() -> None:
    """The fault injection can fail: a step named in no run fails nothing; a named one fails once."""
    host = FakeHost(fail_at="no such step")
    apply(host, EARLIER, "legacy")
    host = FakeHost(fail_at="legacy IPv4 nat")
    with pytest.raises(ApplyError, match="legacy IPv4 nat: refused"):
        apply(host, EARLIER, "legacy")
    apply(host, EARLIER, "legacy")  # the fault is spent
    assert normalize(host.text[("legacy", 4)]) == _planned(EARLIER)[0]
