"""Applying a plan (and `clean`) all-or-nothing, in the namespace the process is in.

The sequence is: take istio-init's lock for this network namespace, let the
backend converge its tables to the plan (it snapshots, decides and commits,
and undoes its own partial commits), remove istio-init's rules from any other
backend that still holds them (a backend switch: after the new rules are in,
so capture never lapses), then the loopback address and TPROXY routes. If a
later step fails, every earlier step is undone in reverse, so a pod never
starts with half a rule set. The lock, the routes and the addresses are the
System's (system.py), as the backends' tables are; nothing here prints.
"""

from __future__ import annotations

from istio_init import timing
from istio_init.errors import ApplyError, rollback_outcome
from istio_init.model import IPV6_PASSTHROUGH_ADDRESS, RulePlan
from istio_init.records import TYPE_CHECKING, NamedTuple
from istio_init.system import current

if TYPE_CHECKING:
    from typing import Callable, Sequence

    from istio_init.backends.base import Backend, Undo
    from istio_init.host.routing import Removed, Routing
    from istio_init.system import System


class Applied(NamedTuple):
    """What an apply did, for the CLI to report."""

    backend: str
    changed: tuple[str, ...]  # empty: the namespace already held exactly this plan (a converged re-run)
    dump: str  # the touched tables as iptables-save text, as Istio prints after applying
    notes: list[str]


class _NetworkUndo:
    """Routes and addresses changed so far, so they can be undone.

    A plain class, not a dataclass: importing dataclasses is start-up time (docs/performance.md).
    """

    def __init__(self, network: System) -> None:
        self.network = network
        self.added_routing: list[Routing] = []
        self.removed_routing: list[Removed] = []
        self.added_addresses: list[str] = []
        self.removed_addresses: list[str] = []

    def undo(self) -> list[str]:
        problems = []
        steps: list[Callable[[], object]] = [
            lambda: self.network.remove_routing(list(reversed(self.added_routing))),
            lambda: self.network.restore_routing(self.removed_routing),
            *[(lambda a=a: self.network.remove_loopback_address(a)) for a in self.added_addresses],
            *[(lambda a=a: self.network.add_loopback_address(a)) for a in self.removed_addresses]]
        for step in steps:
            try:
                step()
            except Exception as exc:  # keep undoing the rest
                problems.append(str(exc))
        return problems


def _undo_all(undos: Sequence[Undo | _NetworkUndo], error: BaseException) -> ApplyError:
    return rollback_outcome(error, [p for undo in reversed(undos) for p in undo.undo()])


def install(plan: RulePlan, backend: Backend, tproxy: tuple[int, int] = (1337, 133)) -> Applied:
    """Install `plan` through `backend`, converging from whatever is there; remove ours from other backends.

    The other backends are asked under the lock: a concurrent run with
    another backend may have just installed its rules there. `tproxy` is the
    flags' TPROXY mark and route table: policy routing of that shape (and of
    marks istio-init's replaced rules set) is istio-init's, and goes when the
    plan does not want it.
    """
    from istio_init.backends import others_holding_ours

    system = current()
    families = [family.family for family in plan.families()]
    notes: list[str] = []
    with system.namespace_lock():
        timing.mark("istio-init's namespace lock")
        undo = backend.converge(plan, families)
        undos: list[Undo | _NetworkUndo] = [undo]
        marks = set(undo.previous_marks)  # TPROXY marks of rules replaced here or removed elsewhere
        try:
            for other in others_holding_ours(backend.name, [4, 6]):
                removed = other.remove([4, 6])
                undos.append(removed)
                marks |= removed.previous_marks
                notes.append(f"removed istio-init's rules from the {other.name} tables (this run uses "
                             f"{backend.name}, so two rule sets do not capture at once)")
            timing.mark("other backends holding istio-init's rules")
            _apply_routing(plan, marks | {tproxy[0]}, {tproxy[1]}, system, undos)
            timing.mark("routes and addresses")
        except BaseException as exc:  # anything after the first commit rolls everything back
            raise _undo_all(undos, exc) from None
    printed = {f.family: backend.dump(f.family, f.tables()) for f in plan.families()}
    dump = "".join(("# IPv6\n" if family == 6 else "") + text for family, text in printed.items() if text)
    timing.mark("the printed tables")
    network_changed = any(isinstance(u, _NetworkUndo) and (u.added_routing or u.removed_routing or u.added_addresses)
                          for u in undos)
    changed = (*undo.changed, *(("routes and addresses",) if network_changed else ()))
    return Applied(backend.name, changed, dump, notes)


def _apply_routing(plan: RulePlan, marks: set[int], tables: set[int], net: System,
                   undos: list[Undo | _NetworkUndo]) -> None:
    """Addresses and the planned policy routing in; istio-init's policy routing the plan does not want out."""
    from istio_init.host.routing import planned_routing

    wanted = planned_routing(plan.routes)
    marks = marks | {item.fwmark for item in wanted if item.kind == "rule"}
    tables = tables | {item.table for item in wanted}
    if not (plan.loopback_addresses or plan.routes) and not net.routing_present(marks, tables):
        return  # the common case: nothing of ours
    state = _NetworkUndo(net)
    undos.append(state)
    step = "loopback address"
    try:
        for address in plan.loopback_addresses:
            step = f"address {address} on lo"
            if net.add_loopback_address(address):
                state.added_addresses.append(address)
        for route in plan.routes:  # the new routing first, so capture never lapses
            step = f"policy route fwmark {route.fwmark:#x} lookup {route.table}"
            state.added_routing += net.add_policy_route(route.family, route.fwmark, route.table)
        step = "removing policy routing of istio-init's that the plan does not want"
        stale = [item for family in (4, 6) for item in net.owned_routing(family, marks, tables) if item not in wanted]
        if stale:
            net.remove_routing(stale, state.removed_routing)
    except Exception as exc:  # ApplyError, or OSError: netlink's refusal
        raise ApplyError(f"route step, {step}: {exc}") from None


class Cleaned:
    """What `clean` removed (or, with -n, would remove)."""

    def __init__(self) -> None:
        self.changed: list[str] = []
        self.planned: list[str] = []  # -n: restore text and routes that would go


def clean(backends: Sequence[Backend], marks: set[int], dry_run: bool = False,
          tables: frozenset[int] = frozenset({133})) -> Cleaned:
    """Remove istio-init's rules from every backend given, its TPROXY routing and the ::6 address.

    The routing removed is istio-init's shapes (host/routing.py) for `marks` (the
    flags' and those istio-init's removed rules set) and `tables`.
    """
    system = current()
    result = Cleaned()
    families = [4, 6]
    with system.namespace_lock():
        undos: list[Undo | _NetworkUndo] = []
        try:
            for backend in backends:
                if dry_run:
                    result.planned.append(backend.describe_removal(families))
                    continue
                undo = backend.remove(families)
                undos.append(undo)
                result.changed += [f"{backend.name} {c}" for c in undo.changed]
                marks |= undo.previous_marks
            result.changed += _clean_routing(marks, set(tables), dry_run, system, result, undos)
        except BaseException as exc:
            if dry_run:
                raise
            raise _undo_all(undos, exc) from None
    return result


def _clean_routing(marks: set[int], tables: set[int], dry_run: bool, net: System, result: Cleaned,
                   undos: list[Undo | _NetworkUndo]) -> list[str]:
    found = [item for family in (4, 6) for item in net.owned_routing(family, marks, tables)]
    has_address = net.has_loopback_address(IPV6_PASSTHROUGH_ADDRESS)
    gone = [str(item) for item in found] + ([f"address {IPV6_PASSTHROUGH_ADDRESS} on lo"] if has_address else [])
    if dry_run:
        result.planned += [f"# remove {item}\n" for item in gone]
        return []
    state = _NetworkUndo(net)
    undos.append(state)
    try:
        net.remove_routing(found, state.removed_routing)
        if has_address and net.remove_loopback_address(IPV6_PASSTHROUGH_ADDRESS):
            state.removed_addresses.append(IPV6_PASSTHROUGH_ADDRESS)
    except Exception as exc:  # OSError: netlink's refusal
        raise ApplyError(f"clean: removing routes or the ::6 address: {exc}") from None
    return gone
