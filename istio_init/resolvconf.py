"""The pod's DNS resolvers: the `nameserver` lines of its /etc/resolv.conf.

Current Istio captures DNS only to these addresses (unless --capture-all-dns),
so that a local DNS proxy's own upstream queries do not loop back to the
agent. Read here, not in the planner, so the planner stays pure; the path can
be pointed elsewhere (ISTIO_INIT_RESOLV_CONF) for tests and for runs from the
host on behalf of a pod.
"""

from __future__ import annotations

import ipaddress
import os

PATH_ENV = "ISTIO_INIT_RESOLV_CONF"
DEFAULT_PATH = "/etc/resolv.conf"


def path() -> str:
    return os.environ.get(PATH_ENV) or DEFAULT_PATH


def nameservers(text: str) -> list[str]:
    """The nameserver addresses in file order; lines that are not an IP address are skipped.

    A scoped IPv6 address (`fe80::1%eth0`) cannot be written as an iptables
    match, so it is skipped too, as is anything after the address.
    """
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver" or "%" in words[1]:
            continue
        try:
            found.append(str(ipaddress.ip_address(words[1])))
        except ValueError:
            continue
    return found


def read(file: str | None = None) -> tuple[list[str], str | None]:
    """(resolvers, problem): the problem says why there are none, when there are none."""
    file = file or path()
    try:
        with open(file, encoding="utf-8", errors="replace") as handle:
            servers = nameservers(handle.read())
    except OSError as exc:
        return [], f"cannot read {file}: {exc.strerror or exc}"
    return servers, None if servers else f"{file} lists no nameserver"
