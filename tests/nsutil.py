"""Network namespaces for tests: create, run a command inside, remove."""

from __future__ import annotations

import itertools
import os
import subprocess
from dataclasses import dataclass

_counter = itertools.count()


@dataclass
class Namespace:
    name: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    @classmethod
    def create(cls, prefix: str = "iit") -> "Namespace":
        from pyroute2 import NetNS, netns

        name = f"{prefix}-{os.getpid()}-{next(_counter)}"
        netns.create(name)
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        return cls(name)

    def remove(self) -> None:
        from pyroute2 import netns

        netns.remove(self.name)

    def run(self, *argv: str, input: str | None = None, check: bool = True,
            env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run argv inside the namespace; text in and out."""
        return subprocess.run(["nsenter", f"--net={self.path}", *argv], input=input, text=True,
                              capture_output=True, check=check, env=env, timeout=timeout)

    def save(self, tool: str = "iptables-legacy-save") -> str:
        return self.run(tool).stdout

    def add_address(self, address: str) -> None:
        """Give the namespace a non-loopback address, on a veth pair kept inside it.

        IPv6 duplicate address detection is off, so the address is usable at once.
        """
        from pyroute2 import NetNS

        with NetNS(self.name) as ns:
            if not ns.link_lookup(ifname="eth0"):
                ns.link("add", ifname="eth0", kind="veth", peer="eth0p")
                self.run("sh", "-c", "echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad")
            index = ns.link_lookup(ifname="eth0")[0]
            ip, prefix = address.split("/")
            ns.addr("add", index=index, address=ip, prefixlen=int(prefix))
            ns.link("set", index=index, state="up")
            ns.link("set", index=ns.link_lookup(ifname="eth0p")[0], state="up")
