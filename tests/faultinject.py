"""Runs the real istio-init CLI on a host that fails at a named step (tests only).

`python tests/faultinject.py FAULT ARGS...` is `istio-init ARGS...` on the real
kernel, except that the System below the backends (istio_init/system.py)
fails on purpose:
`after-commit:TABLE` right after the IPv4 commit holding TABLE, `ipv6` right
after an IPv6 commit, `route` at the TPROXY route step (after ::6 went on lo),
`reject:TABLE` adds to the IPv4 changes of TABLE a jump to a chain that does
not exist, which the kernel or the restore tool refuses (the real error path);
`reject:nft` ends the nft transaction with such a jump, and `after-commit:nft`
fails the read-back right after the transaction was committed. The CLI takes
no test hooks: the faulty System is installed as the process's one System.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, ContextManager, Mapping

from istio_init import cli, system
from istio_init.backends.iptables.reconcile import TableChange
from istio_init.errors import ApplyError
from istio_init.model import APPEND, Rule, Step
from istio_init.host.routing import Routing

if TYPE_CHECKING:
    from istio_init.backends.iptables.backend import Tables


class FaultyTables:
    """A backend's real tables, failing after (or refusing a bogus rule in) the named commit."""

    def __init__(self, real: Tables, fault: str) -> None:
        self.real = real
        self.fault = fault
        self.name = real.name

    def session(self) -> ContextManager[None]:
        return self.real.session()

    def save(self, family: int, counters: bool = True) -> str:
        return self.real.save(family, counters)

    def snapshot(self, family: int) -> str:
        return self.real.snapshot(family)

    def restore(self, family: int, saved_blocks: str) -> None:
        self.real.restore(family, saved_blocks)

    def restore_tool(self, family: int) -> str:
        return self.real.restore_tool(family)

    def commit(self, changes: Mapping[int, list[TableChange]]) -> None:
        kind, _, table = self.fault.partition(":")
        if kind == "reject" and 4 in changes:
            changes = {**changes, 4: [_with_bogus_rule(c) if c.table == table and c.steps else c
                                      for c in changes[4]]}
        self.real.commit(changes)
        if kind == "after-commit" and table in [c.table for c in changes.get(4, [])]:
            raise ApplyError(f"table {table}: fault injected ({self.fault})")
        if self.fault == "ipv6" and changes.get(6):
            raise ApplyError(f"table {changes[6][0].table}: fault injected ({self.fault})")


def _with_bogus_rule(change: TableChange) -> TableChange:
    bogus = Step(APPEND, Rule(change.table, change.steps[-1].rule.chain, "NO_SUCH_CHAIN_FAULT"))
    return change._replace(steps=(*change.steps, bogus))


class FaultyNftables:
    """A libnftables context whose transaction gains a jump to no chain (`reject:nft`), or whose first
    read after a committed transaction fails (`after-commit:nft`)."""

    def __init__(self, real: Any, fault: str) -> None:
        self.real = real
        self.fault = fault
        self.committed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def cmd_from_file(self, path: str) -> Any:
        with open(path) as loaded:
            text = loaded.read()
        if self.fault == "reject:nft":
            last = [line for line in text.splitlines() if line.startswith("add rule ")][-1]
            family, table, chain = last.split()[2:5]
            text += f"add rule {family} {table} {chain} counter jump istio-no-such-chain-fault\n"
        fd = os.memfd_create("faulty-nft")
        try:
            os.write(fd, text.encode())
            done = self.real.cmd_from_file(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        self.committed = done[0] == 0
        return done

    def cmd(self, command: str) -> Any:
        if self.fault == "after-commit:nft" and self.committed and command == "list ruleset":
            self.committed = False
            raise ApplyError(f"fault injected ({self.fault})")
        return self.real.cmd(command)


class FaultySystem(system.System):
    """The real host, failing at the step `fault` names."""

    def __init__(self, fault: str) -> None:
        self.fault = fault

    def iptables(self, name: str) -> Tables:
        return FaultyTables(super().iptables(name), self.fault)

    def nftables(self) -> Any:
        return FaultyNftables(super().nftables(), self.fault)

    def add_policy_route(self, family: int, fwmark: int, table: int) -> list[Routing]:
        if self.fault == "route":
            raise ApplyError("fault injected (route)")
        return super().add_policy_route(family, fwmark, table)


if __name__ == "__main__":
    with system.using(FaultySystem(sys.argv[1])):
        cli.main(sys.argv[2:])
