"""`check`, `trace --live` and `graph --live` read the same store (issue 19, finding 8; issue 20).

With istio-init's rules left in both iptables flavours (a run killed during a
backend switch), `trace --live` used to walk iptables-legacy (the first
flavour that held rules of ours) while `check` and `graph` preferred nft, so
`trace` explained one rule set while `check` judged the other. All three now
read through installed.py and use its one policy.
"""

from __future__ import annotations

import json

import pytest

from hostile import SEED, istio_init
from nsutil import Namespace

OTHER = tuple("15099" if arg == "15001" else arg for arg in SEED)  # the same flags, another outbound port


def _load_nft_by_hand(ns: Namespace, args: tuple[str, ...]) -> None:
    """Put `args`' rules into iptables-nft without istio-init's backend switch (which would clean legacy)."""
    dry = istio_init(ns, *args, "-n", "--ipv6", "false")
    assert dry.returncode == 0, dry.stderr
    ns.run("iptables-nft-restore", "--noflush", input=dry.stdout)


def _store_seen(ns: Namespace, *backend: str) -> tuple[str, str, str]:
    """(check's flavour, the tool trace --live read, the port graph --live shows) for the seed's flags."""
    check = istio_init(ns, "check", *SEED, *backend, "--json")
    assert check.returncode in (0, 1), check.stderr
    checked = json.loads(check.stdout)["flavour"]
    trace = istio_init(ns, "trace", *SEED, *backend, "--live", "--json", "--direction", "out",
                       "--dst", "198.51.100.1", "--dport", "80")
    assert trace.returncode == 0, trace.stderr
    traced = json.loads(trace.stdout)["rules"]
    graph = istio_init(ns, "graph", *SEED, *backend, "--live", "--table", "nat")
    assert graph.returncode == 0, graph.stderr
    ports = {port for port in ("15001", "15099") if f"--to-ports {port}" in graph.stdout}
    assert len(ports) == 1, graph.stdout
    return checked, traced, ports.pop()


@pytest.mark.root
def test_leftovers_in_both_flavours_are_read_from_one_store(pod: Namespace) -> None:
    assert istio_init(pod, *SEED, "--iptables-backend", "legacy").returncode == 0
    _load_nft_by_hand(pod, OTHER)
    checked, traced, port = _store_seen(pod)
    # auto: an apply would use nft (it holds iptables-nft tables) and keep those rules; all three read them.
    assert (checked, traced, port) == ("nft", "live (iptables-nft-save)", "15099")
    # The other flavour's rules of istio-init are extra for check, which names them.
    check = istio_init(pod, "check", *SEED)
    assert check.returncode == 1 and "iptables-legacy nat ISTIO_OUTPUT" in check.stdout, check.stdout
    # An explicit backend names the store for all three.
    assert _store_seen(pod, "--iptables-backend", "legacy") == ("legacy", "live (iptables-legacy-save)", "15001")
    assert _store_seen(pod, "--iptables-backend", "nft") == ("nft", "live (iptables-nft-save)", "15099")


@pytest.mark.root
def test_rules_only_in_legacy_are_read_there_even_beside_foreign_nft_tables(pod: Namespace) -> None:
    assert istio_init(pod, *SEED, "--iptables-backend", "legacy").returncode == 0
    pod.run("iptables-nft", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT")
    assert _store_seen(pod) == ("legacy", "live (iptables-legacy-save)", "15001")
    assert istio_init(pod, "check", *SEED).returncode == 0


@pytest.mark.root
@pytest.mark.parametrize("foreign_nft", [False, True])
def test_the_store_read_is_the_one_an_apply_wrote(pod: Namespace, foreign_nft: bool) -> None:
    """auto: apply's choice (backends.choose) and the readers' store (installed.py) agree."""
    if foreign_nft:
        pod.run("iptables-nft", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT")
    applied = istio_init(pod, *SEED)
    assert applied.returncode == 0, applied.stderr
    chosen = "nft" if "iptables backend nft" in applied.stderr else "legacy"
    assert chosen == ("nft" if foreign_nft else "legacy"), applied.stderr
    assert _store_seen(pod) == (chosen, f"live (iptables-{chosen}-save)", "15001")
