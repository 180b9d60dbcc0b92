"""Runs the real istio-init CLI with a fault injected through a wrapper backend (tests only).

`python tests/faultinject.py FAULT ARGS...` is `istio-init ARGS...` except that
the backend the run chooses (or the network steps) fail on purpose:
`after-commit:TABLE` right after the IPv4 family holding TABLE was committed,
`ipv6` after the IPv6 family was committed, `route` after the TPROXY route
step changed something, `reject:TABLE` adds to the IPv4 changes of TABLE a
jump to a chain that does not exist, which the kernel or the restore tool
refuses (the real error path). Production code has no fault hooks: the CLI
takes a backend wrapper and network steps as arguments, and this passes them.
"""

from __future__ import annotations

import sys
from typing import Any

from istio_init import cli, netns
from istio_init.backends.iptables.reconcile import TableChange
from istio_init.errors import ApplyError
from istio_init.model import APPEND, Rule, Step


def wrapper(fault: str) -> Any:
    def wrap(backend: Any) -> Any:
        if backend.name == "nftables":
            return _nft_wrapper(fault, backend)
        base = type(backend)

        class Faulty(base):  # type: ignore[misc, valid-type]
            def decide(self, live, plan, families):  # type: ignore[no-untyped-def]
                changes = super().decide(live, plan, families)
                if fault.startswith("reject:"):
                    table = fault.split(":", 1)[1]
                    changes[4] = [_with_bogus_rule(c) if c.table == table and c.steps else c for c in changes[4]]
                return changes

            def commit_family(self, family: int, changes: list[TableChange]) -> None:
                super().commit_family(family, changes)
                tables = [c.table for c in changes]
                if family == 4 and fault.startswith("after-commit:") and fault.split(":", 1)[1] in tables:
                    raise ApplyError(f"table {fault.split(':', 1)[1]}: fault injected ({fault})")
                if family == 6 and fault == "ipv6":
                    raise ApplyError(f"table {tables[0]}: fault injected ({fault})")

        backend.__class__ = Faulty
        return backend
    return wrap


def _nft_wrapper(fault: str, backend: Any) -> Any:
    """`reject:nft`: the transaction ends with a jump to no chain; `after-commit:nft`: reading back fails."""
    from istio_init.render_nft import FAMILY, TransactionLine

    base = type(backend)

    class Faulty(base):  # type: ignore[misc, valid-type]
        reads = 0

        def transaction(self, plan):  # type: ignore[no-untyped-def]
            text, where = super().transaction(plan)
            if fault == "reject:nft":
                last = next(place for place in reversed(where) if place.rule)
                rule = "counter jump istio-no-such-chain-fault"
                text += f"add rule {FAMILY} {last.table} {last.chain} {rule}\n"
                where = [*where, TransactionLine(last.table, last.chain, rule)]
            return text, where

        def ours(self):  # type: ignore[no-untyped-def]
            self.reads += 1
            if fault == "after-commit:nft" and self.reads == 2:  # the read-back right after the commit
                raise ApplyError(f"fault injected ({fault})")
            return super().ours()

    backend.__class__ = Faulty
    return backend


def _with_bogus_rule(change: TableChange) -> TableChange:
    bogus = Step(APPEND, Rule(change.table, change.steps[-1].rule.chain, "NO_SUCH_CHAIN_FAULT"))
    return change._replace(steps=(*change.steps, bogus))


class FailingRoutes:
    """The real network steps, refusing the TPROXY policy route (after ::6 went on lo)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(netns, name)

    def add_policy_route(self, family: int, fwmark: int, table: int) -> list[netns.Routing]:
        raise ApplyError("fault injected (route)")


if __name__ == "__main__":
    fault, argv = sys.argv[1], sys.argv[2:]
    if fault == "route":
        cli.main(argv, network=FailingRoutes())
    else:
        cli.main(argv, wrap_backend=wrapper(fault))
