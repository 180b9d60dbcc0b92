"""Applying a plan (and `clean`) all-or-nothing, in the namespace the process is in.

The sequence is: take istio-init's lock for this network namespace, let the
backend converge its tables to the plan (it snapshots, decides and commits,
and undoes its own partial commits), remove istio-init's rules from any other
backend that still holds them (a backend switch: after the new rules are in,
so capture never lapses), then the loopback address and TPROXY routes. If a
later step fails, every earlier step is undone in reverse, so a pod never
starts with half a rule set. The backend and the network steps are passed in,
so tests hand in their own; nothing here prints.
"""

from __future__ import annotations

from istio_init import locks, timing
from istio_init.errors import ApplyError
from istio_init.model import IPV6_PASSTHROUGH_ADDRESS, RulePlan
from istio_init.records import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import contextlib
    from types import ModuleType
    from typing import Any, Callable, Sequence

    from istio_init.backends.base import Backend, Undo
    from istio_init.netns import Routing

    Lock = Callable[[], contextlib.AbstractContextManager[None]]


def _network() -> ModuleType:
    """The module that changes routes and addresses (pyroute2), imported only when a step needs it."""
    from istio_init import netns

    return netns


class Applied(NamedTuple):
    """What an apply did, for the CLI to report."""

    backend: str
    changed: tuple[str, ...]  # empty: the namespace already held exactly this plan (a converged re-run)
    dump: str  # the touched tables as iptables-save text, as Istio prints after applying
    notes: list[str]


class _NetworkUndo:
    """Routes and addresses changed so far, so they can be undone.

    A plain class, not a dataclass: the dataclasses module (and the inspect
    module it imports) cost about 6 ms of every apply's start-up.
    """

    def __init__(self, network: Any) -> None:
        self.network = network
        self.added_routing: list[Routing] = []
        self.removed_routing: list[Routing] = []
        self.added_addresses: list[str] = []

    def undo(self) -> list[str]:
        problems = []
        steps: list[Callable[[], object]] = [
                 lambda: self.network.remove_routing(list(reversed(self.added_routing))),
                 *[(lambda r=r: self.network.add_policy_route(r.family, r.fwmark, r.table))
                   for r in self.removed_routing if r.kind == "rule"],
                 *[(lambda a=a: self.network.remove_loopback_address(a)) for a in self.added_addresses]]
        for step in steps:
            try:
                step()
            except Exception as exc:  # keep undoing the rest
                problems.append(str(exc))
        return problems


def _undo_all(undos: Sequence[Undo | _NetworkUndo], error: BaseException) -> ApplyError:
    problems = [p for undo in reversed(undos) for p in undo.undo()]
    message = str(error) if isinstance(error, ApplyError) else f"{type(error).__name__}: {error}"
    if problems:
        return ApplyError(f"{message}; rollback incomplete: {'; '.join(problems)}")
    return ApplyError(f"{message} (everything changed in this run was put back)")


def run(plan: RulePlan, backend: Backend, others: Callable[[], Sequence[Backend]] = tuple, network: Any = None,
        lock: Lock = locks.namespace_lock) -> Applied:
    """Install `plan` through `backend`, converging from whatever is there; remove ours from `others()`.

    `others` is asked under the lock: a concurrent run with another backend
    may have just installed its rules there.
    """
    families = [family.family for family in plan.families()]
    notes: list[str] = []
    with lock():
        timing.mark("istio-init's namespace lock")
        undo = backend.converge(plan, families)
        undos: list[Undo | _NetworkUndo] = [undo]
        marks = set(undo.previous_marks)  # TPROXY marks of rules replaced here or removed elsewhere
        try:
            for other in others():
                removed = other.remove([4, 6])
                undos.append(removed)
                marks |= removed.previous_marks
                notes.append(f"removed istio-init's rules from the {other.name} tables (this run uses "
                             f"{backend.name}, so two rule sets do not capture at once)")
            timing.mark("other backends holding istio-init's rules")
            _apply_routing(plan, marks, network, undos)
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


def _apply_routing(plan: RulePlan, previous_marks: set[int], network: Any,
                   undos: list[Undo | _NetworkUndo]) -> None:
    planned = {route.fwmark for route in plan.routes}
    stale = previous_marks - planned
    if not (plan.loopback_addresses or plan.routes or stale):
        return  # the common case: no pyroute2 at all
    net = network or _network()
    state = _NetworkUndo(net)
    undos.append(state)
    step = "loopback address"
    try:
        for address in plan.loopback_addresses:
            step = f"address {address} on lo"
            if net.add_loopback_address(address):
                state.added_addresses.append(address)
        for route in plan.routes:
            step = f"policy route fwmark {route.fwmark:#x} lookup {route.table}"
            state.added_routing += net.add_policy_route(route.family, route.fwmark, route.table)
        if stale:
            step = "removing the policy routes of earlier TPROXY marks"
            for family in (4, 6):
                found = net.policy_routing_for_marks(family, stale)
                net.remove_routing(found)
                state.removed_routing += found
    except Exception as exc:  # ApplyError, NetlinkError, OSError from pyroute2
        raise ApplyError(f"route step, {step}: {exc}") from None


class Cleaned:
    """What `clean` removed (or, with -n, would remove)."""

    def __init__(self) -> None:
        self.changed: list[str] = []
        self.planned: list[str] = []  # -n: restore text and routes that would go


def clean(backends: Sequence[Backend], marks: set[int], dry_run: bool = False, network: Any = None,
          lock: Lock = locks.namespace_lock) -> Cleaned:
    """Remove istio-init's rules from every backend given, its TPROXY routes and the ::6 address."""
    result = Cleaned()
    families = [4, 6]
    with lock():
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
            result.changed += _clean_routing(marks, dry_run, network or _network(), result)
        except BaseException as exc:
            if dry_run:
                raise
            raise _undo_all(undos, exc) from None
    return result


def _clean_routing(marks: set[int], dry_run: bool, net: Any, result: Cleaned) -> list[str]:
    found = [item for family in (4, 6) for item in net.policy_routing_for_marks(family, marks)]
    has_address = net.has_loopback_address(IPV6_PASSTHROUGH_ADDRESS)
    gone = [str(item) for item in found] + ([f"address {IPV6_PASSTHROUGH_ADDRESS} on lo"] if has_address else [])
    if dry_run:
        result.planned += [f"# remove {item}\n" for item in gone]
        return []
    try:
        net.remove_routing(found)
        if has_address:
            net.remove_loopback_address(IPV6_PASSTHROUGH_ADDRESS)
    except Exception as exc:  # NetlinkError, OSError from pyroute2
        raise ApplyError(f"clean: removing routes or the ::6 address: {exc}") from None
    return gone
