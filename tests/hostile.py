"""The setup of issue 12's reproducers: a pod namespace, the seed rules, exact snapshots.

A pod namespace has `pod0` (one end of a veth pair kept inside it) at
192.0.2.10/24. `snapshot()` is everything a run of istio-init could change,
as bytes: the legacy and nft tables of both families (iptables-save without
its timestamp comments, chain counters zeroed) and the policy rules and routes of both families
(read with pyroute2), so "nothing changed" is one equality.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Iterator

from clirun import clean_environ
from nsutil import Namespace

SEED = ("-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
        "-d", "15090,15021,15020")
POD_ADDRESS = "192.0.2.10/24"
SAVE_TOOLS = ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save", "ip6tables-nft-save")


def pod_namespaces(prefix: str) -> Iterator[Namespace]:
    """A fixture's body: one pod_namespace(prefix), removed when the fixture ends."""
    ns = pod_namespace(prefix)
    try:
        yield ns
    finally:
        ns.remove()


def pod_namespace(prefix: str = "hos") -> Namespace:
    """A fresh namespace with pod0 at 192.0.2.10/24 (remove it with .remove())."""
    from pyroute2 import NetNS

    ns = Namespace.create(prefix)
    try:
        with NetNS(ns.name) as ipr:
            ipr.link("add", ifname="pod0", kind="veth", peer="pod0p")
            index = ipr.link_lookup(ifname="pod0")[0]
            ipr.addr("add", index=index, address="192.0.2.10", prefixlen=24)
            ipr.link("set", index=index, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="pod0p")[0], state="up")
    except BaseException:
        ns.remove()
        raise
    return ns


def istio_init(ns: Namespace, *args: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess:
    """The real CLI in a new process inside the namespace; stdout and stderr as text."""
    return ns.run(sys.executable, "-m", "istio_init", *args, env=clean_environ(env), check=False,
                  timeout=timeout)


_COUNTERS = re.compile(rb" \[\d+:\d+\]$")


def _save(ns: Namespace, tool: str) -> bytes:
    """The tool's text without timestamp comments, and with chain counters zeroed: the
    kernel's own IPv6 neighbour discovery on pod0 counts packets on the policies."""
    out = subprocess.run(["nsenter", f"--net={ns.path}", tool], capture_output=True, check=True, timeout=60)
    return b"\n".join(_COUNTERS.sub(b" [0:0]", line) if line.startswith(b":") else line
                      for line in out.stdout.splitlines() if not line.startswith(b"#"))


def routing(ns: Namespace) -> list[tuple]:
    """The namespace's policy rules and non-main routes, both families, as comparable tuples."""
    from pyroute2 import NetNS

    found: list[tuple] = []
    with NetNS(ns.name) as ipr:
        for family in (2, 10):
            for rule in ipr.get_rules(family=family):
                found.append(("rule", family, rule.get_attr("FRA_TABLE"), rule.get_attr("FRA_FWMARK"),
                              rule.get_attr("FRA_PRIORITY")))
            for route in ipr.get_routes(family=family, table=0):
                table = route.get_attr("RTA_TABLE")
                if table not in (254, 255):  # main and local: the kernel's own
                    found.append(("route", family, table, route["type"], route.get_attr("RTA_DST")))
    return sorted(found, key=repr)


def snapshot(ns: Namespace) -> tuple:
    """Every table of every tool and family, and the routing istio-init could add."""
    return tuple(_save(ns, tool) for tool in SAVE_TOOLS) + (tuple(routing(ns)),)


def one_line_naming(result: subprocess.CompletedProcess, label: str) -> str:
    """Assert the result is a user-error refusal: exit 2, one stderr line naming `label`."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("istio-init: invalid value for "), lines[0]
    assert label in lines[0], (label, lines[0])
    assert result.stdout == ""
    return lines[0]
