"""SIGKILL mid-apply, then a re-run: the namespace holds exactly one run's rules and one `ip rule`.

An init container can be killed at any instant (OOM, node drain, the kubelet
giving up) and is then simply started again. So a real `istio-init` process
is killed at random points of its apply (a fixed seed, a bounded count),
alternating between two flag sets so a kill can land while one rule set
replaces the other; after each kill the same flags are applied again and
must succeed, and then iptables-save must show exactly that run's rules and
pyroute2 exactly one TPROXY policy rule and one `local default` route.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from clirun import clean_environ
from hostile import istio_init, pod_namespace
from istio_init.iptables_save.read import normalize
from nsutil import Namespace

pytestmark = pytest.mark.root

KILLS_PER_BACKEND = 8
SEED_OF_DELAYS = 12  # issue 12
MARK, TABLE = 1337, 133
FLAG_SETS = (
    ("-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-i", "*", "-x", "", "-b", "*",
     "-d", "15090,15021,15020", "-k", "eth1", "--redirect-dns"),
    ("-p", "15099", "-z", "15006", "-u", "1337,1338", "-m", "TPROXY", "-i", "10.0.0.0/8,198.51.100.0/24",
     "-b", "8080,9090", "-o", "25", "-q", "443"),
)
SAVE = {"libiptc": "iptables-legacy-save", "legacy": "iptables-legacy-save", "nft": "iptables-nft-save"}


def _tproxy_routing(ns: Namespace) -> tuple[int, int]:
    """(policy rules `fwmark MARK lookup TABLE`, `local default` routes in TABLE), IPv4."""
    from pyroute2 import NetNS

    with NetNS(ns.name) as ipr:
        rules = [r for r in ipr.get_rules(family=2)
                 if r.get_attr("FRA_FWMARK") == MARK and r.get_attr("FRA_TABLE") == TABLE]
        routes = [r for r in ipr.get_routes(family=2, table=TABLE) if r.get_attr("RTA_TABLE") == TABLE]
        return len(rules), len(routes)


def _rules(ns: Namespace, backend: str) -> dict[str, list[str]]:
    return normalize(ns.run(SAVE[backend]).stdout)


def _planned(flags: tuple[str, ...]) -> dict[str, list[str]]:
    done = subprocess.run([sys.executable, "-m", "istio_init", *flags, "--ipv6", "false", "-n"],
                          capture_output=True, text=True, env=clean_environ(), timeout=60, check=True)
    return normalize(done.stdout)


def _apply_duration(ns: Namespace, flags: tuple[str, ...], backend: str) -> float:
    start = time.monotonic()
    assert istio_init(ns, *flags, "--iptables-backend", backend).returncode == 0
    return time.monotonic() - start


@pytest.mark.parametrize("backend", ["libiptc", "legacy", "nft"])
def test_sigkill_at_random_points_then_rerun_leaves_one_run(backend: str) -> None:
    planned = [_planned(flags) for flags in FLAG_SETS]
    chance = random.Random(f"{SEED_OF_DELAYS}-{backend}")
    ns = pod_namespace("kill")
    try:
        # Kill points are spread over one whole istio-init process's measured length
        # (start-up included), the shorter of two warm runs, so most land before it ends.
        _apply_duration(ns, FLAG_SETS[0], backend)
        span = min(_apply_duration(ns, FLAG_SETS[1], backend), _apply_duration(ns, FLAG_SETS[0], backend))
        landed = {"during": 0, "after": 0, "not converged": 0}
        for attempt in range(KILLS_PER_BACKEND):
            which = attempt % 2
            flags = FLAG_SETS[which]
            proc = subprocess.Popen(["nsenter", f"--net={ns.path}", sys.executable, "-m", "istio_init", *flags,
                                     "--iptables-backend", backend],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_environ())
            try:
                time.sleep(chance.uniform(0.0, span * 0.9))
                os.kill(proc.pid, signal.SIGKILL)  # nsenter execs: this pid is istio-init itself
            finally:
                code = proc.wait(timeout=60)
            landed["during" if code == -signal.SIGKILL else "after"] += 1
            if _rules(ns, backend) != planned[which] or _tproxy_routing(ns) != (1, 1):
                landed["not converged"] += 1  # the previous rule set, or a mix, until the re-run
            rerun = istio_init(ns, *flags, "--iptables-backend", backend)
            assert rerun.returncode == 0, (attempt, rerun.stderr[-2000:])
            assert _rules(ns, backend) == planned[which], attempt
            assert _tproxy_routing(ns) == (1, 1), attempt
        # most kills must land before the process ends, or the test proves little
        assert landed["during"] >= KILLS_PER_BACKEND // 2, landed
        print(f"{backend}: {landed['during']} of {KILLS_PER_BACKEND} kills landed before the run ended, "
              f"{landed['not converged']} left the namespace not at this run's rules (one run {span * 1000:.0f} ms)")
    finally:
        ns.remove()
