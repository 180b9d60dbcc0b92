"""Running the real istio-init in a test's network namespace, and reading back what it left there.

Shared by the root tests that apply through every iptables backend: the CLI
in a new process inside the namespace (with a fault: through
tests/faultinject.py), the tables each flavour's save tool prints, the
routing pyroute2 reports, and the expected state from a dry run.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

from clirun import clean_environ
from istio_init.iptables_save.read import normalize
from istio_init.iptables_save.write import split_families
from nsutil import Namespace

BACKENDS = ("libiptc", "legacy", "nft")
SAVE_TOOL = {"libiptc": "legacy", "legacy": "legacy", "nft": "nft"}


FAULT_DRIVER = os.path.join(os.path.dirname(__file__), "faultinject.py")


def istio_init(ns: Namespace, *args: str, env: dict[str, str] | None = None,
               check: bool = True, fault: str | None = None) -> subprocess.CompletedProcess:
    """The real CLI, in a new process inside the namespace (with `fault`: through tests/faultinject.py)."""
    entry = [FAULT_DRIVER, fault] if fault else ["-m", "istio_init"]
    done = ns.run(sys.executable, *entry, *args, env=clean_environ(env), check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"istio-init {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done


def save(ns: Namespace, flavour: str, family: int) -> str:
    return ns.save(f"{'ip6' if family == 6 else 'ip'}tables-{flavour}-save")


def restore(ns: Namespace, flavour: str, family: int, text: str) -> None:
    ns.run(f"{'ip6' if family == 6 else 'ip'}tables-{flavour}-restore", "--noflush", input=text)


def exact(text: str) -> str:
    """Save text for byte-for-byte comparison: no comments, counters zeroed, default-empty tables dropped.

    A legacy table, once instantiated in a namespace, cannot be removed again,
    and python-iptables instantiates every table when imported; an instantiated
    empty table (built-in chains only, ACCEPT, no rules) is the same as none.
    """
    blocks, current = [], []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        line = re.sub(r"\[\d+:\d+\]", "[0:0]", line)
        current.append(line)
        if line == "COMMIT":
            body = current[1:-1]
            if any(not re.fullmatch(r":\S+ ACCEPT \[0:0\]", b) for b in body):
                blocks.append("\n".join(current))
            current = []
    return "\n".join(blocks) + "\n"


def expected(args: list[str], ipv6: bool, env: dict[str, str] | None = None) -> tuple[dict, dict]:
    """Normalized (IPv4, IPv6) rule sets of a dry run (golden-checked in test_plan)."""
    from clirun import invoke

    out = invoke([*args, "-n", "--ipv6", "true" if ipv6 else "false"], env)
    assert out.code == 0, out.stderr
    v4, v6 = split_families(out.stdout)
    return normalize(v4), normalize(v6)


def ours_and_theirs(state: dict) -> tuple[dict, dict]:
    """normalize() output split into istio-init's lines and everyone else's (orders kept)."""
    from istio_init.backends.iptables.reconcile import is_ours
    from istio_init.rulesets import owned_chains

    ours: dict[str, list[str]] = {}
    theirs: dict[str, list[str]] = {}
    for table, lines in state.items():
        for line in lines:
            chain = line.split()[1] if line.startswith("-A ") else line[1:].split()[0]
            spec = line.split(" ", 2)[2] if line.startswith("-A ") else ""
            mine = chain in owned_chains(table) or (spec and is_ours(table, chain, spec))
            (ours if mine else theirs).setdefault(table, []).append(line)
    return ours, theirs


def check_state(ns: Namespace, flavour: str, family: int, want: dict, unrelated: str) -> None:
    """Exactly one run's rules (in plan order) and the unrelated rules (in their order)."""
    ours, theirs = ours_and_theirs(normalize(save(ns, flavour, family)))
    assert ours == want
    assert theirs == normalize(unrelated)


def routing(ns: Namespace) -> dict[str, list]:
    """Policy rules, routes of every table and addresses, as pyroute2 reports them."""
    from pyroute2 import NetNS

    def attrs(msg, drop=("RTA_CACHEINFO", "IFA_CACHEINFO", "FRA_PROTOCOL")) -> tuple:
        return tuple(sorted((k, str(v)) for k, v in msg["attrs"] if k not in drop))

    with NetNS(ns.name) as ipr:
        return {
            "rules": sorted(attrs(r) for f in (socket.AF_INET, socket.AF_INET6) for r in ipr.get_rules(family=f)),
            "routes": sorted(attrs(r) + (r["type"], r["scope"]) for f in (socket.AF_INET, socket.AF_INET6)
                             for r in ipr.get_routes(family=f, table=0)),
            "addresses": sorted(attrs(a) + (a["prefixlen"],) for a in ipr.get_addr()),
        }


def snapshot(ns: Namespace, flavour: str) -> tuple[str, str, dict]:
    return exact(save(ns, flavour, 4)), exact(save(ns, flavour, 6)), routing(ns)
