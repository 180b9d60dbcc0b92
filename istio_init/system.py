"""The host below the backends: everything istio-init asks of or changes in a network namespace.

Every kernel interface istio-init uses goes through one `System`: the
iptables tables of each flavour (read with `iptables-save`, changed with
libiptc or `iptables-restore`, put back with `iptables-restore`), the
libnftables context of `--native-nftables`, the netlink questions asked
before choosing a backend (which iptables-nft and native tables exist, which
legacy tables are loaded), the TPROXY policy routing and the `::6` loopback
address, the pod's addresses and capabilities, and istio-init's lock per
namespace. The backends and apply.py decide; a System only does.

Because it is the only thing that touches the kernel, swapping it swaps the
world: tests/fakehost.py holds an in-memory one (the iptables tables evolve
by `reconcile.simulate`, the same simulation the printed tables come from)
so apply, converge, clean, rollback and backend switches run without root,
and tests/faultinject.py wraps the real one to fail at a named step.
`current()` is the one place a run gets its System; nothing in the CLI or the
runner takes a test double.

Imports stay inside the methods: a dry run never builds a System, and an
apply imports only what its steps use. The kernel interfaces themselves are
istio_init/host/ (netlink, addresses, routing, nf_tables' tables, the
namespace, locks) and the backends' tool and library modules.
"""

from __future__ import annotations

from istio_init.records import TYPE_CHECKING  # typing and contextlib are no imports of every start

if TYPE_CHECKING:
    import contextlib
    import ipaddress
    from typing import Any

    from istio_init.backends.iptables.backend import Tables
    from istio_init.host.routing import Removed, Routing


class System:
    """The real host: the kernel of the network namespace this process is in."""

    # ---- the rule stores ---------------------------------------------------------------

    def iptables(self, name: str) -> Tables:
        """The iptables tables one backend works on: "libiptc" (legacy tables, in-process) or a flavour's
        restore tool ("legacy", "nft")."""
        if name == "libiptc":
            from istio_init.backends.iptables.libiptc import LibiptcTables

            return LibiptcTables()
        from istio_init.backends.iptables.restore import RestoreTables

        return RestoreTables(name)

    def nftables(self) -> Any:
        """A libnftables context (python3-nftables' `Nftables`); ApplyError when it cannot be loaded."""
        from istio_init.libnftables import libnftables

        return libnftables()

    # ---- questions asked before choosing (netlink and /proc, no tool started) -------------

    def iptables_nft_tables(self, family: int) -> set[str]:
        """The iptables tables iptables-nft has made here for `family`."""
        from istio_init.host import nft_tables

        return nft_tables.iptables_nft_tables(family)

    def legacy_tables(self, family: int) -> set[str] | None:
        """The legacy tables loaded here for `family`; None when the kernel offers no legacy ip_tables."""
        from istio_init.backends.iptables.tools import LEGACY_TABLE_NAMES

        try:
            with open(LEGACY_TABLE_NAMES[family]) as names:
                return set(names.read().split())
        except FileNotFoundError:
            return None
        except OSError:
            return set()

    def native_nft_tables(self) -> set[str]:
        """istio-init's own `inet istio-proxy-*` tables here (--native-nftables)."""
        from istio_init.host import nft_tables

        return nft_tables.native_nft_tables()

    # ---- TPROXY policy routing and the ::6 loopback address (netlink) -----------------------

    def add_policy_route(self, family: int, fwmark: int, table: int) -> list[Routing]:
        from istio_init.host import routing

        return routing.add_policy_route(family, fwmark, table)

    def remove_routing(self, items: list[Routing], removed: list[Removed] | None = None) -> list[Removed]:
        """Delete istio-init's rules and routes named; each deletion is appended to `removed` as it happens."""
        from istio_init.host import routing

        return routing.remove_routing(items, removed)

    def restore_routing(self, removed: list[Removed]) -> None:
        from istio_init.host import routing

        routing.restore_routing(removed)

    def owned_routing(self, family: int, marks: set[int], tables: set[int]) -> list[Routing]:
        """istio-init's policy rules and local default routes for these marks and tables."""
        from istio_init.host import routing

        return routing.owned_routing(family, marks, tables)

    def routing_present(self, marks: set[int], tables: set[int]) -> bool:
        """Whether any of owned_routing() exists in either family (True: cannot tell)."""
        from istio_init.host import routing

        return routing.routing_present(marks, tables)

    def has_loopback_address(self, address: str) -> bool:
        from istio_init.host import addresses

        return addresses.has_loopback_address(address)

    def add_loopback_address(self, address: str) -> bool:
        from istio_init.host import addresses

        return addresses.add_loopback_address(address)

    def remove_loopback_address(self, address: str) -> bool:
        from istio_init.host import addresses

        return addresses.remove_loopback_address(address)

    def loopback_ipv6_addresses(self) -> set[str]:
        """The IPv6 addresses on lo, as "::6/128"."""
        from istio_init.host import addresses

        return addresses.loopback_ipv6_addresses()

    # ---- the namespace and the process -----------------------------------------------------

    def enter_namespace(self, path: str, label: str) -> None:
        from istio_init.host import namespace

        namespace.enter(path, label)

    def namespace_lock(self) -> contextlib.AbstractContextManager[None]:
        """istio-init's lock of this network namespace, held around read, decide and commit."""
        from istio_init.host import locks

        return locks.namespace_lock()

    def detect_ipv6(self) -> bool:
        from istio_init.host import addresses

        return addresses.detect_ipv6()

    def pod_addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        from istio_init.host import addresses

        return addresses.pod_addresses()

    def has_net_admin(self) -> bool | None:
        from istio_init.host import namespace

        return namespace.has_net_admin()

    def in_initial_namespace(self) -> bool:
        from istio_init.host import namespace

        return namespace.in_initial_namespace()


_current: System | None = None


def current() -> System:
    """The System this process works on: the real host unless a test installed another with `using`."""
    global _current
    if _current is None:
        _current = System()
    return _current


class using:  # noqa: N801  (used as `with system.using(fake):`, like a function)
    """Make `system` the one every run in this process works on, until the block ends (tests' way in)."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.before: System | None = None

    def __enter__(self) -> System:
        global _current
        self.before, _current = _current, self.system
        return self.system

    def __exit__(self, *exc: object) -> None:
        global _current
        _current = self.before
